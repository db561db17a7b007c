// Store: a content-addressed checkpoint store on RocksDB.
//
// A store is a directory holding one RocksDB database with the column
// families `meta`, `blocks`, `index`, `tensors`, `files` and `tags`
// (docs/format.md). Tensor bytes are cut into fixed-size chunks aligned to
// the start of each tensor; a chunk is stored once, keyed by the XXH3-128
// digest of its bytes. A tag becomes visible only through CommitTag, which
// writes every record of the tag in one synced WriteBatch: after a crash a
// tag is either wholly there or not there.
//
// Writing: BeginTag, then PutTensor / PutFile for each file, then CommitTag
// (or AbortTag). Blocks are written by PutTensor, before the commit; they
// are made durable before the commit batch is written. Blocks of a tag that
// is never committed are garbage that Gc reclaims.
//
// Thread-safety: every method may be called from several threads; the
// calls for one pending tag must not race with each other. One process at a
// time may open a store for writing (Open fails with Busy otherwise);
// several processes write one store through its node writer (NodeOptions).
#ifndef CKPTKV_STORE_STORE_H_
#define CKPTKV_STORE_STORE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "schema/records.h"
#include "store/block_codec.h"
#include "store/digest.h"
#include "store/status.h"

namespace rocksdb {
class FileSystem;
}

namespace ckptkv {

namespace node {
class Writer;
}

// Where the bytes of new blocks are made durable before a commit.
enum class BlockDurability {
  kFlush,  // blocks skip the WAL; the commit flushes them to blob files first
  kWal,    // blocks go through the WAL; the commit's synced write covers them
};

// Several processes writing one store: the rank processes of a training
// job on one node (docs/architecture.md, "One store per node"). With
// `enabled`, Store::Open does not open the database itself: it connects to
// the store's node writer (the `ckptkvd` process that owns it, started by
// the first rank that opens the store and gone when its last client has
// closed), sends it the chunks the store does not have yet through shared
// memory, and reads through a read-only view of its own. A tag then
// commits when all `world_size` ranks have committed it; a rank that
// closes or dies before its commit aborts the tag for all of them.
struct NodeOptions {
  bool enabled = false;
  int32_t rank = 0;        // this process's rank among the writers, 0..world_size-1
  int32_t world_size = 1;  // the ranks that save and commit each tag together
  // A commit waits this long for the other ranks' commits, then aborts
  // the tag and names the ranks it waited for.
  double commit_timeout_s = 600;
  // The writer program; empty = $CKPTKV_WRITER, else `ckptkvd` beside
  // this library or program (or its ../bin), else on PATH.
  std::string writer_program;
  // Chunk-sized shared-memory slots of this process (1 to 64): the bytes
  // in flight to the writer.
  uint32_t ring_slots = 8;
  // A writer this process starts exits this long after its last client.
  double idle_exit_s = 2;
};

// The node options the environment gives: rank and world size from
// LOCAL_RANK with LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (DeepSpeed's
// launcher), else OMPI_COMM_WORLD_LOCAL_RANK / _LOCAL_SIZE (Open MPI),
// else RANK / WORLD_SIZE (the node's ranks on a single node); enabled when the world size is above
// 1; the commit timeout from CKPTKV_COMMIT_TIMEOUT (seconds). InvalidArgument for values that are
// not numbers or a rank outside the world.
Result<NodeOptions> NodeOptionsFromEnv();

struct StoreOptions {
  bool create_if_missing = true;
  // Opens without the write lock; every writing call fails.
  bool read_only = false;
  // Settings of a new store (an existing store keeps its own).
  uint32_t chunk_size = 1u << 20;
  uint32_t inline_threshold = 4096;
  // Default codec of new blocks (kept in the header; BeginOptions::codec
  // overrides it for one tag). kGroupedZstd needs a reader of codec 2.
  Codec codec = Codec::kRaw;
  BlockDurability block_durability = BlockDurability::kFlush;
  // Hashing / encoding workers; 0 = min(4, hardware threads).
  size_t threads = 0;
  // Block reads in flight while reading tensors (ReadTensors) and during
  // Verify; 0 = kDefaultReadThreads. Reads wait on the device, not the CPU,
  // so this is larger than `threads`. Each read worker holds at most two
  // chunk-sized buffers during a read.
  size_t read_threads = 0;
  // Replaces the local file system (tests inject faults through it).
  std::shared_ptr<rocksdb::FileSystem> file_system;
  // Join the node writer instead of opening the database here (above).
  NodeOptions node;
};

struct PlacementSegment {
  std::string param;
  int64_t start = 0;
  int64_t numel = 0;
  int64_t shard_start = 0;
};

// See schema/ckptkv.fbs (table Placement).
struct Placement {
  std::vector<int64_t> global_shape;
  std::vector<int64_t> offsets;
  int32_t flat_group = -1;
  int64_t flat_offset = 0;
  int64_t flat_numel = 0;
  std::string param;
  std::string state;
  std::vector<int64_t> shard_shape;
  std::vector<PlacementSegment> segments;
  int32_t tp_rank = -1;
  int32_t tp_degree = -1;
  int32_t shard_dim = -1;
};

struct TensorMeta {
  fb::DType dtype = fb::DType::Float32;
  std::vector<int64_t> shape;
  bool requires_grad = false;
  std::optional<Placement> placement;
};

// The bytes of one tensor: host memory, or a callback that copies
// [offset, offset+len) into a host buffer (e.g. from a GPU).
struct ByteSource {
  uint64_t length = 0;
  const uint8_t* data = nullptr;
  std::function<Status(uint64_t offset, uint64_t len, uint8_t* dst)> fill;
};

inline constexpr size_t kDefaultReadThreads = 16;

// One byte range of a tensor to read (Store::ReadTensors).
struct TensorRead {
  const fb::TensorRecord* record = nullptr;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint8_t* dst = nullptr;  // `length` bytes
  std::string where;       // names the tensor in errors
};

struct WriteStats {
  uint64_t logical_bytes = 0;     // bytes of the tensors written
  uint64_t chunks = 0;            // chunks hashed
  uint64_t new_blocks = 0;        // chunks not already in the store
  uint64_t new_bytes = 0;         // their raw bytes
  uint64_t stored_new_bytes = 0;  // their encoded bytes
  void Add(const WriteStats& o);
};

struct Layout {
  int32_t tp = 0, pp = 0, dp = 0, zero_stage = -1;
};

// Options of one pending tag (BeginTag).
struct BeginOptions {
  bool overwrite = false;  // the tag may replace a committed tag of the same name
  // Codec of the tag's new blocks; unset = the store's (its header's codec).
  // Blocks the store already holds are reused as they are, whatever their codec.
  std::optional<Codec> codec;
  // Through a node writer: the writer records the placements of the
  // committed tag's DeepSpeed files (checkpoint::PlaceTag, which sees the
  // files of every rank) before the commit returns. Ignored otherwise.
  bool place_after_commit = false;
};

struct TagInfo {
  std::string tag;
  int64_t committed_at_ms = 0;
  uint64_t sequence = 0;
  std::vector<std::string> files;
  uint64_t tensors = 0;
  uint64_t logical_bytes = 0;
  uint64_t new_bytes = 0;
  uint64_t new_blocks = 0;
  uint64_t stored_new_bytes = 0;
  std::string parent_tag;
  std::optional<Layout> layout;
};

struct CommitOptions {
  bool overwrite = false;  // replace a committed tag of the same name
  bool set_latest = true;  // point `latest` at this tag
  std::optional<Layout> layout;
  // The record of the tag this commit restates in place (its records
  // rewritten, its bytes linked, e.g. placements added afterwards): the
  // new record keeps its parent_tag and new_* counts instead of the
  // pending tag's.
  std::optional<TagInfo> restates;
};

// A verified record and the bytes it lives in.
class TensorRecordRef {
 public:
  TensorRecordRef() = default;
  explicit TensorRecordRef(std::string bytes) : bytes_(std::move(bytes)) {}
  const fb::TensorRecord* get() const {
    return flatbuffers::GetRoot<fb::TensorRecord>(bytes_.data());
  }
  const fb::TensorRecord* operator->() const { return get(); }
  const std::string& bytes() const { return bytes_; }

 private:
  std::string bytes_;
};

struct GcStats {
  uint64_t blocks_scanned = 0;
  uint64_t blocks_live = 0;
  uint64_t blocks_removed = 0;
  uint64_t bytes_removed = 0;         // raw bytes of removed blocks
  uint64_t stored_bytes_removed = 0;  // encoded bytes of removed blocks
  uint64_t disk_bytes_before = 0;
  uint64_t disk_bytes_after = 0;  // same as before for a dry run
  // An earlier gc died between its delete batch and its compaction; this
  // one compacted (or, in a dry run, would compact) to finish it.
  bool resumed_compaction = false;
};

struct VerifyProblem {
  std::string tag, file, param;
  std::string digest;  // hex, empty for record-level problems
  std::string what;
};

struct VerifyReport {
  uint64_t tags = 0, files = 0, tensors = 0;
  uint64_t blocks_checked = 0, bytes_checked = 0;
  std::vector<VerifyProblem> problems;
  std::set<std::string> damaged_tags;  // tags with at least one problem
  uint64_t blocks_forgotten = 0;       // repair: bad blocks whose index entry was dropped
  bool ok() const { return problems.empty(); }
};

struct VerifyOptions {
  std::optional<std::string> tag;  // one tag, or all
  // Drop the index entries of bad or missing blocks (one synced batch), so
  // that the next save of their bytes writes them again. Needs a writable
  // store. Damaged tags stay damaged until their bytes are saved again.
  bool repair = false;
  // Called with the raw bytes of each block checked.
  std::function<void(uint64_t)> progress;
};

class Store {
 public:
  // Opens (or creates) the store in `dir`. Errors: InvalidArgument when dir
  // is not a ckptkv store, Busy when another process holds it, NotSupported
  // for a newer format version.
  static Result<std::unique_ptr<Store>> Open(const std::string& dir, const StoreOptions& options);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  const std::string& dir() const;
  uint32_t chunk_size() const;
  uint32_t inline_threshold() const;
  bool read_only() const;

  // --- Writing a tag --------------------------------------------------
  // Starts a pending tag. Fails if the tag is committed and !overwrite.
  Status BeginTag(const std::string& tag, bool overwrite = false);
  Status BeginTag(const std::string& tag, const BeginOptions& options);
  bool IsPending(const std::string& tag) const;
  // Stores a tensor's blocks and stages its record. Returns what it cost.
  Result<WriteStats> PutTensor(const std::string& tag, const std::string& file,
                               const std::string& param, const TensorMeta& meta,
                               const ByteSource& bytes);
  // Stages a record that names the same bytes as `source`, a record of a
  // committed tag of this store (or of this pending tag), with its own
  // placement: no block is read or written. NotFound if a block is gone.
  Result<WriteStats> LinkTensor(const std::string& tag, const std::string& file,
                                const std::string& param, const fb::TensorRecord& source,
                                const std::optional<Placement>& placement);
  // Stages the state tree of a file. Replaces an earlier PutFile of the same
  // file in this pending tag, together with its tensors.
  Status PutFile(const std::string& tag, const std::string& file, std::string state_tree);
  // Drops the staged records of `file` (before re-saving it).
  Status ClearFile(const std::string& tag, const std::string& file);
  // Makes the pending tag visible atomically and durably.
  Result<TagInfo> CommitTag(const std::string& tag, const CommitOptions& options);
  // Forgets a pending tag; its new blocks become garbage for Gc.
  void AbortTag(const std::string& tag);

  // --- Reading ----------------------------------------------------------
  Result<std::vector<TagInfo>> ListTags() const;  // ordered by commit sequence
  Result<TagInfo> GetTag(const std::string& tag) const;
  // The tag `latest` points at, if any.
  Result<std::optional<std::string>> Latest() const;
  Result<std::vector<std::string>> ListFiles(const std::string& tag) const;
  // The verified StateTree bytes of a committed file.
  Result<std::string> GetFileTree(const std::string& tag, const std::string& file) const;
  Result<std::vector<std::string>> ListParams(const std::string& tag,
                                              const std::string& file) const;
  Result<TensorRecordRef> GetTensorRecord(const std::string& tag, const std::string& file,
                                          const std::string& param) const;
  // Reads all bytes of a tensor into dst (record.byte_length bytes), checking
  // every chunk against its digest. `where` names the tensor in errors.
  Status ReadTensor(const fb::TensorRecord& record, uint8_t* dst, uint64_t len,
                    const std::string& where) const;
  // Reads bytes [offset, offset+len) of a tensor, fetching and checking only
  // the chunks that hold them.
  Status ReadTensorRange(const fb::TensorRecord& record, uint64_t offset, uint64_t len,
                         uint8_t* dst, const std::string& where) const;
  // Reads several ranges at once: the chunks of all of them are fetched and
  // checked on the read workers (StoreOptions::read_threads in flight), in
  // the order given, and each is decoded straight into its destination.
  // Give a tag's tensors in their saved order and the reads follow the
  // order of the blocks on disk. Returns the first error in that order;
  // the destinations of failed ranges are then unspecified.
  Status ReadTensors(const std::vector<TensorRead>& reads) const;
  // Raw bytes of the blocks read by ReadTensor / ReadTensorRange / ReadTensors since open.
  uint64_t BlockBytesRead() const;

  // --- Maintenance ------------------------------------------------------
  // Removes a committed tag in one batch; moves `latest` to the newest
  // remaining tag if it pointed at this one.
  Status DeleteTag(const std::string& tag);
  // Mark and sweep of blocks no committed or pending tag references.
  Result<GcStats> Gc(bool dry_run = false);
  // Checks the tag (or every tag) as a loader would need it: the commit
  // record and its counts, every state tree (decoded within its limits,
  // each tensor node with a record), every tensor record, and every block
  // it references (re-hashed, indexed). Problems are listed, not returned
  // as errors; an error means the store's metadata could not be scanned.
  Result<VerifyReport> Verify(const std::optional<std::string>& tag = std::nullopt) const;
  Result<VerifyReport> Verify(const VerifyOptions& options) const;
  // Bytes of the store's files on disk.
  uint64_t DiskBytes() const;

  class Impl;
  // Whether this store writes through a node writer (NodeOptions).
  bool through_node_writer() const;

 private:
  friend class node::Writer;
  explicit Store(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ckptkv

#endif  // CKPTKV_STORE_STORE_H_
