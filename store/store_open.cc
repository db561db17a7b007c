// Opening a store: Store::Open (with the retries of a read-only open), the
// checks that a directory is a ckptkv store, the write lock, the RocksDB
// options and column families (named handles), and the store header.
#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/file_system.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/options.h>
#include <rocksdb/slice.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include "store/node_client.h"
#include "store/node_wire.h"
#include "store/record_check.h"
#include "store/record_codec.h"
#include "store/store_internal.h"

namespace ckptkv {

namespace fs = std::filesystem;

namespace {

// Memtable size of the `blocks` column family.
constexpr size_t kBlockWriteBuffer = 16 << 20;

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

}  // namespace

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
  // The node writer's socket, lock and log are not the database's.
  bool empty = true;
  for (auto it = fs::directory_iterator(dir_, ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    if (!node::IsWriterFile(it->path().filename().string())) empty = false;
  }
  if (empty) {
    if (options_.read_only) return Status::NotFound("store '" + dir_ + "' is empty");
    return Status::OK();
  }
  if (!fs::exists(fs::path(dir_) / "CURRENT", ec)) {
    no_header_ = true;  // or a store its writer is creating
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
      no_header_ = true;  // or a store its writer is creating
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
    if (!IsKnownCodec(static_cast<uint8_t>(options_.codec))) {
      return Status::InvalidArgument("codec " +
                                     std::to_string(static_cast<uint8_t>(options_.codec)) +
                                     " is not known; " + ValidCodecs());
    }
    rocksdb::WriteBatch batch;
    batch.Put(
        cf_.meta, kHeaderKey,
        BuildStoreHeader(options_.chunk_size, options_.inline_threshold, options_.codec, NowMs()));
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
  if (!IsKnownCodec(h->codec())) {
    return Status::Corruption("store header (meta/header) has codec " + std::to_string(h->codec()) +
                              "; " + ValidCodecs());
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

Result<std::unique_ptr<Store>> Store::Open(const std::string& dir, const StoreOptions& options) {
  if (dir.empty()) return Status::InvalidArgument("store directory is empty; give a path");
  if (options.node.enabled && !options.read_only) {
    auto impl = std::make_unique<Impl>();
    impl->dir_ = dir;
    impl->options_ = options;
    ASSIGN_OR_RETURN(impl->node_, node::Client::Connect(dir, options));
    impl->chunk_size_ = impl->node_->chunk_size();
    impl->inline_threshold_ = impl->node_->inline_threshold();
    return std::unique_ptr<Store>(new Store(std::move(impl)));
  }
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
    // A node writer holds the lock until shortly after its last rank has
    // gone (NodeOptions::idle_exit_s): a writable open waits that out.
    std::error_code ec;
    const bool writer_leaving = !options.read_only && s.IsBusy() && attempt < 250 &&
                                fs::exists(fs::path(dir) / node::kSocketName, ec);
    if (writer_leaving) {
      impl.reset();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    if (!transient || attempt >= 10) return s;
    impl.reset();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace ckptkv
