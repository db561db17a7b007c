// KvCheckpointEngine: the CheckpointEngine backed by a ckptkv Store.
//
// A path "<save_dir>/<tag>/<file>" maps to (tag, file) in the store; file
// may contain '/' (e.g. "zero/<param>/fp32.pt") when save_dir is known from
// create(save_dir, tag), otherwise it is the last path component. The rank
// is part of the file name, as DeepSpeed names files (mp_rank_00_..., ...).
// The store lives in config.db, or in save_dir / load_dir when db is empty.
//
// save writes only the chunks the store does not have yet; commit makes the
// tag visible in one synced batch and (unless save_latest is false) moves
// `latest`. With config.placer set, save records where each tensor sits in
// its global tensor (fragment placements, docs/fragments.md), so that
// reshape queries can plan without loading files. Re-committing an existing tag fails with
// AlreadyExists unless config.overwrite is set, in which case the new tag replaces it atomically.
#ifndef CKPTKV_ENGINE_KV_CHECKPOINT_ENGINE_H_
#define CKPTKV_ENGINE_KV_CHECKPOINT_ENGINE_H_

#include <functional>
#include <map>
#include <memory>
#include <set>

#include "engine/checkpoint_engine.h"
#include "store/store.h"

namespace ckptkv {

// Says which fragment of which global tensor each tensor of a saved file
// is. checkpoint::DeepSpeedPlacer does it for DeepSpeed's file names.
class TensorPlacer {
 public:
  using Placements = std::map<const c10::TensorImpl*, Placement>;
  virtual ~TensorPlacer() = default;
  // Placements of the tensors of `state`, about to be saved as `file` of
  // the pending `tag`; tensors left out are stored without one. A placer
  // that cannot place a file returns nothing (and says why in the log):
  // placements are an index, never a reason to fail a save.
  virtual Placements Place(const std::string& tag, const std::string& file,
                           const c10::IValue& state) = 0;
  // `tag` was just committed to `store` (before EndTag): a placer that
  // could not place some files at save time (their placements depend on a
  // file saved after them) may place the committed tag now. An error is
  // logged by the caller; the commit stands either way.
  virtual Status AfterCommit(Store& store, const std::string& tag) {
    (void)store;
    (void)tag;
    return Status::OK();
  }
  // `tag` was committed or abandoned: drop what was kept for it.
  virtual void EndTag(const std::string& tag) { (void)tag; }
};

struct KvEngineConfig {
  std::string db;      // store directory; empty = the save_dir / load_dir given
  StoreOptions store;  // options for opening (and creating) the store
  bool overwrite = false;
  std::shared_ptr<TensorPlacer> placer;  // none: tensors are stored without placements
  // save() returns once the tensors are copied into snapshot buffers;
  // hashing and writing run in the background and commit() waits for them
  // (engine/async_saver.h). A tag whose background writes failed is
  // aborted by its commit, which raises the error.
  bool async_save = false;
  // Snapshot buffers the async saves may hold; 0 = a quarter of the
  // machine's memory. A file larger than that is written synchronously.
  uint64_t async_buffer_bytes = 0;
  // Unless store.node is enabled already, take the node options from the
  // environment (NodeOptionsFromEnv: LOCAL_RANK / LOCAL_WORLD_SIZE, RANK /
  // WORLD_SIZE): the ranks of a job on one node then write one store
  // through its node writer, and each tag commits when all of them have
  // committed it. One process (no world size above 1) opens the store
  // itself, as before.
  bool node_from_env = true;
};

// What the last save or commit cost.
struct SaveReport {
  WriteStats stats;
  uint64_t tensors = 0;
};

struct EncodedState;
class AsyncSaver;

// The store half of KvCheckpointEngine::save, shared with the Python
// package: replaces `file` of the pending `tag` by the encoded value, each
// tensor stored with its placement (when `placements` has one). Errors
// name tag/file:param.
// Stores the tensors of `encoded` and its tree as `file` of the pending
// `tag` (replacing an earlier save of the file). `before_tensor(i)`, when
// given, runs before tensor i is stored (the async saver waits there for
// its snapshot); its error ends the save.
Result<SaveReport> SaveEncodedFile(Store& store, const std::string& tag, const std::string& file,
                                   EncodedState encoded, const TensorPlacer::Placements& placements,
                                   const std::function<Status(size_t)>& before_tensor = {});

class KvCheckpointEngine : public CheckpointEngine {
 public:
  explicit KvCheckpointEngine(KvEngineConfig config = {});
  ~KvCheckpointEngine() override;

  using CheckpointEngine::create;
  void create(const std::string& tag) override;
  void create(const std::string& save_dir, const std::string& tag) override;
  void makedirs(const std::string& path, bool exist_ok = false) override;
  void save(const c10::IValue& state_dict, const std::string& path) override;
  bool commit(const std::string& tag) override;
  bool commit(const CommitInfo& info) override;
  std::optional<std::string> open(const std::string& load_dir,
                                  const std::optional<std::string>& tag = std::nullopt) override;
  c10::IValue load(const std::string& path, MapLocation map_location = std::nullopt) override;
  void close(const std::string& tag) override;

  // The store, once a path or config.db has named it (nullptr before).
  Store* store() const { return store_.get(); }
  const SaveReport& last_save() const { return last_save_; }
  const TagInfo& last_commit() const { return last_commit_; }
  // Seconds the last save() blocked its caller (with async_save, the
  // snapshot; else the whole save).
  double last_save_blocked_seconds() const { return last_blocked_s_; }
  // Whether the last save() left its writes to the background (false for a
  // synchronous save, and for an async one too large for the buffer pool).
  bool last_save_background() const { return last_background_; }

 private:
  struct Target {
    std::string tag;
    std::string file;
  };
  Store& EnsureStore(const std::string& dir_hint);
  Target ResolvePath(const std::string& path, bool for_load) const;

  KvEngineConfig config_;
  std::unique_ptr<Store> store_;
  std::map<std::string, std::string> save_dirs_;  // pending tag -> save_dir
  std::string last_dir_;                          // last save_dir / load_dir seen
  std::set<std::string> open_tags_;
  SaveReport last_save_;
  TagInfo last_commit_;
  double last_blocked_s_ = 0;
  bool last_background_ = false;
  // With async_save, after store_ (destroyed first: it writes into it).
  std::unique_ptr<AsyncSaver> saver_;
};

}  // namespace ckptkv

#endif  // CKPTKV_ENGINE_KV_CHECKPOINT_ENGINE_H_
