// Store::Impl and what the store_*.cc files share; not part of the public
// contract (store/store.h). The operations live in one file each, as
// RocksDB splits db_impl/:
//
//   store.cc          Store and Impl lifetime, accessors, shared helpers
//   store_open.cc     Open, header, column families, write lock, retries
//   store_write.cc    BeginTag, PutTensor, LinkTensor, PutFile, CommitTag,
//                     AbortTag, DeleteTag; block pins; ForgetBlocks
//   store_read.cc     tags, files, state trees, tensor records, ReadTensor
//   store_gc.cc       Gc (mark and sweep of blocks)
//   store_verify.cc   Verify
//   record_codec.cc   the bytes of records, index values and keys (pure)
#ifndef CKPTKV_STORE_STORE_INTERNAL_H_
#define CKPTKV_STORE_STORE_INTERNAL_H_

#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/slice.h>
#include <rocksdb/status.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "store/block_codec.h"
#include "store/digest.h"
#include "store/file_lock.h"
#include "store/status.h"
#include "store/store.h"
#include "store/thread_pool.h"

namespace ckptkv {

namespace node {
class Client;
}

// Keys of the `meta` column family.
inline constexpr const char* kHeaderKey = "header";
inline constexpr const char* kLatestKey = "latest";
inline constexpr const char* kNextSequenceKey = "next_sequence";

// RocksDB's status as ours, `what` saying what was being done.
Status FromRocks(const rocksdb::Status& s, const std::string& what);
// Milliseconds since the Unix epoch.
int64_t NowMs();
// The checks of PutTensor's arguments (names, dtype, shape against the
// byte count), before anything is hashed or written.
Status CheckPutTensor(const std::string& where, const std::string& file, const std::string& param,
                      const TensorMeta& meta, const ByteSource& bytes);
// The record of a tensor small enough to go inline (bytes.length at most
// the inline threshold): its bytes taken from `bytes`.
Result<std::string> InlineTensorRecord(const TensorMeta& meta, const ByteSource& bytes,
                                       uint32_t chunk_size);
// "a, b, c" (the first `max`), or "(none)": names listed in a message.
std::string JoinNames(const std::vector<std::string>& names, size_t max = 20);

// Buffers a block-reading worker reuses from one block to the next, so
// that a read does not fault in fresh pages for every block: at most one
// set per worker exists during a ReadTensors or Verify call.
struct ReadBuffers {
  rocksdb::PinnableSlice value;
  std::vector<uint8_t> scratch;  // a chunk decoded whole for part of it
  std::vector<uint8_t> grouped;  // DecodeBlock's buffer for grouped blocks
};

class BufferPool {
 public:
  std::unique_ptr<ReadBuffers> Take();
  void Give(std::unique_ptr<ReadBuffers> b);

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<ReadBuffers>> free_;
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

struct PendingFile {
  std::string tree;                            // empty until PutFile
  std::map<std::string, std::string> tensors;  // param -> TensorRecord bytes
};

struct PendingTag {
  bool overwrite = false;
  std::optional<Codec> codec;  // codec of new blocks; unset = the store's
  std::string parent;
  std::map<std::string, PendingFile> files;
  std::unordered_set<Digest, DigestHash> pinned;  // every digest referenced
  // Referenced blocks that the index does not list yet (digest -> index
  // value): the commit batch indexes them.
  std::unordered_map<Digest, std::string, DigestHash> unindexed;
  WriteStats stats;
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
  // Through a node writer (StoreOptions::node): the connection, and the
  // read-only views reads go to; db_ is then not opened here.
  std::unique_ptr<node::Client> node_;
  // A read-only open found no header, no database in a non-empty directory
  // or column families missing: a store being created, which a reader
  // beside its writer retries briefly.
  bool no_header_ = false;
  uint32_t chunk_size_ = 0;
  uint32_t inline_threshold_ = 0;
  Codec codec_ = Codec::kRaw;
  std::unique_ptr<ThreadPool> pool_;
  // ReadPool(); read_pool_mu_ is a leaf lock held only to create it.
  mutable std::mutex read_pool_mu_;
  mutable std::unique_ptr<ThreadPool> read_pool_;

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

  ~Impl();

  // store_open.cc
  Status Open();
  Status CheckIsStore();
  Status OpenColumnFamilies();
  Status LoadOrCreateHeader();

  // store.cc
  Status WritableCheck(const char* op) const;
  // A new read-only view of this store (for confirming what a read-only
  // view found wrong).
  Result<std::unique_ptr<Store>> FreshView() const;

  // store_write.cc
  // The pending tag a save writes into; mu_ must be held.
  Result<PendingTag*> PendingForSave(const std::string& tag);
  // Whether a commit has indexed the block (reads only `index`).
  Result<bool> IsIndexed(const Digest& d) const;
  // Pins block `d` for `pending`, so that Gc keeps it (gc_mu_ must be held
  // shared until the pin is in place or undone). True when the store holds
  // the block already: pinned by this tag before, written by a save not yet
  // committed (then listed for this tag's commit to index), or indexed.
  // False when it does not. With kClaim (a write) `d` is then pinned and
  // the caller writes the block or calls UnpinBlock; with kIfPresent (a
  // link) nothing is pinned, so no concurrent write of the same bytes can
  // take the pin for a block that is not there. On an error nothing is
  // pinned.
  enum class PinMode { kClaim, kIfPresent };
  Result<bool> PinBlock(PendingTag* pending, const Digest& d, PinMode mode);
  void UnpinBlock(PendingTag* pending, const Digest& d);
  // Writes one chunk unless the store holds it; new blocks are encoded
  // with `codec`, grouped by `element_size` (GroupElementSize).
  Status WriteChunk(PendingTag* pending, Codec codec, uint32_t element_size, const uint8_t* data,
                    size_t len, Digest* out, WriteStats* stats);
  // Writes block `d` (the digest of the `len` bytes at `data`), which
  // PinBlock(kClaim) found missing and pinned for `pending`; gc_mu_ held
  // shared. On an error the caller unpins it.
  Status WriteClaimed(PendingTag* pending, Codec codec, uint32_t element_size, const uint8_t* data,
                      size_t len, const Digest& d, WriteStats* stats);
  // Drops the index entries of blocks found bad (one synced batch), so that
  // the next save of their bytes writes them again. No-op when read-only.
  Status ForgetBlocks(const std::vector<Digest>& bad) const;

  // store_read.cc
  Result<std::string> LatestTagUnlocked() const;
  Result<std::optional<TagInfo>> FindTag(const std::string& tag) const;
  Status TagNotFound(const std::string& tag) const;
  // The workers of block reads (ReadTensors, Verify), started at the first
  // read: a store that only writes never starts them.
  ThreadPool& ReadPool() const;
  // Reads the encoded block `d`. RocksDB's own checksums are off: every
  // caller checks the decoded bytes against the digest, which covers what
  // they would (and Debian's RocksDB computes CRC32c in software: a third
  // of the CPU time of a read).
  rocksdb::Status GetBlock(const Digest& d, rocksdb::PinnableSlice* value) const;
  // The chunks of checked, non-inline, non-empty ranges.
  Status ReadChunks(const std::vector<TensorRead>& reads) const;

  // store_gc.cc
  Status MarkLive(std::unordered_set<Digest, DigestHash>* live) const;

  // store_verify.cc
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
  BlockVerdict CheckBlock(const Digest& d, uint64_t len, BufferPool* buffers) const;
};

}  // namespace ckptkv

#endif  // CKPTKV_STORE_STORE_INTERNAL_H_
