#include "store/store.h"

#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/file_system.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/options.h>
#include <rocksdb/slice.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>

#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <cstring>
#include <map>
#include <set>
#include <shared_mutex>
#include <mutex>
#include <unordered_map>
#include <thread>
#include <unordered_set>

#include "store/file_lock.h"
#include "store/kill_point.h"
#include "store/names.h"
#include "store/record_check.h"
#include "store/size_math.h"
#include "store/thread_pool.h"

namespace ckptkv {

namespace fs = std::filesystem;

namespace {

constexpr const char* kHeaderKey = "header";
constexpr const char* kLatestKey = "latest";
constexpr const char* kNextSequenceKey = "next_sequence";
// Set by gc's delete batch, cleared after its compaction: a gc that died in
// between leaves it, and the next gc compacts even with nothing to delete.
constexpr const char* kGcPendingKey = "gc_pending";
// Blocks fetched by one MultiGet when reading a tensor.
constexpr size_t kReadBatch = 8;
// Memtable size of the `blocks` column family.
constexpr size_t kBlockWriteBuffer = 16 << 20;
// Gc relocates the live blocks of the oldest quarter of blob files.
constexpr double kGcBlobAgeCutoff = 0.25;

// Index value: raw length u32, stored length u32, codec u8 (little-endian).
constexpr size_t kIndexValueSize = 9;

// Keys in the `blocks` column family: the payload, and a small presence
// record (the index value) written in the same batch. Both are in one
// column family so that one flush persists both; gc finds blocks that no
// commit indexed by scanning the presence records, never the payloads.
constexpr char kPayloadPrefix = 'B';
constexpr char kPresencePrefix = 'P';
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

bool DecodeIndexValue(const rocksdb::Slice& v, uint32_t* raw, uint32_t* stored) {
  if (v.size() != kIndexValueSize) return false;
  uint32_t r = 0, s = 0;
  for (int i = 0; i < 4; ++i) {
    r |= static_cast<uint32_t>(static_cast<uint8_t>(v[i])) << (8 * i);
    s |= static_cast<uint32_t>(static_cast<uint8_t>(v[4 + i])) << (8 * i);
  }
  *raw = r;
  *stored = s;
  return static_cast<uint8_t>(v[8]) <= static_cast<uint8_t>(Codec::kZstd);
}

std::string EncodeU64(uint64_t x) {
  std::string v(8, '\0');
  for (int i = 0; i < 8; ++i) v[i] = static_cast<char>(x >> (8 * i));
  return v;
}

bool DecodeU64(const std::string& v, uint64_t* x) {
  if (v.size() != 8) return false;
  uint64_t r = 0;
  for (int i = 0; i < 8; ++i) r |= static_cast<uint64_t>(static_cast<uint8_t>(v[i])) << (8 * i);
  *x = r;
  return true;
}

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::OK();
  if (s.IsNotFound()) return Status::NotFound(what + ": " + s.ToString());
  if (s.IsCorruption()) return Status::Corruption(what + ": " + s.ToString());
  if (s.IsInvalidArgument()) return Status::InvalidArgument(what + ": " + s.ToString());
  return Status::IOError(what + ": " + s.ToString());
}

Digest FromFb(const fb::Digest128& d) { return Digest{d.lo(), d.hi()}; }

std::string JoinNames(const std::vector<std::string>& names, size_t max = 20) {
  if (names.empty()) return "(none)";
  std::string out;
  for (size_t i = 0; i < names.size() && i < max; ++i) {
    if (i) out += ", ";
    out += names[i];
  }
  if (names.size() > max) out += ", ... (" + std::to_string(names.size()) + " in all)";
  return out;
}

uint64_t DirBytes(const std::string& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    std::error_code ec2;
    if (it->is_regular_file(ec2)) total += it->file_size(ec2);
  }
  return total;
}

// Builds the StateTree-independent parts of a TensorRecord.
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

// Whole-tensor digest: XXH3-128 over the concatenated chunk digests.
Digest DigestOfChunks(const std::vector<Digest>& chunks) {
  std::string buf;
  buf.reserve(chunks.size() * 16);
  for (const auto& d : chunks) buf += d.Key();
  return Digest::Of(buf.data(), buf.size());
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

}  // namespace

void WriteStats::Add(const WriteStats& o) {
  logical_bytes += o.logical_bytes;
  chunks += o.chunks;
  new_blocks += o.new_blocks;
  new_bytes += o.new_bytes;
  stored_new_bytes += o.stored_new_bytes;
}

// ---------------------------------------------------------------------------

struct PendingFile {
  std::string tree;                            // empty until PutFile
  std::map<std::string, std::string> tensors;  // param -> TensorRecord bytes
};

struct PendingTag {
  bool overwrite = false;
  std::string parent;
  std::map<std::string, PendingFile> files;
  std::unordered_set<Digest, DigestHash> pinned;  // every digest referenced
  // Referenced blocks that the index does not list yet (digest -> index
  // value): the commit batch indexes them.
  std::unordered_map<Digest, std::string, DigestHash> unindexed;
  WriteStats stats;
};

// The column families of a store (docs/format.md), filled by name at open.
struct ColumnFamilies {
  rocksdb::ColumnFamilyHandle* meta = nullptr;
  rocksdb::ColumnFamilyHandle* blocks = nullptr;
  rocksdb::ColumnFamilyHandle* index = nullptr;
  rocksdb::ColumnFamilyHandle* tensors = nullptr;
  rocksdb::ColumnFamilyHandle* files = nullptr;
  rocksdb::ColumnFamilyHandle* tags = nullptr;
};

// The column families of a store by name, in the order of docs/format.md,
// and the member of ColumnFamilies that holds each one's handle.
struct NamedColumnFamily {
  const char* name;
  rocksdb::ColumnFamilyHandle* ColumnFamilies::*handle;
};
constexpr NamedColumnFamily kColumnFamilies[] = {
    {"meta", &ColumnFamilies::meta},   {"blocks", &ColumnFamilies::blocks},
    {"index", &ColumnFamilies::index}, {"tensors", &ColumnFamilies::tensors},
    {"files", &ColumnFamilies::files}, {"tags", &ColumnFamilies::tags},
};

class Store::Impl {
 public:
  std::string dir_;
  StoreOptions options_;
  std::unique_ptr<FileLock> lock_;
  std::unique_ptr<rocksdb::Env> env_;
  std::unique_ptr<rocksdb::DB> db_;
  // Every handle RocksDB opened (the default column family too), destroyed
  // at close; code uses cf_.
  std::vector<rocksdb::ColumnFamilyHandle*> owned_handles_;
  ColumnFamilies cf_;
  bool no_header_ = false;  // a read-only open found no header
  uint32_t chunk_size_ = 0;
  uint32_t inline_threshold_ = 0;
  Codec codec_ = Codec::kRaw;
  std::unique_ptr<ThreadPool> pool_;

  // --- Locks ---------------------------------------------------------------
  // Lock order: commit_mu_, then gc_mu_, then mu_. A thread that holds one
  // of them takes only those after it, never one before it:
  //   commit_mu_  outermost; held across RocksDB reads, writes, flushes and
  //               compactions (all of CommitTag, DeleteTag and Gc).
  //   gc_mu_      shared: a chunk write or link, across its index lookup
  //               and block write; exclusive: Gc, inside commit_mu_, across
  //               its scans and its delete batch.
  //   mu_         innermost, a leaf: held only for in-memory work. Nothing
  //               is locked while it is held, and it is never held across a
  //               RocksDB call, file I/O, a kill point or pool_->ParallelFor.
  // No store mutex is held across pool_->ParallelFor: its WriteChunk tasks
  // take gc_mu_ and mu_ themselves.

  // Guards pending_ (and every PendingTag in it: PutTensor keeps a pointer
  // to one and touches it only under mu_), written_ and next_sequence_;
  // unflushed_blocks_ is set under it together with written_.
  mutable std::mutex mu_;
  std::map<std::string, PendingTag> pending_;
  // Blocks this process wrote that no commit has indexed yet (digest ->
  // index value), so that saves of other pending tags dedup against them.
  mutable std::unordered_map<Digest, std::string, DigestHash> written_;
  uint64_t next_sequence_ = 1;
  // Set when blocks were written without the WAL and not yet flushed.
  std::atomic<bool> unflushed_blocks_{false};
  mutable std::atomic<uint64_t> block_bytes_read_{0};
  // Guards the catalog (`tags`, `files`, `tensors`, meta/latest,
  // meta/next_sequence, meta/gc_pending) against concurrent writers: one
  // commit, delete or gc at a time; also the commit's flush of `blocks`.
  std::mutex commit_mu_;
  // Guards the step from a save's dedup decision to its pin against Gc's
  // mark and sweep: chunk writes and links hold it shared from their dedup
  // check to their pin; Gc holds it exclusively from marking to its delete
  // batch, so it never deletes a block a concurrent save has just decided
  // to reuse.
  std::shared_mutex gc_mu_;

  ~Impl() {
    if (db_) {
      for (auto* h : owned_handles_) db_->DestroyColumnFamilyHandle(h);
      db_->Close();
      db_.reset();
    }
  }

  Status Open();
  Status CheckIsStore();
  Status OpenColumnFamilies();
  Status LoadOrCreateHeader();
  Status WritableCheck(const char* op) const {
    if (options_.read_only) {
      return Status::FailedPrecondition(std::string(op) + " needs a writable store; '" + dir_ +
                                        "' was opened read-only");
    }
    return Status::OK();
  }
  // Whether a commit has indexed the block (reads only `index`).
  Result<bool> IsIndexed(const Digest& d) const {
    std::string v;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), cf_.index, d.Key(), &v);
    if (s.IsNotFound()) return false;
    if (!s.ok()) return FromRocks(s, "index lookup of block " + d.Hex());
    return true;
  }
  // Pins block `d` for `pending`, so that Gc keeps it (gc_mu_ must be held
  // shared until the pin is in place or undone). True when the store holds
  // the block already: pinned by this tag before, written by a save not yet
  // committed (then listed for this tag's commit to index), or indexed.
  // False when it does not: `d` is pinned and the caller writes the block
  // or calls UnpinBlock. On an error nothing is pinned.
  Result<bool> PinBlock(PendingTag* pending, const Digest& d);
  void UnpinBlock(PendingTag* pending, const Digest& d);
  Status WriteChunk(PendingTag* pending, const uint8_t* data, size_t len, Digest* out,
                    WriteStats* stats);
  // The pending tag a save writes into; mu_ must be held.
  Result<PendingTag*> PendingForSave(const std::string& tag) {
    auto it = pending_.find(tag);
    if (it == pending_.end()) {
      return Status::FailedPrecondition("save into tag " + Quote(tag) +
                                        " without create; call create(" + Quote(tag) + ") first");
    }
    return &it->second;
  }
  Result<std::string> LatestTagUnlocked() const;
  Result<std::optional<TagInfo>> FindTag(const std::string& tag) const;
  Status TagNotFound(const std::string& tag) const;
  Status MarkLive(std::unordered_set<Digest, DigestHash>* live) const;
  // What verify found of one block; empty `what` = sound.
  struct BlockVerdict {
    std::string what;
    bool bad = false;      // missing, unreadable or not matching its digest
    bool read = false;     // its payload was read
    bool indexed = false;  // it has an index entry
  };
  using BlockVerdicts = std::unordered_map<Digest, BlockVerdict, DigestHash>;
  void VerifyTag(const std::string& tag, VerifyReport* report, BlockVerdicts* checked,
                 const VerifyOptions& options) const;
  BlockVerdict CheckBlock(const Digest& d, uint64_t len, std::vector<uint8_t>* buf) const;
  // Drops the index entries of blocks found bad (one synced batch), so that
  // the next save of their bytes writes them again. No-op when read-only.
  Status ForgetBlocks(const std::vector<Digest>& bad) const;
  // A new read-only view of this store (for confirming what a read-only
  // view found wrong).
  Result<std::unique_ptr<Store>> FreshView() const {
    StoreOptions o = options_;
    o.create_if_missing = false;
    o.read_only = true;
    return Store::Open(dir_, o);
  }
  // The chunks of [offset, offset+len) of a checked record; *missing tells
  // whether a block was not found.
  Status ReadChunks(const fb::TensorRecord& r, uint64_t offset, uint64_t len, uint8_t* dst,
                    const std::string& where, bool* missing) const;
};

Status Store::Impl::CheckIsStore() {
  std::error_code ec;
  if (!fs::exists(dir_, ec)) {
    if (!options_.create_if_missing || options_.read_only) {
      return Status::NotFound("store '" + dir_ + "' does not exist");
    }
    fs::create_directories(dir_, ec);
    if (ec) return Status::IOError("cannot create store directory '" + dir_ + "': " + ec.message());
    return Status::OK();
  }
  if (!fs::is_directory(dir_, ec)) {
    return Status::InvalidArgument("'" + dir_ +
                                   "' is not a directory; a store is a directory made by ckptkv");
  }
  bool empty = fs::is_empty(dir_, ec);
  if (empty) {
    if (options_.read_only) return Status::NotFound("store '" + dir_ + "' is empty");
    return Status::OK();
  }
  if (!fs::exists(fs::path(dir_) / "CURRENT", ec)) {
    return Status::InvalidArgument(
        "'" + dir_ +
        "' is not a ckptkv store: it is a non-empty directory without a database; "
        "give a new or empty directory, or one created by ckptkv");
  }
  std::vector<std::string> cfs;
  rocksdb::Status s = rocksdb::DB::ListColumnFamilies(rocksdb::DBOptions(), dir_, &cfs);
  if (!s.ok()) {
    return Status::InvalidArgument("'" + dir_ +
                                   "' is not a readable ckptkv store: " + s.ToString());
  }
  for (const NamedColumnFamily& want : kColumnFamilies) {
    if (std::find(cfs.begin(), cfs.end(), want.name) == cfs.end()) {
      return Status::InvalidArgument("'" + dir_ +
                                     "' is a RocksDB database but not a ckptkv store (no '" +
                                     want.name + "' column family)");
    }
  }
  return Status::OK();
}

Status Store::Impl::Open() {
  RETURN_IF_ERROR(CheckIsStore());
  if (!options_.read_only) {
    ASSIGN_OR_RETURN(lock_, FileLock::Acquire(dir_));
  }
  RETURN_IF_ERROR(OpenColumnFamilies());
  RETURN_IF_ERROR(LoadOrCreateHeader());
  pool_ = std::make_unique<ThreadPool>(options_.threads);
  return Status::OK();
}

Status Store::Impl::OpenColumnFamilies() {
  rocksdb::DBOptions dbo;
  dbo.create_if_missing = true;
  dbo.create_missing_column_families = true;
  // No atomic_flush: a block and its presence record share one column
  // family, and index entries are written by the commit after the blocks
  // are flushed, so no two column families need to flush together.
  dbo.max_background_jobs = 4;
  dbo.bytes_per_sync = 8 << 20;
  dbo.wal_bytes_per_sync = 8 << 20;
  dbo.keep_log_file_num = 4;
  dbo.max_total_wal_size = 1ull << 30;
  dbo.avoid_flush_during_shutdown = false;
  // No automatic resume after a background I/O error: RocksDB 7.8's
  // recovery thread can abort or hang the process when the store closes
  // (reproduced by tests/crash "[rocksdb-close]"). After such an error the
  // store fails writes until it is reopened.
  dbo.max_bgerror_resume_count = 0;
  if (options_.file_system) {
    env_ = rocksdb::NewCompositeEnv(options_.file_system);
    dbo.env = env_.get();
  }

  rocksdb::BlockBasedTableOptions small_table;
  small_table.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
  rocksdb::ColumnFamilyOptions small;
  small.table_factory.reset(rocksdb::NewBlockBasedTableFactory(small_table));
  small.write_buffer_size = 16 << 20;
  small.compression = rocksdb::kNoCompression;

  // Payloads go to blob files at flush; the memtables only stage them, so
  // they are kept small (peak memory of a save) but deep enough to keep
  // the disk busy while one flushes.
  rocksdb::ColumnFamilyOptions blocks = small;
  blocks.write_buffer_size = kBlockWriteBuffer;
  blocks.max_write_buffer_number = 3;
  blocks.enable_blob_files = true;
  blocks.min_blob_size = 4096;
  blocks.blob_file_size = 256 << 20;
  blocks.blob_compression_type = rocksdb::kNoCompression;
  // Blocks are deleted only by Gc. Automatic blob GC would relocate live
  // blobs at every compaction (measured: 1.5x the bytes of a full save
  // written), so it runs only in Gc's own compaction.
  blocks.enable_blob_garbage_collection = false;

  std::vector<rocksdb::ColumnFamilyDescriptor> descs = {{rocksdb::kDefaultColumnFamilyName, small}};
  for (const NamedColumnFamily& cf : kColumnFamilies) {
    descs.emplace_back(cf.name, cf.handle == &ColumnFamilies::blocks ? blocks : small);
  }
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s;
  if (options_.read_only) {
    s = rocksdb::DB::OpenForReadOnly(dbo, dir_, descs, &owned_handles_, &raw);
  } else {
    s = rocksdb::DB::Open(dbo, dir_, descs, &owned_handles_, &raw);
  }
  if (!s.ok()) return FromRocks(s, "opening store '" + dir_ + "'");
  db_.reset(raw);
  for (rocksdb::ColumnFamilyHandle* h : owned_handles_) {
    for (const NamedColumnFamily& cf : kColumnFamilies) {
      if (h->GetName() == cf.name) cf_.*cf.handle = h;
    }
  }
  for (const NamedColumnFamily& cf : kColumnFamilies) {
    if (cf_.*cf.handle == nullptr) {
      return Status::IOError("opening store '" + dir_ + "': column family '" + cf.name +
                             "' has no handle");
    }
  }
  return Status::OK();
}

Status Store::Impl::LoadOrCreateHeader() {
  std::string bytes;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), cf_.meta, kHeaderKey, &bytes);
  if (s.IsNotFound()) {
    if (options_.read_only) {
      no_header_ = true;
      return Status::InvalidArgument("'" + dir_ +
                                     "' has no ckptkv header; it is not a ckptkv store");
    }
    if (options_.chunk_size < 4096 || options_.chunk_size > kMaxChunkSize) {
      return Status::InvalidArgument("chunk size " + std::to_string(options_.chunk_size) +
                                     " is out of range; valid: 4096 to 268435456 bytes");
    }
    if (options_.inline_threshold > options_.chunk_size) {
      return Status::InvalidArgument("inline threshold must not exceed the chunk size");
    }
    flatbuffers::FlatBufferBuilder b;
    auto alg = b.CreateString(kHashAlgorithm);
    b.Finish(fb::CreateStoreHeader(b, kFormatVersion, alg, options_.chunk_size,
                                   options_.inline_threshold, static_cast<uint8_t>(options_.codec),
                                   NowMs()));
    rocksdb::WriteBatch batch;
    batch.Put(cf_.meta, kHeaderKey,
              rocksdb::Slice(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize()));
    batch.Put(cf_.meta, kNextSequenceKey, EncodeU64(1));
    rocksdb::WriteOptions wo;
    wo.sync = true;
    RETURN_IF_ERROR(FromRocks(db_->Write(wo, &batch), "writing store header"));
    chunk_size_ = options_.chunk_size;
    inline_threshold_ = options_.inline_threshold;
    codec_ = options_.codec;
    next_sequence_ = 1;
    return Status::OK();
  }
  RETURN_IF_ERROR(FromRocks(s, "reading store header"));
  const fb::StoreHeader* h = VerifiedStoreHeader(bytes);
  if (h == nullptr) return Status::Corruption("store header (meta/header) fails verification");
  if (h->format_version() > kFormatVersion) {
    return Status::NotSupported(
        "store '" + dir_ + "' has format version " + std::to_string(h->format_version()) +
        "; this ckptkv reads versions up to " + std::to_string(kFormatVersion));
  }
  if (!h->hash_algorithm() || h->hash_algorithm()->str() != kHashAlgorithm) {
    return Status::NotSupported("store uses an unknown hash algorithm");
  }
  if (h->chunk_size() < 4096 || h->chunk_size() > kMaxChunkSize) {
    return Status::Corruption("store header (meta/header) has chunk_size " +
                              std::to_string(h->chunk_size()) + "; valid: 4096 to " +
                              std::to_string(kMaxChunkSize));
  }
  if (h->inline_threshold() > h->chunk_size()) {
    return Status::Corruption("store header (meta/header) has inline_threshold " +
                              std::to_string(h->inline_threshold()) + " above its chunk_size " +
                              std::to_string(h->chunk_size()));
  }
  if (h->codec() > static_cast<uint8_t>(Codec::kZstd)) {
    return Status::Corruption("store header (meta/header) has codec " + std::to_string(h->codec()) +
                              "; valid: 0 (raw) or 1 (zstd)");
  }
  chunk_size_ = h->chunk_size();
  inline_threshold_ = h->inline_threshold();
  codec_ = static_cast<Codec>(h->codec());
  std::string seq;
  s = db_->Get(rocksdb::ReadOptions(), cf_.meta, kNextSequenceKey, &seq);
  if (!s.ok() || !DecodeU64(seq, &next_sequence_) || next_sequence_ == 0 ||
      next_sequence_ == UINT64_MAX) {
    return Status::Corruption("store meta/next_sequence is missing or malformed");
  }
  return Status::OK();
}

Store::Store(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Store::~Store() = default;

Result<std::unique_ptr<Store>> Store::Open(const std::string& dir, const StoreOptions& options) {
  if (dir.empty()) return Status::InvalidArgument("store directory is empty; give a path");
  // A read-only open beside a writer that is itself opening (replaying and
  // deleting its log) or compacting can see a half-made view: the header
  // not there yet, a file that just went. Such opens are retried briefly.
  for (int attempt = 0;; ++attempt) {
    auto impl = std::make_unique<Impl>();
    impl->dir_ = dir;
    impl->options_ = options;
    Status s = impl->Open();
    if (s.ok()) return std::unique_ptr<Store>(new Store(std::move(impl)));
    const bool transient = options.read_only && (s.code() == Status::Code::kIOError ||
                                                 s.IsCorruption() || impl->no_header_);
    if (!transient || attempt >= 10) return s;
    impl.reset();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

const std::string& Store::dir() const { return impl_->dir_; }
uint32_t Store::chunk_size() const { return impl_->chunk_size_; }
uint32_t Store::inline_threshold() const { return impl_->inline_threshold_; }
bool Store::read_only() const { return impl_->options_.read_only; }
uint64_t Store::DiskBytes() const { return DirBytes(impl_->dir_); }

// --- Writing ----------------------------------------------------------------

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

Status Store::BeginTag(const std::string& tag, bool overwrite) {
  RETURN_IF_ERROR(impl_->WritableCheck("create"));
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
  p.parent = parent;
  return Status::OK();
}

bool Store::IsPending(const std::string& tag) const {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  return impl_->pending_.count(tag) > 0;
}

Result<bool> Store::Impl::PinBlock(PendingTag* pending, const Digest& d) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!pending->pinned.insert(d).second) return true;  // already handled in this tag
    auto w = written_.find(d);
    if (w != written_.end()) {  // written by a save not yet committed
      pending->unindexed[d] = w->second;
      return true;
    }
  }
  Result<bool> indexed = IsIndexed(d);
  if (!indexed.ok()) UnpinBlock(pending, d);
  return indexed;
}

void Store::Impl::UnpinBlock(PendingTag* pending, const Digest& d) {
  // A failed write must not let a retry of this tag skip the chunk.
  std::lock_guard<std::mutex> lock(mu_);
  pending->pinned.erase(d);
}

Status Store::Impl::WriteChunk(PendingTag* pending, const uint8_t* data, size_t len, Digest* out,
                               WriteStats* stats) {
  Digest d = Digest::Of(data, len);
  *out = d;
  std::shared_lock<std::shared_mutex> gc_guard(gc_mu_);
  ASSIGN_OR_RETURN(bool present, PinBlock(pending, d));
  if (present) return Status::OK();
  // The payload goes to RocksDB straight from the tensor's memory (raw) or
  // from the compressed buffer: no encoded copy of the chunk is made.
  std::string compressed;
  Codec codec =
      codec_ == Codec::kZstd && CompressBlock(data, len, &compressed) ? Codec::kZstd : Codec::kRaw;
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
  Status st = FromRocks(db_->Write(wo, &batch), "writing block " + d.Hex());
  if (!st.ok()) {
    UnpinBlock(pending, d);
    return st;
  }
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

Result<WriteStats> Store::PutTensor(const std::string& tag, const std::string& file,
                                    const std::string& param, const TensorMeta& meta,
                                    const ByteSource& bytes) {
  RETURN_IF_ERROR(ValidateFile(file));
  RETURN_IF_ERROR(ValidateParam(param));
  PendingTag* pending;
  {
    std::lock_guard<std::mutex> lock(impl_->mu_);
    ASSIGN_OR_RETURN(pending, impl_->PendingForSave(tag));
  }
  const std::string where = TensorName(tag, file, param);
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

  WriteStats stats;
  stats.logical_bytes = bytes.length;
  std::string record;
  const uint64_t len = bytes.length;
  if (len <= impl_->inline_threshold_) {
    std::string buf(len, '\0');
    if (len) {
      if (bytes.data) {
        std::memcpy(buf.data(), bytes.data, len);
      } else {
        RETURN_IF_ERROR(bytes.fill(0, len, reinterpret_cast<uint8_t*>(buf.data())));
      }
    }
    const auto* p = reinterpret_cast<const uint8_t*>(buf.data());
    record = BuildTensorRecord(meta, len, impl_->chunk_size_, {}, p, Digest::Of(p, len));
  } else {
    const uint64_t cs = impl_->chunk_size_;
    const size_t n = (len + cs - 1) / cs;
    std::vector<Digest> digests(n);
    std::vector<Status> errors(n);
    std::vector<WriteStats> per(n);
    auto chunk_len = [&](size_t i) { return std::min<uint64_t>(cs, len - i * cs); };
    if (bytes.data) {
      impl_->pool_->ParallelFor(n, [&](size_t i) {
        errors[i] =
            impl_->WriteChunk(pending, bytes.data + i * cs, chunk_len(i), &digests[i], &per[i]);
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
          errors[i] =
              impl_->WriteChunk(pending, reinterpret_cast<const uint8_t*>(staging[k].data()),
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
      ASSIGN_OR_RETURN(bool present, impl_->PinBlock(pending, d));
      if (!present) {
        impl_->UnpinBlock(pending, d);
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
  if (VerifiedStateTree(state_tree) == nullptr) {
    return Status::InvalidArgument("state tree of " + FileName(tag, file) +
                                   " is not a valid record");
  }
  std::lock_guard<std::mutex> lock(impl_->mu_);
  ASSIGN_OR_RETURN(PendingTag * pending, impl_->PendingForSave(tag));
  pending->files[file].tree = std::move(state_tree);
  return Status::OK();
}

Status Store::ClearFile(const std::string& tag, const std::string& file) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  auto it = impl_->pending_.find(tag);
  if (it == impl_->pending_.end()) {
    return Status::FailedPrecondition("tag " + Quote(tag) + " is not being saved");
  }
  it->second.files.erase(file);
  return Status::OK();
}

void Store::AbortTag(const std::string& tag) {
  std::lock_guard<std::mutex> lock(impl_->mu_);
  impl_->pending_.erase(tag);
}

Result<TagInfo> Store::CommitTag(const std::string& tag, const CommitOptions& options) {
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

// --- Reading ----------------------------------------------------------------

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

uint64_t Store::BlockBytesRead() const { return impl_->block_bytes_read_.load(); }

// --- Maintenance --------------------------------------------------------------

Status Store::DeleteTag(const std::string& tag) {
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
    DecodeIndexValue(it->value(), &raw, &stored);
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
    DecodeIndexValue(it->value(), &raw, &stored);
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

void Store::Impl::VerifyTag(const std::string& tag, VerifyReport* report, BlockVerdicts* checked,
                            const VerifyOptions& options) const {
  auto problem = [&](std::string file, std::string param, std::string digest, std::string what) {
    report->problems.push_back(
        VerifyProblem{tag, std::move(file), std::move(param), std::move(digest), std::move(what)});
  };
  auto info_or = FindTag(tag);
  if (!info_or.ok()) {
    problem("", "", "", info_or.status().ToString());
    return;
  }
  if (!info_or.value()) return;  // deleted by a writer since it was listed
  const TagInfo& info = **info_or;
  report->tags++;
  std::string prefix = TagPrefix(tag);
  std::string end = PrefixEnd(prefix);
  rocksdb::ReadOptions ro;
  rocksdb::Slice upper(end);
  ro.iterate_upper_bound = &upper;

  // Tensor records, by file: each must pass its checks.
  std::map<std::string, std::set<std::string>> params_of;
  uint64_t records = 0;
  std::vector<std::string> good_bytes;
  std::vector<std::pair<std::string, std::string>> good_names;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro, cf_.tensors));
  for (it->Seek(prefix); it->Valid(); it->Next()) {
    std::string_view parts[3];
    if (!SplitKey(it->key().ToStringView(), 3, parts)) {
      problem("", "", "", "malformed tensor key " + Quote(it->key().ToStringView()));
      continue;
    }
    std::string file(parts[1]), param(parts[2]);
    records++;
    report->tensors++;
    params_of[file].insert(param);
    const fb::TensorRecord* r = nullptr;
    std::string value = it->value().ToString();  // aligned for FlatBuffers
    Status s = VerifyTensorRecordBytes(value, "record", &r);
    if (!s.ok()) {
      problem(file, param, "", s.message());
      continue;
    }
    good_bytes.push_back(std::move(value));
    good_names.emplace_back(file, param);
  }
  if (!it->status().ok()) {
    problem("", "", "", "tensor records cannot be scanned: " + it->status().ToString());
    return;
  }
  it.reset();

  // Files: every file the commit record lists has a tree that decodes
  // within its limits, and every tensor node of it has a record.
  std::set<std::string> files_seen;
  std::unique_ptr<rocksdb::Iterator> fit(db_->NewIterator(ro, cf_.files));
  for (fit->Seek(prefix); fit->Valid(); fit->Next()) {
    std::string file = fit->key().ToString().substr(prefix.size());
    files_seen.insert(file);
    report->files++;
    const std::string bytes = fit->value().ToString();  // aligned for FlatBuffers
    std::vector<std::string> paths;
    Status ts = VerifyStateTreeBytes(bytes, "state tree", "state tree fails verification", &paths);
    if (!ts.ok()) {
      problem(file, "", "", ts.message());
      continue;
    }
    const std::set<std::string>& params = params_of[file];
    std::set<std::string> distinct(paths.begin(), paths.end());
    for (const auto& p : distinct) {
      if (!params.count(p)) problem(file, p, "", "state tree names a tensor that has no record");
    }
  }
  if (!fit->status().ok()) {
    problem("", "", "", "state trees cannot be scanned: " + fit->status().ToString());
  }
  fit.reset();
  for (const auto& f : info.files) {
    if (!files_seen.count(f)) problem(f, "", "", "file listed by the commit record is missing");
  }
  for (const auto& f : files_seen) {
    if (std::find(info.files.begin(), info.files.end(), f) == info.files.end()) {
      problem(f, "", "", "file is not listed by the commit record");
    }
  }
  for (const auto& [f, params] : params_of) {
    if (!files_seen.count(f)) problem(f, "", "", "tensor records of a file without a state tree");
  }
  if (records != info.tensors) {
    problem("", "", "",
            "commit record says " + std::to_string(info.tensors) + " tensors, the tag has " +
                std::to_string(records) + " records");
  }

  // Blocks: each referenced chunk decodes to its digest and is indexed.
  std::vector<uint8_t> buf;
  for (size_t k = 0; k < good_bytes.size(); ++k) {
    const fb::TensorRecord* r = flatbuffers::GetRoot<fb::TensorRecord>(good_bytes[k].data());
    const auto& [file, param] = good_names[k];
    if (!r->chunks()) continue;  // inline: checked with the record
    const uint64_t cs = r->chunk_size();
    for (size_t i = 0; i < r->chunks()->size(); ++i) {
      Digest d = FromFb(*r->chunks()->Get(i));
      const uint64_t clen = std::min<uint64_t>(cs, r->byte_length() - i * cs);
      auto c = checked->find(d);
      if (c == checked->end()) {
        BlockVerdict v = CheckBlock(d, clen, &buf);
        if (v.read) {
          report->blocks_checked++;
          report->bytes_checked += clen;
        }
        if (options.progress) options.progress(clen);
        c = checked->emplace(d, std::move(v)).first;
      }
      if (!c->second.what.empty()) {
        problem(file, param, d.Hex(), c->second.what + " (chunk " + std::to_string(i) + ")");
        report->damaged_tags.insert(tag);
      }
    }
  }
  if (!report->problems.empty() && report->problems.back().tag == tag) {
    report->damaged_tags.insert(tag);
  }
}

Store::Impl::BlockVerdict Store::Impl::CheckBlock(const Digest& d, uint64_t len,
                                                  std::vector<uint8_t>* buf) const {
  BlockVerdict v;
  std::string value;
  rocksdb::Status rs = db_->Get(rocksdb::ReadOptions(), cf_.blocks, PayloadKey(d), &value);
  std::string idx;
  rocksdb::Status is = db_->Get(rocksdb::ReadOptions(), cf_.index, d.Key(), &idx);
  uint32_t raw = 0, stored = 0;
  if (rs.IsNotFound()) {
    v.what = "block is missing";
    v.bad = true;
  } else if (!rs.ok()) {
    v.what = "block cannot be read: " + rs.ToString();
    v.bad = true;
  } else {
    v.read = true;
    buf->resize(len);
    Status ds = DecodeBlock(value, buf->data(), len);
    if (!ds.ok()) {
      v.what = ds.message();
      v.bad = true;
    } else if (Digest::Of(buf->data(), len) != d) {
      v.what = "block bytes do not match their digest";
      v.bad = true;
    }
  }
  if (!v.bad) {
    if (is.IsNotFound()) {
      v.what = "block has no index entry";
    } else if (!is.ok()) {
      v.what = "index entry cannot be read: " + is.ToString();
    } else if (!DecodeIndexValue(idx, &raw, &stored) || raw != len) {
      v.what = "index entry is malformed or names another length";
    }
  }
  v.indexed = is.ok();
  return v;
}

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

Result<VerifyReport> Store::Verify(const std::optional<std::string>& tag) const {
  VerifyOptions o;
  o.tag = tag;
  return Verify(o);
}

Result<VerifyReport> Store::Verify(const VerifyOptions& options) const {
  if (options.repair) RETURN_IF_ERROR(impl_->WritableCheck("verify --repair"));
  VerifyReport report;
  Impl::BlockVerdicts checked;
  std::vector<std::string> names;
  if (options.tag) {
    RETURN_IF_ERROR(GetTag(*options.tag).status());
    names.push_back(*options.tag);
  } else {
    std::unique_ptr<rocksdb::Iterator> it(
        impl_->db_->NewIterator(rocksdb::ReadOptions(), impl_->cf_.tags));
    for (it->SeekToFirst(); it->Valid(); it->Next()) names.push_back(it->key().ToString());
    RETURN_IF_ERROR(FromRocks(it->status(), "listing the tags of store '" + dir() + "'"));
  }
  for (const auto& t : names) impl_->VerifyTag(t, &report, &checked, options);
  if (!report.ok() && read_only()) {
    // A read-only view beside a live writer is not consistent (see
    // ReadTensorRange): a problem counts only if a fresh view of the
    // damaged tags shows it too.
    ASSIGN_OR_RETURN(auto fresh, impl_->FreshView());
    VerifyReport confirmed;
    Impl::BlockVerdicts again;
    VerifyOptions quiet = options;
    quiet.progress = nullptr;
    for (const auto& t : report.damaged_tags) fresh->impl_->VerifyTag(t, &confirmed, &again, quiet);
    std::vector<VerifyProblem> kept;
    for (auto& p : report.problems) {
      if (!report.damaged_tags.count(p.tag)) kept.push_back(std::move(p));
    }
    for (auto& p : confirmed.problems) kept.push_back(std::move(p));
    report.problems = std::move(kept);
    report.damaged_tags = confirmed.damaged_tags;
  }
  if (options.repair) {
    std::vector<Digest> bad;
    for (const auto& [d, v] : checked) {
      if (v.bad && v.indexed) bad.push_back(d);
    }
    RETURN_IF_ERROR(impl_->ForgetBlocks(bad));
    report.blocks_forgotten = bad.size();
  }
  return report;
}

}  // namespace ckptkv
