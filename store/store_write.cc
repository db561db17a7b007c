// Writing tags: BeginTag, PutTensor (chunking, dedup, block writes),
// LinkTensor, PutFile / ClearFile, CommitTag (flush barrier and the commit
// WriteBatch), AbortTag and DeleteTag; the block pins that keep Gc off the
// blocks of a pending tag; ForgetBlocks, which drops the index entries of
// blocks found bad.
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/slice.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <cstring>

#include "store/kill_point.h"
#include "store/names.h"
#include "store/node_client.h"
#include "store/record_check.h"
#include "store/record_codec.h"
#include "store/size_math.h"
#include "store/store_internal.h"

namespace ckptkv {

// --- Pending tags and block pins ------------------------------------------

Status Store::BeginTag(const std::string& tag, bool overwrite) {
  BeginOptions options;
  options.overwrite = overwrite;
  return BeginTag(tag, options);
}

Status Store::BeginTag(const std::string& tag, const BeginOptions& options) {
  if (impl_->node_) {
    RETURN_IF_ERROR(ValidateTag(tag));
    return impl_->node_->Begin(tag, options);
  }
  const bool overwrite = options.overwrite;
  RETURN_IF_ERROR(impl_->WritableCheck("create"));
  if (options.codec && !IsKnownCodec(static_cast<uint8_t>(*options.codec))) {
    return Status::InvalidArgument("tag " + Quote(tag) + ": codec " +
                                   std::to_string(static_cast<uint8_t>(*options.codec)) +
                                   " is not known; " + ValidCodecs());
  }
  RETURN_IF_ERROR(ValidateTag(tag));
  ASSIGN_OR_RETURN(auto existing, impl_->FindTag(tag));
  if (existing && !overwrite) {
    return Status::AlreadyExists("tag " + Quote(tag) + " is already committed (sequence " +
                                 std::to_string(existing->sequence) +
                                 "); delete it first or save with overwrite enabled");
  }
  ASSIGN_OR_RETURN(std::string parent, impl_->LatestTagUnlocked());
  std::lock_guard<std::mutex> lock(impl_->mu_);
  PendingTag& p = impl_->pending_[tag];
  p = PendingTag();
  p.overwrite = overwrite;
  p.codec = options.codec;
  p.parent = parent;
  return Status::OK();
}

bool Store::IsPending(const std::string& tag) const {
  if (impl_->node_) return impl_->node_->IsPending(tag);
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->pending_.count(tag) > 0;
}

Result<PendingTag*> Store::Impl::PendingForSave(const std::string& tag) {
  auto it = pending_.find(tag);
  if (it == pending_.end()) {
    return Status::FailedPrecondition("save into tag " + Quote(tag) +
                                      " without create; call create(" + Quote(tag) + ") first");
  }
  return &it->second;
}

Result<bool> Store::Impl::IsIndexed(const Digest& d) const {
  std::string v;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), cf_.index, d.Key(), &v);
  if (s.IsNotFound()) return false;
  if (!s.ok()) return FromRocks(s, "index lookup of block " + d.Hex());
  return true;
}

Result<bool> Store::Impl::PinBlock(PendingTag* pending, const Digest& d, PinMode mode) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (pending->pinned.count(d)) return true;  // already handled in this tag
    auto w = written_.find(d);
    if (w != written_.end()) {  // written by a save not yet committed
      pending->pinned.insert(d);
      pending->unindexed[d] = w->second;
      return true;
    }
    if (mode == PinMode::kClaim) pending->pinned.insert(d);
  }
  Result<bool> indexed = IsIndexed(d);
  if (mode == PinMode::kClaim) {
    if (!indexed.ok()) UnpinBlock(pending, d);
    return indexed;
  }
  if (!indexed.ok() || !*indexed) return indexed;
  std::lock_guard<std::mutex> lock(mu_);
  pending->pinned.insert(d);
  return true;
}

void Store::Impl::UnpinBlock(PendingTag* pending, const Digest& d) {
  // A failed write must not let a retry of this tag skip the chunk.
  std::lock_guard<std::mutex> lock(mu_);
  pending->pinned.erase(d);
}

// --- Tensors and files ----------------------------------------------------

Status Store::Impl::WriteChunk(PendingTag* pending, Codec preferred, uint32_t element_size,
                               const uint8_t* data, size_t len, Digest* out, WriteStats* stats) {
  Digest d = Digest::Of(data, len);
  *out = d;
  std::shared_lock<std::shared_mutex> gc_guard(gc_mu_);
  ASSIGN_OR_RETURN(bool present, PinBlock(pending, d, PinMode::kClaim));
  if (present) return Status::OK();
  Status st = WriteClaimed(pending, preferred, element_size, data, len, d, stats);
  if (!st.ok()) UnpinBlock(pending, d);
  return st;
}

Status Store::Impl::WriteClaimed(PendingTag* pending, Codec preferred, uint32_t element_size,
                                 const uint8_t* data, size_t len, const Digest& d,
                                 WriteStats* stats) {
  // The payload goes to RocksDB straight from the tensor's memory (raw) or
  // from the compressed buffer: no encoded copy of the chunk is made. The
  // digest is of the raw bytes whatever the codec, so dedup ignores codecs.
  // The compressed buffer is the thread's own, reused from chunk to chunk
  // (a fresh one per chunk costs an allocation and page faults each time);
  // it is let go after a chunk above 4 MiB.
  thread_local std::string compressed;
  struct Trim {
    std::string& s;
    ~Trim() {
      if (s.capacity() > (4u << 20)) std::string().swap(s);
    }
  } trim{compressed};
  const Codec codec = EncodeChunk(preferred, element_size, data, len, &compressed);
  const std::string header = BlockHeader(codec, len);
  const rocksdb::Slice value_parts[2] = {
      header, codec == Codec::kRaw ? rocksdb::Slice(reinterpret_cast<const char*>(data), len)
                                   : rocksdb::Slice(compressed)};
  const size_t stored = header.size() + value_parts[1].size();
  std::string index_value =
      EncodeIndexValue(static_cast<uint32_t>(len), static_cast<uint32_t>(stored), codec);
  const std::string payload_key = PayloadKey(d);
  const rocksdb::Slice payload_key_slice(payload_key);
  rocksdb::WriteBatch batch;
  batch.Put(cf_.blocks, rocksdb::SliceParts(&payload_key_slice, 1),
            rocksdb::SliceParts(value_parts, 2));
  batch.Put(cf_.blocks, PresenceKey(d), index_value);
  rocksdb::WriteOptions wo;
  wo.disableWAL = options_.block_durability == BlockDurability::kFlush;
  RETURN_IF_ERROR(FromRocks(db_->Write(wo, &batch), "writing block " + d.Hex()));
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Set after the write and before the block can be found through
    // written_: a commit that reuses this block also sees the flag.
    if (wo.disableWAL) unflushed_blocks_ = true;
    written_[d] = index_value;
    pending->unindexed[d] = std::move(index_value);
  }
  stats->new_blocks += 1;
  stats->new_bytes += len;
  stats->stored_new_bytes += stored;
  return Status::OK();
}

Status CheckPutTensor(const std::string& where, const std::string& file, const std::string& param,
                      const TensorMeta& meta, const ByteSource& bytes) {
  RETURN_IF_ERROR(ValidateFile(file));
  RETURN_IF_ERROR(ValidateParam(param));
  const uint64_t esize = DTypeSize(meta.dtype);
  if (esize == 0) return Status::InvalidArgument(where + ": unknown dtype");
  for (int64_t d : meta.shape) {
    if (d < 0) return Status::InvalidArgument(where + ": negative dimension in shape");
  }
  const auto expect = CheckedByteLength(meta.shape, esize);
  if (!expect) {
    return Status::InvalidArgument(where + ": shape " + ShapeString(meta.shape) +
                                   " overflows a 64-bit byte length");
  }
  if (*expect != bytes.length) {
    return Status::InvalidArgument(where + ": shape and dtype give " + std::to_string(*expect) +
                                   " bytes but " + std::to_string(bytes.length) + " were given");
  }
  if (bytes.data == nullptr && !bytes.fill && bytes.length > 0) {
    return Status::InvalidArgument(where + ": no bytes given");
  }
  return Status::OK();
}

Result<std::string> InlineTensorRecord(const TensorMeta& meta, const ByteSource& bytes,
                                       uint32_t chunk_size) {
  const uint64_t len = bytes.length;
  std::string buf(len, '\0');
  if (len) {
    if (bytes.data) {
      std::memcpy(buf.data(), bytes.data, len);
    } else {
      RETURN_IF_ERROR(bytes.fill(0, len, reinterpret_cast<uint8_t*>(buf.data())));
    }
  }
  const auto* p = reinterpret_cast<const uint8_t*>(buf.data());
  return BuildTensorRecord(meta, len, chunk_size, {}, p, Digest::Of(p, len));
}

Result<WriteStats> Store::PutTensor(const std::string& tag, const std::string& file,
                                    const std::string& param, const TensorMeta& meta,
                                    const ByteSource& bytes) {
  if (impl_->node_) return impl_->node_->PutTensor(tag, file, param, meta, bytes);
  const std::string where = TensorName(tag, file, param);
  RETURN_IF_ERROR(CheckPutTensor(where, file, param, meta, bytes));
  PendingTag* pending;
  {
    std::lock_guard<std::mutex> lock(impl_->mu_);
    ASSIGN_OR_RETURN(pending, impl_->PendingForSave(tag));
  }

  WriteStats stats;
  stats.logical_bytes = bytes.length;
  std::string record;
  const uint64_t len = bytes.length;
  if (len <= impl_->inline_threshold_) {
    ASSIGN_OR_RETURN(record, InlineTensorRecord(meta, bytes, impl_->chunk_size_));
  } else {
    const uint64_t cs = impl_->chunk_size_;
    const size_t n = (len + cs - 1) / cs;
    std::vector<Digest> digests(n);
    std::vector<Status> errors(n);
    std::vector<WriteStats> per(n);
    // The tag's codec (BeginOptions) or the store's; grouping by the dtype.
    Codec codec;
    {
      std::lock_guard<std::mutex> lock(impl_->mu_);
      codec = pending->codec.value_or(impl_->codec_);
    }
    const uint32_t group = GroupElementSize(meta.dtype);
    auto chunk_len = [&](size_t i) { return std::min<uint64_t>(cs, len - i * cs); };
    if (bytes.data) {
      impl_->pool_->ParallelFor(n, [&](size_t i) {
        errors[i] = impl_->WriteChunk(pending, codec, group, bytes.data + i * cs, chunk_len(i),
                                      &digests[i], &per[i]);
      });
    } else {
      // Stage a window of chunks on the host, then hash and write them.
      const size_t window = std::max<size_t>(2, impl_->pool_->size() * 2);
      std::vector<std::string> staging(std::min(window, n));
      for (size_t base = 0; base < n; base += window) {
        size_t m = std::min(window, n - base);
        for (size_t k = 0; k < m; ++k) {
          staging[k].resize(chunk_len(base + k));
          RETURN_IF_ERROR(bytes.fill((base + k) * cs, chunk_len(base + k),
                                     reinterpret_cast<uint8_t*>(staging[k].data())));
        }
        impl_->pool_->ParallelFor(m, [&](size_t k) {
          size_t i = base + k;
          errors[i] = impl_->WriteChunk(pending, codec, group,
                                        reinterpret_cast<const uint8_t*>(staging[k].data()),
                                        chunk_len(i), &digests[i], &per[i]);
        });
      }
    }
    for (size_t i = 0; i < n; ++i) {
      RETURN_IF_ERROR(errors[i].WithContext(where));
      stats.Add(per[i]);
    }
    stats.chunks = n;
    record =
        BuildTensorRecord(meta, len, impl_->chunk_size_, digests, nullptr, DigestOfChunks(digests));
  }
  KillPoint("save.after_blocks");
  std::lock_guard<std::mutex> lock(impl_->mu_);
  pending->files[file].tensors[param] = std::move(record);
  pending->stats.Add(stats);
  return stats;
}

Result<WriteStats> Store::LinkTensor(const std::string& tag, const std::string& file,
                                     const std::string& param, const fb::TensorRecord& source,
                                     const std::optional<Placement>& placement) {
  if (impl_->node_) {
    return Status::NotSupported("linking " + TensorName(tag, file, param) +
                                " through the node writer; open the store on its own for that");
  }
  RETURN_IF_ERROR(ValidateFile(file));
  RETURN_IF_ERROR(ValidateParam(param));
  const std::string where = TensorName(tag, file, param);
  RETURN_IF_ERROR(CheckTensorRecord(source, where + " (link source)"));
  PendingTag* pending;
  {
    std::lock_guard<std::mutex> lock(impl_->mu_);
    ASSIGN_OR_RETURN(pending, impl_->PendingForSave(tag));
  }
  TensorMeta meta;
  meta.dtype = source.dtype();
  if (source.shape()) meta.shape.assign(source.shape()->begin(), source.shape()->end());
  meta.requires_grad = source.requires_grad();
  meta.placement = placement;
  WriteStats stats;
  stats.logical_bytes = source.byte_length();
  std::vector<Digest> digests;
  std::string record;
  if (source.inline_data()) {
    const uint8_t* p = source.inline_data()->data();
    record = BuildTensorRecord(meta, source.byte_length(), source.chunk_size(), {}, p,
                               Digest::Of(p, source.byte_length()));
  } else {
    for (const auto* c : *source.chunks()) digests.push_back(FromFb(*c));
    std::shared_lock<std::shared_mutex> gc_guard(impl_->gc_mu_);
    for (const Digest& d : digests) {
      ASSIGN_OR_RETURN(bool present, impl_->PinBlock(pending, d, Impl::PinMode::kIfPresent));
      if (!present) {
        return Status::NotFound(where + ": block " + d.Hex() +
                                " of the source record is not in the store");
      }
    }
    stats.chunks = digests.size();
    record = BuildTensorRecord(meta, source.byte_length(), source.chunk_size(), digests, nullptr,
                               DigestOfChunks(digests));
  }
  std::lock_guard<std::mutex> lock(impl_->mu_);
  pending->files[file].tensors[param] = std::move(record);
  pending->stats.Add(stats);
  return stats;
}

Status Store::PutFile(const std::string& tag, const std::string& file, std::string state_tree) {
  RETURN_IF_ERROR(ValidateFile(file));
  if (impl_->node_) return impl_->node_->PutFile(tag, file, state_tree);
  const fb::StateTree* tree = VerifiedStateTree(state_tree);
  if (tree == nullptr) {
    return Status::InvalidArgument("state tree of " + FileName(tag, file) +
                                   " is not a valid record");
  }
  // The checks a reader makes, before the tree is accepted: what would be
  // Corruption when read back is a bad argument now.
  std::vector<std::string> params;
  Status walk = CollectTreeTensors(*tree, state_tree.size(), FileName(tag, file), &params);
  if (!walk.ok()) return Status::InvalidArgument(walk.message());
  std::lock_guard<std::mutex> lock(impl_->mu_);
  ASSIGN_OR_RETURN(PendingTag * pending, impl_->PendingForSave(tag));
  pending->files[file].tree = std::move(state_tree);
  return Status::OK();
}

Status Store::ClearFile(const std::string& tag, const std::string& file) {
  if (impl_->node_) return impl_->node_->ClearFile(tag, file);
  std::lock_guard<std::mutex> lock(impl_->mu_);
  auto it = impl_->pending_.find(tag);
  if (it == impl_->pending_.end()) {
    return Status::FailedPrecondition("tag " + Quote(tag) + " is not being saved");
  }
  it->second.files.erase(file);
  return Status::OK();
}

// --- Commit, abort, delete ------------------------------------------------

void Store::AbortTag(const std::string& tag) {
  if (impl_->node_) {
    impl_->node_->Abort(tag);
    return;
  }
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->pending_.erase(tag);
}

Result<TagInfo> Store::CommitTag(const std::string& tag, const CommitOptions& options) {
  if (impl_->node_) return impl_->node_->Commit(tag, options);
  RETURN_IF_ERROR(impl_->WritableCheck("commit"));
  std::lock_guard<std::mutex> commit_lock(impl_->commit_mu_);
  PendingTag pending;
  {
    std::lock_guard<std::mutex> lock(impl_->mu_);
    auto it = impl_->pending_.find(tag);
    if (it == impl_->pending_.end()) {
      return Status::FailedPrecondition("commit of tag " + Quote(tag) +
                                        " without create; call create(" + Quote(tag) +
                                        ") and save its files first");
    }
    for (const auto& [file, pf] : it->second.files) {
      if (pf.tree.empty()) {
        return Status::FailedPrecondition("file " + Quote(file) + " of tag " + Quote(tag) +
                                          " has tensors but no state tree");
      }
    }
    pending = it->second;  // copy: stays pending if the commit fails
  }
  bool overwrite = options.overwrite || pending.overwrite;
  ASSIGN_OR_RETURN(auto existing, impl_->FindTag(tag));
  if (existing && !overwrite) {
    return Status::AlreadyExists("tag " + Quote(tag) + " is already committed (sequence " +
                                 std::to_string(existing->sequence) +
                                 "); delete it first or commit with overwrite enabled");
  }

  // Durability barrier: blocks written without the WAL reach their files.
  if (impl_->unflushed_blocks_.exchange(false)) {
    rocksdb::FlushOptions fo;
    fo.wait = true;
    fo.allow_write_stall = true;
    rocksdb::Status s = impl_->db_->Flush(fo, impl_->cf_.blocks);
    if (!s.ok()) {
      impl_->unflushed_blocks_ = true;
      return FromRocks(s, "flushing blocks before committing tag " + Quote(tag));
    }
  }
  KillPoint("commit.before_batch");

  TagInfo info;
  info.tag = tag;
  info.committed_at_ms = NowMs();
  info.parent_tag = pending.parent;
  info.layout = options.layout;
  info.new_bytes = pending.stats.new_bytes;
  info.new_blocks = pending.stats.new_blocks;
  info.stored_new_bytes = pending.stats.stored_new_bytes;
  if (options.restates) {
    info.parent_tag = options.restates->parent_tag;
    info.new_bytes += options.restates->new_bytes;
    info.new_blocks += options.restates->new_blocks;
    info.stored_new_bytes += options.restates->stored_new_bytes;
  }
  info.logical_bytes = pending.stats.logical_bytes;

  const ColumnFamilies& cf = impl_->cf_;
  rocksdb::WriteBatch batch;
  if (existing) {
    std::string prefix = TagPrefix(tag);
    std::string end = PrefixEnd(prefix);
    batch.DeleteRange(cf.tensors, prefix, end);
    batch.DeleteRange(cf.files, prefix, end);
  }
  for (const auto& [file, pf] : pending.files) {
    info.files.push_back(file);
    batch.Put(cf.files, FileKey(tag, file), pf.tree);
    for (const auto& [param, rec] : pf.tensors) {
      batch.Put(cf.tensors, TensorKey(tag, file, param), rec);
      info.tensors += 1;
    }
  }
  {
    std::lock_guard<std::mutex> lock(impl_->mu_);
    info.sequence = impl_->next_sequence_;
  }
  // Index entries only now: an indexed block is always a durable block.
  for (const auto& [d, index_value] : pending.unindexed) {
    batch.Put(cf.index, d.Key(), index_value);
  }
  batch.Put(cf.tags, tag, BuildCommitRecord(info));
  batch.Put(cf.meta, kNextSequenceKey, EncodeU64(info.sequence + 1));
  if (options.set_latest) batch.Put(cf.meta, kLatestKey, tag);
  rocksdb::WriteOptions wo;
  wo.sync = true;
  RETURN_IF_ERROR(FromRocks(impl_->db_->Write(wo, &batch), "committing tag " + Quote(tag)));
  KillPoint("commit.after_batch");
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->next_sequence_ = info.sequence + 1;
  for (const auto& entry : pending.unindexed) impl_->written_.erase(entry.first);
  impl_->pending_.erase(tag);
  return info;
}

Status Store::DeleteTag(const std::string& tag) {
  if (impl_->node_) {
    RETURN_IF_ERROR(ValidateTagLookup(tag));
    return impl_->node_->DeleteTag(tag);
  }
  RETURN_IF_ERROR(impl_->WritableCheck("delete"));
  RETURN_IF_ERROR(ValidateTagLookup(tag));
  std::lock_guard<std::mutex> commit_lock(impl_->commit_mu_);
  ASSIGN_OR_RETURN(auto found, impl_->FindTag(tag));
  if (!found) return impl_->TagNotFound(tag);
  const ColumnFamilies& cf = impl_->cf_;
  rocksdb::WriteBatch batch;
  std::string prefix = TagPrefix(tag);
  std::string end = PrefixEnd(prefix);
  batch.DeleteRange(cf.tensors, prefix, end);
  batch.DeleteRange(cf.files, prefix, end);
  batch.Delete(cf.tags, tag);
  ASSIGN_OR_RETURN(std::string latest, impl_->LatestTagUnlocked());
  if (latest == tag) {
    ASSIGN_OR_RETURN(auto tags, ListTags());
    const TagInfo* newest = nullptr;
    for (const auto& t : tags) {
      if (t.tag != tag) newest = &t;
    }
    if (newest) {
      batch.Put(cf.meta, kLatestKey, newest->tag);
    } else {
      batch.Delete(cf.meta, kLatestKey);
    }
  }
  rocksdb::WriteOptions wo;
  wo.sync = true;
  return FromRocks(impl_->db_->Write(wo, &batch), "deleting tag " + Quote(tag));
}

// --- Self-healing dedup ---------------------------------------------------

Status Store::Impl::ForgetBlocks(const std::vector<Digest>& bad) const {
  if (bad.empty() || options_.read_only) return Status::OK();
  rocksdb::WriteBatch batch;
  for (const Digest& d : bad) batch.Delete(cf_.index, d.Key());
  rocksdb::WriteOptions wo;
  wo.sync = true;
  RETURN_IF_ERROR(FromRocks(db_->Write(wo, &batch), "dropping index entries of bad blocks"));
  std::lock_guard<std::mutex> lock(mu_);
  for (const Digest& d : bad) written_.erase(d);
  return Status::OK();
}

}  // namespace ckptkv
