// Record codecs of the store (record_codec.h): index values, counters,
// block keys, TensorRecord / CommitRecord / StoreHeader bytes.
#include "store/record_codec.h"

namespace ckptkv {

std::string PayloadKey(const Digest& d) { return kPayloadPrefix + d.Key(); }
std::string PresenceKey(const Digest& d) { return kPresencePrefix + d.Key(); }

std::string EncodeIndexValue(uint32_t raw, uint32_t stored, Codec codec) {
  std::string v(kIndexValueSize, '\0');
  for (int i = 0; i < 4; ++i) {
    v[i] = static_cast<char>(raw >> (8 * i));
    v[4 + i] = static_cast<char>(stored >> (8 * i));
  }
  v[8] = static_cast<char>(codec);
  return v;
}

bool DecodeIndexValue(std::string_view v, uint32_t* raw, uint32_t* stored) {
  if (v.size() != kIndexValueSize) return false;
  uint32_t r = 0, s = 0;
  for (int i = 0; i < 4; ++i) {
    r |= static_cast<uint32_t>(static_cast<uint8_t>(v[i])) << (8 * i);
    s |= static_cast<uint32_t>(static_cast<uint8_t>(v[4 + i])) << (8 * i);
  }
  *raw = r;
  *stored = s;
  return IsKnownCodec(static_cast<uint8_t>(v[8]));
}

std::string EncodeU64(uint64_t x) {
  std::string v(8, '\0');
  for (int i = 0; i < 8; ++i) v[i] = static_cast<char>(x >> (8 * i));
  return v;
}

bool DecodeU64(std::string_view v, uint64_t* x) {
  if (v.size() != 8) return false;
  uint64_t r = 0;
  for (int i = 0; i < 8; ++i) r |= static_cast<uint64_t>(static_cast<uint8_t>(v[i])) << (8 * i);
  *x = r;
  return true;
}

Digest FromFb(const fb::Digest128& d) { return Digest{d.lo(), d.hi()}; }

Digest DigestOfChunks(const std::vector<Digest>& chunks) {
  std::string buf;
  buf.reserve(chunks.size() * 16);
  for (const auto& d : chunks) buf += d.Key();
  return Digest::Of(buf.data(), buf.size());
}

std::string BuildTensorRecord(const TensorMeta& meta, uint64_t byte_length, uint32_t chunk_size,
                              const std::vector<Digest>& chunks, const uint8_t* inline_data,
                              Digest digest) {
  flatbuffers::FlatBufferBuilder b(256 + chunks.size() * 16);
  auto shape = b.CreateVector(meta.shape);
  flatbuffers::Offset<flatbuffers::Vector<const fb::Digest128*>> chunk_vec;
  flatbuffers::Offset<flatbuffers::Vector<uint8_t>> inline_vec;
  if (inline_data != nullptr) {
    inline_vec = b.CreateVector(inline_data, byte_length);
  } else {
    std::vector<fb::Digest128> ds;
    ds.reserve(chunks.size());
    for (const auto& d : chunks) ds.emplace_back(d.lo, d.hi);
    chunk_vec = b.CreateVectorOfStructs(ds);
  }
  flatbuffers::Offset<fb::Placement> placement;
  if (meta.placement) {
    const Placement& pl = *meta.placement;
    std::vector<flatbuffers::Offset<fb::Segment>> segs;
    segs.reserve(pl.segments.size());
    for (const auto& sg : pl.segments) {
      segs.push_back(
          fb::CreateSegment(b, b.CreateString(sg.param), sg.start, sg.numel, sg.shard_start));
    }
    placement = fb::CreatePlacement(
        b, b.CreateVector(pl.global_shape), b.CreateVector(pl.offsets), pl.flat_group,
        pl.flat_offset, pl.flat_numel, pl.param.empty() ? 0 : b.CreateString(pl.param),
        pl.state.empty() ? 0 : b.CreateString(pl.state),
        pl.shard_shape.empty() ? 0 : b.CreateVector(pl.shard_shape),
        segs.empty() ? 0 : b.CreateVector(segs), pl.tp_rank, pl.tp_degree, pl.shard_dim);
  }
  fb::TensorRecordBuilder rb(b);
  rb.add_dtype(meta.dtype);
  rb.add_shape(shape);
  rb.add_byte_length(byte_length);
  rb.add_chunk_size(chunk_size);
  if (inline_data != nullptr) {
    rb.add_inline_data(inline_vec);
  } else {
    rb.add_chunks(chunk_vec);
  }
  fb::Digest128 fd(digest.lo, digest.hi);
  rb.add_digest(&fd);
  rb.add_requires_grad(meta.requires_grad);
  if (meta.placement) rb.add_placement(placement);
  b.Finish(rb.Finish());
  return std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
}

std::string BuildCommitRecord(const TagInfo& t) {
  flatbuffers::FlatBufferBuilder b(512);
  auto tag = b.CreateString(t.tag);
  auto files = b.CreateVectorOfStrings(t.files);
  auto parent = b.CreateString(t.parent_tag);
  flatbuffers::Offset<fb::ParallelLayout> layout;
  if (t.layout) {
    layout =
        fb::CreateParallelLayout(b, t.layout->tp, t.layout->pp, t.layout->dp, t.layout->zero_stage);
  }
  fb::CommitRecordBuilder cb(b);
  cb.add_tag(tag);
  cb.add_committed_at_ms(t.committed_at_ms);
  cb.add_sequence(t.sequence);
  cb.add_files(files);
  cb.add_tensors(t.tensors);
  cb.add_logical_bytes(t.logical_bytes);
  cb.add_new_bytes(t.new_bytes);
  cb.add_new_blocks(t.new_blocks);
  cb.add_stored_new_bytes(t.stored_new_bytes);
  cb.add_parent_tag(parent);
  if (t.layout) cb.add_layout(layout);
  b.Finish(cb.Finish());
  return std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
}

TagInfo ToTagInfo(const fb::CommitRecord& r) {
  TagInfo t;
  t.tag = r.tag() ? r.tag()->str() : "";
  t.committed_at_ms = r.committed_at_ms();
  t.sequence = r.sequence();
  if (r.files()) {
    for (const auto* f : *r.files()) t.files.push_back(f->str());
  }
  t.tensors = r.tensors();
  t.logical_bytes = r.logical_bytes();
  t.new_bytes = r.new_bytes();
  t.new_blocks = r.new_blocks();
  t.stored_new_bytes = r.stored_new_bytes();
  t.parent_tag = r.parent_tag() ? r.parent_tag()->str() : "";
  if (const auto* l = r.layout()) t.layout = Layout{l->tp(), l->pp(), l->dp(), l->zero_stage()};
  return t;
}

std::string BuildStoreHeader(uint32_t chunk_size, uint32_t inline_threshold, Codec codec,
                             int64_t created_at_ms) {
  flatbuffers::FlatBufferBuilder b;
  auto alg = b.CreateString(kHashAlgorithm);
  b.Finish(fb::CreateStoreHeader(b, kFormatVersion, alg, chunk_size, inline_threshold,
                                 static_cast<uint8_t>(codec), created_at_ms));
  return std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
}

}  // namespace ckptkv
