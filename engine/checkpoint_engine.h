// CheckpointEngine: DeepSpeed's checkpoint engine interface in C++.
//
// The call sequence is DeepSpeed's: makedirs(save_dir, exist_ok=true),
// create(tag), save(state, "<save_dir>/<tag>/<file>") for each file,
// commit(tag); and for reading open(load_dir) (absent tag or "latest" =
// most recent committed checkpoint), load(path, map_location), close(tag).
// Both DeepSpeed API generations are accepted: create/commit take a tag
// string (<= 0.16) or a CommitInfo (>= 0.17).
//
// State dicts are LibTorch values (c10::IValue): nested dicts, lists,
// tuples, tensors, ints, doubles, bools, strings, devices and None. load
// returns the structure, types, dtypes, shapes and bytes that were saved.
//
// Errors are thrown as ckptkv::StatusError (store/status.h) whose message
// names the tag, file or parameter at fault. Not thread-safe: one engine is
// driven by one thread, as DeepSpeed does.
#ifndef CKPTKV_ENGINE_CHECKPOINT_ENGINE_H_
#define CKPTKV_ENGINE_CHECKPOINT_ENGINE_H_

#include <ATen/core/ivalue.h>
#include <c10/core/Device.h>

#include <optional>
#include <string>

#include "store/status.h"

namespace ckptkv {

struct CommitInfo {
  std::string tag;
  std::string save_dir;
  bool save_latest = true;
};

// Where load puts tensors: nullopt = the device each tensor was saved from.
using MapLocation = std::optional<c10::Device>;

class CheckpointEngine {
 public:
  virtual ~CheckpointEngine() = default;

  const std::string& name() const { return name_; }

  // "About to save tag". create(tag) needs the save_dir from an earlier
  // makedirs / create(save_dir, tag), or a configured store.
  virtual void create(const std::string& tag) = 0;
  virtual void create(const std::string& save_dir, const std::string& tag) = 0;
  void create(const CommitInfo& info) { create(info.save_dir, info.tag); }

  virtual void makedirs(const std::string& path, bool exist_ok = false) = 0;
  // Persists one logical file "<save_dir>/<tag>/<file>" of the created tag.
  virtual void save(const c10::IValue& state_dict, const std::string& path) = 0;
  // All files of the tag are saved: make the tag durable and visible.
  // Returns true; failures throw.
  virtual bool commit(const std::string& tag) = 0;
  virtual bool commit(const CommitInfo& info) = 0;

  // Opens a checkpoint for reading. tag absent or "latest" = the most recent
  // committed tag. Returns the tag opened, or nullopt if none exists.
  virtual std::optional<std::string> open(const std::string& load_dir,
                                          const std::optional<std::string>& tag = std::nullopt) = 0;
  virtual c10::IValue load(const std::string& path, MapLocation map_location = std::nullopt) = 0;
  virtual void close(const std::string& tag) = 0;

 protected:
  explicit CheckpointEngine(std::string name) : name_(std::move(name)) {}

 private:
  std::string name_;
};

}  // namespace ckptkv

#endif  // CKPTKV_ENGINE_CHECKPOINT_ENGINE_H_
