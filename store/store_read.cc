// Reading committed tags: ListTags, GetTag, Latest, ListFiles, the state
// trees (GetFileTree) and tensor records (ListParams, GetTensorRecord) of a
// tag, and a tensor's bytes (ReadTensor, ReadTensorRange: MultiGet of its
// blocks on the thread pool, every block checked against its digest).
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/slice.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "store/names.h"
#include "store/record_check.h"
#include "store/record_codec.h"
#include "store/store_internal.h"

namespace ckptkv {

namespace {

// Blocks fetched by one MultiGet when reading a tensor.
constexpr size_t kReadBatch = 8;

}  // namespace

// --- Tags -------------------------------------------------------------------

Result<std::optional<TagInfo>> Store::Impl::FindTag(const std::string& tag) const {
  std::string bytes;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), cf_.tags, tag, &bytes);
  if (s.IsNotFound()) return std::optional<TagInfo>();
  RETURN_IF_ERROR(FromRocks(s, "reading tag " + Quote(tag)));
  const fb::CommitRecord* r = VerifiedCommitRecord(bytes);
  if (r == nullptr) {
    return Status::Corruption("commit record of tag " + Quote(tag) + " (tags/" + tag +
                              ") fails verification");
  }
  return std::optional<TagInfo>(ToTagInfo(*r));
}

Result<std::string> Store::Impl::LatestTagUnlocked() const {
  std::string v;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), cf_.meta, kLatestKey, &v);
  if (s.IsNotFound()) return std::string();
  RETURN_IF_ERROR(FromRocks(s, "reading latest"));
  return v;
}

Status Store::Impl::TagNotFound(const std::string& tag) const {
  std::vector<std::string> names;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf_.tags));
  for (it->SeekToFirst(); it->Valid(); it->Next()) names.push_back(it->key().ToString());
  RETURN_IF_ERROR(FromRocks(it->status(), "listing the tags of store '" + dir_ + "'"));
  return Status::NotFound("tag " + Quote(tag) + " does not exist in store '" + dir_ +
                          "'; committed tags: " + JoinNames(names));
}

Result<std::vector<TagInfo>> Store::ListTags() const {
  std::vector<TagInfo> out;
  std::unique_ptr<rocksdb::Iterator> it(
      impl_->db_->NewIterator(rocksdb::ReadOptions(), impl_->cf_.tags));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    // A copy: FlatBuffers reads need the alignment of an allocation, which
    // an iterator's value does not have.
    const std::string value = it->value().ToString();
    const fb::CommitRecord* r = VerifiedCommitRecord(value);
    if (r == nullptr) {
      return Status::Corruption("commit record tags/" + it->key().ToString() +
                                " fails verification");
    }
    out.push_back(ToTagInfo(*r));
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "listing tags"));
  std::sort(out.begin(), out.end(),
            [](const TagInfo& a, const TagInfo& b) { return a.sequence < b.sequence; });
  return out;
}

Result<TagInfo> Store::GetTag(const std::string& tag) const {
  RETURN_IF_ERROR(ValidateTagLookup(tag));
  ASSIGN_OR_RETURN(auto found, impl_->FindTag(tag));
  if (!found) return impl_->TagNotFound(tag);
  return *found;
}

Result<std::optional<std::string>> Store::Latest() const {
  ASSIGN_OR_RETURN(std::string latest, impl_->LatestTagUnlocked());
  if (latest.empty()) return std::optional<std::string>();
  return std::optional<std::string>(latest);
}

// --- Files and records ------------------------------------------------------

Result<std::vector<std::string>> Store::ListFiles(const std::string& tag) const {
  ASSIGN_OR_RETURN(TagInfo info, GetTag(tag));
  return info.files;
}

Result<std::string> Store::GetFileTree(const std::string& tag, const std::string& file) const {
  std::string bytes;
  rocksdb::Status s =
      impl_->db_->Get(rocksdb::ReadOptions(), impl_->cf_.files, FileKey(tag, file), &bytes);
  if (s.IsNotFound()) {
    ASSIGN_OR_RETURN(TagInfo info, GetTag(tag));
    return Status::NotFound("file " + Quote(file) + " does not exist in tag " + Quote(tag) +
                            "; its files: " + JoinNames(info.files));
  }
  const std::string name = FileName(tag, file);
  RETURN_IF_ERROR(FromRocks(s, "reading " + name));
  // A walk within the node budget, so that every decoder of these bytes is
  // bounded by their size.
  std::vector<std::string> paths;
  RETURN_IF_ERROR(VerifyStateTreeBytes(bytes, "state tree of " + name,
                                       "state tree of " + name + " (files key " + Quote(tag) +
                                           "\\0" + Quote(file) + ") fails verification",
                                       &paths));
  return bytes;
}

Result<std::vector<std::string>> Store::ListParams(const std::string& tag,
                                                   const std::string& file) const {
  std::vector<std::string> out;
  std::string prefix = TensorPrefix(tag, file);
  std::string end = PrefixEnd(prefix);
  rocksdb::ReadOptions ro;
  rocksdb::Slice upper(end);
  ro.iterate_upper_bound = &upper;
  std::unique_ptr<rocksdb::Iterator> it(impl_->db_->NewIterator(ro, impl_->cf_.tensors));
  for (it->Seek(prefix); it->Valid(); it->Next()) {
    out.push_back(it->key().ToString().substr(prefix.size()));
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "listing tensors of " + FileName(tag, file)));
  return out;
}

Result<TensorRecordRef> Store::GetTensorRecord(const std::string& tag, const std::string& file,
                                               const std::string& param) const {
  std::string bytes;
  const std::string where = TensorName(tag, file, param);
  rocksdb::Status s = impl_->db_->Get(rocksdb::ReadOptions(), impl_->cf_.tensors,
                                      TensorKey(tag, file, param), &bytes);
  if (s.IsNotFound()) {
    RETURN_IF_ERROR(GetFileTree(tag, file).status());
    ASSIGN_OR_RETURN(auto params, ListParams(tag, file));
    return Status::NotFound("parameter " + Quote(param) + " does not exist in " +
                            FileName(tag, file) + "; its parameters: " + JoinNames(params));
  }
  RETURN_IF_ERROR(FromRocks(s, "reading " + where));
  const fb::TensorRecord* r = nullptr;
  RETURN_IF_ERROR(VerifyTensorRecordBytes(bytes, "tensor record " + where,
                                          "tensor record " + where + " fails verification", &r));
  return TensorRecordRef(std::move(bytes));
}

// --- Tensor bytes -----------------------------------------------------------

Status Store::ReadTensor(const fb::TensorRecord& r, uint8_t* dst, uint64_t len,
                         const std::string& where) const {
  if (len != r.byte_length()) {
    RETURN_IF_ERROR(CheckTensorRecord(r, where));
    return Status::InvalidArgument(where + ": destination holds " + std::to_string(len) +
                                   " bytes, tensor has " + std::to_string(r.byte_length()));
  }
  return ReadTensorRange(r, 0, len, dst, where);
}

Status Store::ReadTensorRange(const fb::TensorRecord& r, uint64_t offset, uint64_t len,
                              uint8_t* dst, const std::string& where) const {
  RETURN_IF_ERROR(CheckTensorRecord(r, where));
  const uint64_t total = r.byte_length();
  if (offset > total || len > total - offset) {
    return Status::InvalidArgument(where + ": byte range [" + std::to_string(offset) + ", " +
                                   std::to_string(offset + len) + ") is outside the tensor's " +
                                   std::to_string(total) + " bytes");
  }
  if (r.inline_data()) {
    if (len) std::memcpy(dst, r.inline_data()->data() + offset, len);
    return Status::OK();
  }
  if (len == 0) return Status::OK();
  bool missing = false;
  Status s = impl_->ReadChunks(r, offset, len, dst, where, &missing);
  if (!s.ok() && impl_->options_.read_only) {
    // A read-only view of a store another process writes may name a block
    // it does not see (RocksDB gives such a view no consistency). Before a
    // reader reports it, a fresh view must agree.
    auto fresh = impl_->FreshView();
    if (fresh.ok()) {
      Status again = (*fresh)->impl_->ReadChunks(r, offset, len, dst, where, &missing);
      impl_->block_bytes_read_ += (*fresh)->BlockBytesRead();
      return again;
    }
  }
  return s;
}

Status Store::Impl::ReadChunks(const fb::TensorRecord& r, uint64_t offset, uint64_t len,
                               uint8_t* dst, const std::string& where, bool* missing) const {
  const uint64_t total = r.byte_length();
  const uint64_t cs = r.chunk_size();
  const auto& chunks = *r.chunks();
  const size_t first_chunk = offset / cs;
  const size_t n = (offset + len - 1) / cs + 1 - first_chunk;
  const size_t batches = (n + kReadBatch - 1) / kReadBatch;
  std::vector<Status> errors(batches);
  std::vector<std::optional<Digest>> bad(batches);  // a block found missing or damaged
  std::atomic<uint64_t> read_bytes{0};
  std::atomic<bool> missing_any{false};
  pool_->ParallelFor(batches, [&](size_t bi) {
    size_t first = bi * kReadBatch;
    size_t m = std::min(kReadBatch, n - first);
    std::vector<std::string> keys(m);
    std::vector<rocksdb::Slice> slices(m);
    for (size_t k = 0; k < m; ++k) {
      keys[k] = PayloadKey(FromFb(*chunks[first_chunk + first + k]));
      slices[k] = keys[k];
    }
    std::vector<rocksdb::PinnableSlice> values(m);
    std::vector<rocksdb::Status> statuses(m);
    db_->MultiGet(rocksdb::ReadOptions(), cf_.blocks, m, slices.data(), values.data(),
                  statuses.data());
    std::vector<uint8_t> partial;
    for (size_t k = 0; k < m; ++k) {
      size_t i = first_chunk + first + k;
      Digest d = FromFb(*chunks[i]);
      const uint64_t cbegin = i * cs;
      const uint64_t clen = std::min<uint64_t>(cs, total - cbegin);
      if (statuses[k].IsNotFound()) {
        errors[bi] = Status::Corruption(where + ": block " + d.Hex() + " (chunk " +
                                        std::to_string(i) + ") is missing from the store");
        bad[bi] = d;
        missing_any = true;
        return;
      }
      if (!statuses[k].ok()) {
        errors[bi] = FromRocks(statuses[k], where + ": reading block " + d.Hex());
        if (statuses[k].IsCorruption()) errors[bi] = Status::Corruption(errors[bi].message());
        return;
      }
      // A chunk wholly inside the range decodes in place; a partial one
      // decodes into a scratch buffer (its digest covers the whole chunk).
      const uint64_t lo = std::max(offset, cbegin);
      const uint64_t hi = std::min(offset + len, cbegin + clen);
      const bool whole = lo == cbegin && hi == cbegin + clen;
      // The block's own header must agree on its length before a scratch
      // buffer of that length is allocated.
      Codec codec;
      uint32_t header_len = 0;
      Status s =
          PeekBlockHeader(values[k].ToStringView(), &codec, &header_len) && header_len == clen
              ? Status::OK()
              : Status::Corruption("block header is malformed or does not hold the " +
                                   std::to_string(clen) + " bytes its record expects");
      uint8_t* out = nullptr;
      if (s.ok()) {
        if (!whole) partial.resize(clen);
        out = whole ? dst + (cbegin - offset) : partial.data();
        s = DecodeBlock(values[k].ToStringView(), out, clen);
      }
      if (!s.ok()) {
        errors[bi] = s.WithContext(where + ": block " + d.Hex());
        bad[bi] = d;
        return;
      }
      if (Digest::Of(out, clen) != d) {
        errors[bi] = Status::Corruption(where + ": block " + d.Hex() + " (chunk " +
                                        std::to_string(i) + ") does not match its digest");
        bad[bi] = d;
        return;
      }
      if (!whole) std::memcpy(dst + (lo - offset), partial.data() + (lo - cbegin), hi - lo);
      read_bytes += clen;
    }
  });
  block_bytes_read_ += read_bytes.load();
  // A save must never reuse a block a read found bad: forget it, so that
  // the next save of those bytes writes them again (self-healing dedup).
  std::vector<Digest> forget;
  for (const auto& d : bad) {
    if (d) forget.push_back(*d);
  }
  *missing = missing_any.load();
  Status forgot = ForgetBlocks(forget);
  for (auto& e : errors) RETURN_IF_ERROR(e);
  return forgot;
}

}  // namespace ckptkv
