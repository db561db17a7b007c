// Reading committed tags: ListTags, GetTag, Latest, ListFiles, the state
// trees (GetFileTree) and tensor records (ListParams, GetTensorRecord) of a
// tag, and tensor bytes (ReadTensor, ReadTensorRange, ReadTensors: block
// reads on the read workers, every block checked against its digest and
// decoded into its destination).
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/slice.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "store/names.h"
#include "store/record_check.h"
#include "store/record_codec.h"
#include "store/node_client.h"
#include "store/store_internal.h"

namespace ckptkv {

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

// --- Through a node writer ----------------------------------------------------

namespace {

const Status& StatusOf(const Status& s) { return s; }
template <typename T>
const Status& StatusOf(const Result<T>& r) {
  return r.status();
}

// A read through a node writer goes to the client's read-only view; what
// the view does not find (another rank's commit since it opened) is
// looked up once more in a fresh view.
template <typename F>
auto ViaView(node::Client& client, F&& read) -> decltype(read(std::declval<const Store&>())) {
  Result<std::shared_ptr<Store>> view = client.View();
  if (!view.ok()) return view.status();
  auto r = read(**view);
  if (StatusOf(r).IsNotFound() && client.RefreshView().ok()) {
    view = client.View();
    if (view.ok()) r = read(**view);
  }
  return r;
}

}  // namespace

Result<std::vector<TagInfo>> Store::ListTags() const {
  if (impl_->node_) return ViaView(*impl_->node_, [](const Store& v) { return v.ListTags(); });
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
  if (impl_->node_) return ViaView(*impl_->node_, [&](const Store& v) { return v.GetTag(tag); });
  RETURN_IF_ERROR(ValidateTagLookup(tag));
  ASSIGN_OR_RETURN(auto found, impl_->FindTag(tag));
  if (!found) return impl_->TagNotFound(tag);
  return *found;
}

Result<std::optional<std::string>> Store::Latest() const {
  if (impl_->node_) return ViaView(*impl_->node_, [](const Store& v) { return v.Latest(); });
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
  if (impl_->node_) {
    return ViaView(*impl_->node_, [&](const Store& v) { return v.GetFileTree(tag, file); });
  }
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
  if (impl_->node_) {
    return ViaView(*impl_->node_, [&](const Store& v) { return v.ListParams(tag, file); });
  }
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
  if (impl_->node_) {
    return ViaView(*impl_->node_,
                   [&](const Store& v) { return v.GetTensorRecord(tag, file, param); });
  }
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

namespace {

// One chunk of one range: decoded in place when the range holds all of it,
// else through a scratch buffer (its digest covers the whole chunk).
struct ChunkJob {
  size_t read = 0;     // index into the reads
  size_t chunk = 0;    // index into the record's chunks
  uint64_t begin = 0;  // the chunk's first byte in the tensor
  uint64_t length = 0;
};

}  // namespace

ThreadPool& Store::Impl::ReadPool() const {
  std::lock_guard<std::mutex> lock(read_pool_mu_);
  if (!read_pool_) {
    read_pool_ = std::make_unique<ThreadPool>(options_.read_threads ? options_.read_threads
                                                                    : kDefaultReadThreads);
  }
  return *read_pool_;
}

rocksdb::Status Store::Impl::GetBlock(const Digest& d, rocksdb::PinnableSlice* value) const {
  rocksdb::ReadOptions ro;
  ro.verify_checksums = false;
  return db_->Get(ro, cf_.blocks, PayloadKey(d), value);
}

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
  return ReadTensors({TensorRead{&r, offset, len, dst, where}});
}

Status Store::ReadTensors(const std::vector<TensorRead>& reads) const {
  if (impl_->node_)
    return ViaView(*impl_->node_, [&](const Store& v) { return v.ReadTensors(reads); });
  std::vector<TensorRead> chunked;
  for (const TensorRead& t : reads) {
    if (t.record == nullptr) return Status::InvalidArgument(t.where + ": no tensor record");
    const fb::TensorRecord& r = *t.record;
    RETURN_IF_ERROR(CheckTensorRecord(r, t.where));
    const uint64_t total = r.byte_length();
    if (t.offset > total || t.length > total - t.offset) {
      return Status::InvalidArgument(t.where + ": byte range [" + std::to_string(t.offset) + ", " +
                                     std::to_string(t.offset + t.length) +
                                     ") is outside the tensor's " + std::to_string(total) +
                                     " bytes");
    }
    if (r.inline_data()) {
      if (t.length) std::memcpy(t.dst, r.inline_data()->data() + t.offset, t.length);
    } else if (t.length) {
      chunked.push_back(t);
    }
  }
  if (chunked.empty()) return Status::OK();
  Status s = impl_->ReadChunks(chunked);
  if (!s.ok() && impl_->options_.read_only) {
    // A read-only view of a store another process writes may name a block
    // it does not see (RocksDB gives such a view no consistency). Before a
    // reader reports it, a fresh view must agree.
    auto fresh = impl_->FreshView();
    if (fresh.ok()) {
      Status again = (*fresh)->impl_->ReadChunks(chunked);
      impl_->block_bytes_read_ += (*fresh)->BlockBytesRead();
      return again;
    }
  }
  return s;
}

Status Store::Impl::ReadChunks(const std::vector<TensorRead>& reads) const {
  std::vector<ChunkJob> jobs;
  for (size_t ri = 0; ri < reads.size(); ++ri) {
    const TensorRead& t = reads[ri];
    const uint64_t total = t.record->byte_length();
    const uint64_t cs = t.record->chunk_size();
    const size_t first = t.offset / cs;
    const size_t last = (t.offset + t.length - 1) / cs;
    for (size_t i = first; i <= last; ++i) {
      const uint64_t begin = i * cs;
      jobs.push_back(ChunkJob{ri, i, begin, std::min<uint64_t>(cs, total - begin)});
    }
  }
  // The first error in job order is the one reported; later jobs stop early.
  std::mutex err_mu;
  size_t err_at = jobs.size();
  Status err;
  std::vector<Digest> bad;  // blocks found missing or damaged
  std::atomic<bool> failed{false};
  std::atomic<uint64_t> read_bytes{0};
  BufferPool buffers;
  auto fail = [&](size_t j, Status st, const Digest* d) {
    std::lock_guard<std::mutex> lock(err_mu);
    if (d) bad.push_back(*d);
    if (j < err_at) {
      err_at = j;
      err = std::move(st);
    }
    failed = true;
  };
  ReadPool().ParallelFor(jobs.size(), [&](size_t j) {
    if (failed.load(std::memory_order_relaxed)) return;
    const ChunkJob& job = jobs[j];
    const TensorRead& t = reads[job.read];
    const Digest d = FromFb(*t.record->chunks()->Get(job.chunk));
    const std::string chunk_name =
        "block " + d.Hex() + " (chunk " + std::to_string(job.chunk) + ")";
    std::unique_ptr<ReadBuffers> b = buffers.Take();
    rocksdb::Status rs = GetBlock(d, &b->value);
    if (rs.IsNotFound()) {
      buffers.Give(std::move(b));
      return fail(j, Status::Corruption(t.where + ": " + chunk_name + " is missing from the store"),
                  &d);
    }
    if (!rs.ok()) {
      buffers.Give(std::move(b));
      Status st = FromRocks(rs, t.where + ": reading block " + d.Hex());
      return fail(j, rs.IsCorruption() ? Status::Corruption(st.message()) : st, nullptr);
    }
    const uint64_t lo = std::max(t.offset, job.begin);
    const uint64_t hi = std::min(t.offset + t.length, job.begin + job.length);
    const bool whole = lo == job.begin && hi == job.begin + job.length;
    // The block's own header must agree on its length before a scratch
    // buffer of that length is allocated.
    Codec codec;
    uint32_t header_len = 0;
    Status st =
        PeekBlockHeader(b->value.ToStringView(), &codec, &header_len) && header_len == job.length
            ? Status::OK()
            : Status::Corruption("block header is malformed or does not hold the " +
                                 std::to_string(job.length) + " bytes its record expects");
    uint8_t* out = nullptr;
    if (st.ok()) {
      if (!whole) b->scratch.resize(job.length);
      out = whole ? t.dst + (job.begin - t.offset) : b->scratch.data();
      st = DecodeBlock(b->value.ToStringView(), out, job.length, &b->grouped);
    }
    if (st.ok() && Digest::Of(out, job.length) != d) {
      st = Status::Corruption(t.where + ": " + chunk_name + " does not match its digest");
    } else if (!st.ok()) {
      st = st.WithContext(t.where + ": block " + d.Hex());
    }
    if (st.ok() && !whole) std::memcpy(t.dst + (lo - t.offset), out + (lo - job.begin), hi - lo);
    buffers.Give(std::move(b));
    if (!st.ok()) return fail(j, std::move(st), &d);
    read_bytes += job.length;
  });
  block_bytes_read_ += read_bytes.load();
  // A save must never reuse a block a read found bad: forget it, so that
  // the next save of those bytes writes them again (self-healing dedup).
  Status forgot = ForgetBlocks(bad);
  RETURN_IF_ERROR(err);
  return forgot;
}

}  // namespace ckptkv
