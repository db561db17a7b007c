// Writes the seed corpus of the fuzz targets (tests/fuzz/corpus/<target>/):
// records and state trees as the store writes them, with placements of
// both forms, and slices. Run once when the formats change:
//   build/bin/ckptkv_fuzz_corpus tests/fuzz/corpus
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "schema/records.h"
#include "store/block_codec.h"
#include "store/digest.h"
#include "tests/fuzz/fuzz_store.h"
#include "tests/python_tree.h"

using namespace ckptkv;
namespace fs = std::filesystem;

namespace {

std::string Bytes(const flatbuffers::FlatBufferBuilder& b) {
  return std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
}

void Write(const fs::path& dir, const std::string& name, const std::string& bytes) {
  fs::create_directories(dir);
  std::ofstream(dir / name, std::ios::binary) << bytes;
}

std::string Range(uint32_t off, uint32_t len) {
  std::string s(8, '\0');
  for (int i = 0; i < 4; ++i) {
    s[i] = static_cast<char>(off >> (8 * i));
    s[4 + i] = static_cast<char>(len >> (8 * i));
  }
  return s;
}

enum class Form { kNone, kRect, kFlat };

std::string Record(bool inline_bytes, Form form) {
  const std::vector<uint8_t> w = fuzz::SeedBytes();
  flatbuffers::FlatBufferBuilder b;
  std::vector<int64_t> shape = inline_bytes ? std::vector<int64_t>{4, 8}
                                            : std::vector<int64_t>{static_cast<int64_t>(w.size())};
  auto shape_vec = b.CreateVector(shape);
  Digest digest;
  flatbuffers::Offset<flatbuffers::Vector<const fb::Digest128*>> chunks;
  flatbuffers::Offset<flatbuffers::Vector<uint8_t>> inl;
  uint64_t byte_length;
  if (inline_bytes) {
    byte_length = 32;
    inl = b.CreateVector(w.data(), 32);
    digest = Digest::Of(w.data(), 32);
  } else {
    byte_length = w.size();
    std::vector<fb::Digest128> ds;
    std::string keys;
    for (size_t off = 0; off < w.size(); off += fuzz::kFuzzChunk) {
      Digest d = Digest::Of(w.data() + off, std::min<size_t>(fuzz::kFuzzChunk, w.size() - off));
      ds.emplace_back(d.lo, d.hi);
      keys += d.Key();
    }
    chunks = b.CreateVectorOfStructs(ds);
    digest = Digest::Of(keys.data(), keys.size());
  }
  flatbuffers::Offset<fb::Placement> pl;
  if (form == Form::kRect) {
    std::vector<int64_t> global{4, 16}, offsets{0, 8}, shard{4, 8};
    pl = fb::CreatePlacement(b, b.CreateVector(global), b.CreateVector(offsets), -1, 0, 0,
                             b.CreateString("layers.0.weight"), b.CreateString("param"),
                             b.CreateVector(shard), 0, 1, 2, 1);
  } else if (form == Form::kFlat) {
    const int64_t n = static_cast<int64_t>(byte_length);
    std::vector<flatbuffers::Offset<fb::Segment>> segs{
        fb::CreateSegment(b, b.CreateString("a"), 0, n / 2, 0),
        fb::CreateSegment(b, b.CreateString("b"), n / 2, n - n / 2, 4)};
    std::vector<int64_t> global{n};
    pl = fb::CreatePlacement(b, b.CreateVector(global), 0, 0, 0, n, 0, b.CreateString("fp32"), 0,
                             b.CreateVector(segs), 0, 1, -1);
  }
  fb::TensorRecordBuilder rb(b);
  rb.add_dtype(fb::DType::UInt8);
  rb.add_shape(shape_vec);
  rb.add_byte_length(byte_length);
  rb.add_chunk_size(fuzz::kFuzzChunk);
  if (inline_bytes) {
    rb.add_inline_data(inl);
  } else {
    rb.add_chunks(chunks);
  }
  fb::Digest128 fd(digest.lo, digest.hi);
  rb.add_digest(&fd);
  if (form != Form::kNone) rb.add_placement(pl);
  b.Finish(rb.Finish());
  return Bytes(b);
}

std::string Tree() {
  flatbuffers::FlatBufferBuilder b;
  auto str = [&](const char* s) {
    return fb::CreateNode(b, fb::NodeKind::String, false, 0, 0, 0, b.CreateString(s));
  };
  auto tensor = [&](const char* p) {
    return fb::CreateNode(b, fb::NodeKind::Tensor, false, 0, 0, 0, b.CreateString(p), 0, 0,
                          fb::NodeKind::None, fb::NodeKind::None, b.CreateString("cpu"));
  };
  std::vector<flatbuffers::Offset<fb::Node>> list_items{
      fb::CreateNode(b, fb::NodeKind::Int, false, 3),
      fb::CreateNode(b, fb::NodeKind::Double, false, 0, 2.5),
      fb::CreateNode(b, fb::NodeKind::Bool, true),
      fb::CreateNode(b, fb::NodeKind::None),
      fb::CreateNode(b, fb::NodeKind::Device, false, 0, 0, 0, b.CreateString("cpu")),
      fb::CreateNode(b, fb::NodeKind::ComplexDouble, false, 0, 1.0, 2.0)};
  auto list = fb::CreateNode(b, fb::NodeKind::List, false, 0, 0, 0, 0, b.CreateVector(list_items));
  std::vector<flatbuffers::Offset<fb::Node>> tuple_items{tensor("module/w"), tensor("module/w")};
  auto tuple =
      fb::CreateNode(b, fb::NodeKind::Tuple, false, 0, 0, 0, 0, b.CreateVector(tuple_items));
  std::vector<flatbuffers::Offset<fb::Node>> keys{str("module"), str("args"), str("pair")};
  std::vector<flatbuffers::Offset<fb::Node>> items{tensor("module/b"), list, tuple};
  auto root = fb::CreateNode(b, fb::NodeKind::Dict, false, 0, 0, 0, 0, b.CreateVector(items),
                             b.CreateVector(keys), fb::NodeKind::None, fb::NodeKind::String);
  b.Finish(fb::CreateStateTree(b, root, 2, 64));
  return Bytes(b);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 1;
  }
  const fs::path out(argv[1]);
  int i = 0;
  for (bool inl : {false, true}) {
    for (Form f : {Form::kNone, Form::kRect, Form::kFlat}) {
      if (!inl && f == Form::kRect) continue;  // the rectangle is 4 x 8
      const std::string rec = Record(inl, f);
      const std::string name = "seed" + std::to_string(i++);
      Write(out / "record_fuzz", name, rec + Range(100, 9000));
      if (f != Form::kNone) Write(out / "placement_fuzz", name, rec);
    }
  }
  Write(out / "state_tree_fuzz", "seed0", Tree());
  // The Python kinds: OrderedDict, torch.Size, set, enum, dataclass, bytes, big int.
  Write(out / "state_tree_fuzz", "seed1", ckptkv::testing::PythonModelTree());
  // slice_fuzz: rank (1 byte), dims (int64 each), then the slice text.
  auto slice = [&](const std::vector<int64_t>& shape, const std::string& text) {
    std::string s(1, static_cast<char>(shape.size()));
    for (int64_t d : shape) s.append(reinterpret_cast<const char*>(&d), 8);
    return s + text;
  };
  Write(out / "slice_fuzz", "seed0", slice({4, 5, 6}, "0:2, :, -1"));
  Write(out / "slice_fuzz", "seed1", slice({10}, "::-3"));
  Write(out / "slice_fuzz", "seed2", slice({3, 3}, "1"));
  Write(out / "slice_fuzz", "seed3", slice({7, 2}, "-7:7:2, 1:"));
  // block_fuzz: encoded blocks of each codec (mode 0: decode), and raw
  // float-like bytes to encode and decode (odd modes).
  std::string floats;
  for (int k = 0; k < 3000; ++k) {
    const float v = 0.02f * static_cast<float>((k * 7919) % 2001 - 1000) / 1000.0f;
    floats.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  const auto* fp = reinterpret_cast<const uint8_t*>(floats.data());
  auto block_seed = [&](Codec codec, uint32_t es) {
    const std::string block = EncodeBlock(codec, fp, floats.size(), es);
    const size_t n = floats.size();
    std::string s(1, '\0');
    for (int b = 0; b < 3; ++b) s.push_back(static_cast<char>((n >> (8 * b)) & 0xff));
    return s + block;
  };
  Write(out / "block_fuzz", "seed0", block_seed(Codec::kRaw, 0));
  Write(out / "block_fuzz", "seed1", block_seed(Codec::kZstd, 0));
  Write(out / "block_fuzz", "seed2", block_seed(Codec::kGroupedZstd, 4));
  Write(out / "block_fuzz", "seed3", block_seed(Codec::kGroupedZstd, 2));
  // Odd modes: 0x11 encodes with grouped zstd by 4, 0x0b by 2 (999 bytes:
  // a ragged tail), 0x03 with plain zstd.
  Write(out / "block_fuzz", "seed4", std::string(1, static_cast<char>(0x11)) + floats);
  Write(out / "block_fuzz", "seed5",
        std::string(1, static_cast<char>(0x0b)) + floats.substr(0, 999));
  Write(out / "block_fuzz", "seed6", std::string(1, static_cast<char>(0x03)) + floats);
  std::printf("wrote the seed corpus under %s\n", out.c_str());
  return 0;
}
