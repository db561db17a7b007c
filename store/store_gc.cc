// Gc: mark the blocks every committed TensorRecord and every pending tag
// references, sweep the unreferenced ones from `index` and the presence
// records in one synced batch (with meta/gc_pending set), then flush and
// compact so that RocksDB drops their blob files.
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/slice.h>
#include <rocksdb/write_batch.h>

#include "store/kill_point.h"
#include "store/names.h"
#include "store/record_codec.h"
#include "store/store_internal.h"

namespace ckptkv {

namespace {

// Set by gc's delete batch, cleared after its compaction: a gc that died in
// between leaves it, and the next gc compacts even with nothing to delete.
constexpr const char* kGcPendingKey = "gc_pending";
// Gc relocates the live blocks of the oldest quarter of blob files.
constexpr double kGcBlobAgeCutoff = 0.25;

}  // namespace

Status Store::Impl::MarkLive(std::unordered_set<Digest, DigestHash>* live) const {
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), cf_.tensors));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    const std::string value = it->value().ToString();  // aligned for FlatBuffers
    const fb::TensorRecord* r = VerifiedTensorRecord(value);
    if (r == nullptr) {
      // Refuse to sweep on a damaged catalog: it could free live blocks.
      std::string_view parts[3];
      SplitKey(it->key().ToStringView(), 3, parts);
      return Status::Corruption("tensor record " + TensorName(parts[0], parts[1], parts[2]) +
                                " fails verification; gc refuses to run (see verify)");
    }
    if (r->chunks()) {
      for (const auto* c : *r->chunks()) live->insert(FromFb(*c));
    }
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "scanning tensor records"));
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [tag, p] : pending_) live->insert(p.pinned.begin(), p.pinned.end());
  return Status::OK();
}

Result<GcStats> Store::Gc(bool dry_run) {
  if (impl_->node_) {
    return Status::NotSupported("gc of store '" + impl_->dir_ +
                                "' while its node writer holds it; run gc when the job has ended");
  }
  if (!dry_run) RETURN_IF_ERROR(impl_->WritableCheck("gc"));
  std::lock_guard<std::mutex> commit_lock(impl_->commit_mu_);
  std::unique_lock<std::shared_mutex> gc_lock(impl_->gc_mu_);
  const ColumnFamilies& cf = impl_->cf_;
  GcStats stats;
  stats.disk_bytes_before = DiskBytes();
  std::unordered_set<Digest, DigestHash> live;
  RETURN_IF_ERROR(impl_->MarkLive(&live));
  rocksdb::WriteBatch batch;
  auto remove = [&](const Digest& d, uint32_t raw, uint32_t stored) {
    stats.blocks_removed++;
    stats.bytes_removed += raw;
    stats.stored_bytes_removed += stored;
    if (dry_run) return;
    batch.Delete(cf.blocks, PayloadKey(d));
    batch.Delete(cf.blocks, PresenceKey(d));
  };
  // Indexed blocks no committed or pending tag references.
  std::unordered_set<Digest, DigestHash> indexed;
  std::unique_ptr<rocksdb::Iterator> it(impl_->db_->NewIterator(rocksdb::ReadOptions(), cf.index));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    stats.blocks_scanned++;
    Digest d;
    uint32_t raw = 0, stored = 0;
    if (!Digest::FromKey(it->key().ToStringView(), &d)) {
      if (!dry_run) batch.Delete(cf.index, it->key());  // not ours
      continue;
    }
    indexed.insert(d);
    DecodeIndexValue(it->value().ToStringView(), &raw, &stored);
    if (live.count(d)) {
      stats.blocks_live++;
      continue;
    }
    if (!dry_run) batch.Delete(cf.index, it->key());
    remove(d, raw, stored);
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "scanning the block index"));
  // Blocks no commit indexed: left by saves that were aborted or did not
  // survive a crash. Found through their presence records.
  const std::string presence(1, kPresencePrefix);
  const std::string presence_end = PrefixEnd(presence);
  rocksdb::ReadOptions ro;
  rocksdb::Slice upper(presence_end);
  ro.iterate_upper_bound = &upper;
  std::vector<Digest> orphans;
  it.reset(impl_->db_->NewIterator(ro, cf.blocks));
  for (it->Seek(presence); it->Valid(); it->Next()) {
    Digest d;
    if (!Digest::FromKey(it->key().ToStringView().substr(1), &d) || indexed.count(d)) continue;
    stats.blocks_scanned++;
    if (live.count(d)) {
      stats.blocks_live++;
      continue;
    }
    uint32_t raw = 0, stored = 0;
    DecodeIndexValue(it->value().ToStringView(), &raw, &stored);
    remove(d, raw, stored);
    orphans.push_back(d);
  }
  RETURN_IF_ERROR(FromRocks(it->status(), "scanning block presence records"));
  it.reset();
  std::string marker;
  rocksdb::Status ms = impl_->db_->Get(rocksdb::ReadOptions(), cf.meta, kGcPendingKey, &marker);
  if (!ms.ok() && !ms.IsNotFound()) return FromRocks(ms, "reading meta/gc_pending");
  stats.resumed_compaction = ms.ok();
  if (dry_run || (stats.blocks_removed == 0 && !stats.resumed_compaction)) {
    stats.disk_bytes_after = stats.disk_bytes_before;
    return stats;
  }
  rocksdb::WriteOptions wo;
  wo.sync = true;
  batch.Put(cf.meta, kGcPendingKey, "1");
  RETURN_IF_ERROR(FromRocks(impl_->db_->Write(wo, &batch), "deleting unreferenced blocks"));
  KillPoint("gc.after_batch");
  {
    std::lock_guard<std::mutex> lock(impl_->mu_);
    for (const auto& d : orphans) impl_->written_.erase(d);
  }
  gc_lock.unlock();
  // Compact the block tables so that their references to dead blocks go:
  // blob files no table references any more are then deleted, and blob GC
  // relocates the live blocks of the oldest quarter of blob files (not the
  // whole store: each gc run compacts a little more).
  rocksdb::FlushOptions fo;
  RETURN_IF_ERROR(FromRocks(impl_->db_->Flush(fo, cf.blocks), "gc flush of blocks"));
  RETURN_IF_ERROR(FromRocks(impl_->db_->Flush(fo, cf.index), "gc flush of index"));
  rocksdb::CompactRangeOptions co;
  co.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForce;
  co.blob_garbage_collection_policy = rocksdb::BlobGarbageCollectionPolicy::kForce;
  co.blob_garbage_collection_age_cutoff = kGcBlobAgeCutoff;
  RETURN_IF_ERROR(FromRocks(impl_->db_->CompactRange(co, cf.blocks, nullptr, nullptr),
                            "gc compaction of blocks"));
  RETURN_IF_ERROR(FromRocks(impl_->db_->CompactRange(co, cf.index, nullptr, nullptr),
                            "gc compaction of index"));
  RETURN_IF_ERROR(
      FromRocks(impl_->db_->Delete(wo, cf.meta, kGcPendingKey), "clearing meta/gc_pending"));
  stats.disk_bytes_after = DiskBytes();
  return stats;
}

}  // namespace ckptkv
