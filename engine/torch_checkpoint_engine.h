// TorchCheckpointEngine: the baseline. One file per path through LibTorch
// serialization (torch::pickle_save, the zip format torch.load reads), as
// DeepSpeed's TorchCheckpointEngine does with torch.save. Logs through
// spdlog: "Saving ...", "Saved ...", "Checkpoint ... is ready now!".
//
// Differences from DeepSpeed's, all for a fair comparison: commit fsyncs the
// files of the tag (config.fsync) and writes <save_dir>/latest when
// save_latest is set, as DeepSpeed's save_checkpoint does after commit.
// Loading uses LibTorch's C++ unpickler, which runs no code.
#ifndef CKPTKV_ENGINE_TORCH_CHECKPOINT_ENGINE_H_
#define CKPTKV_ENGINE_TORCH_CHECKPOINT_ENGINE_H_

#include <map>
#include <vector>

#include "engine/checkpoint_engine.h"

namespace ckptkv {

struct TorchEngineConfig {
  bool fsync = true;
};

class TorchCheckpointEngine : public CheckpointEngine {
 public:
  explicit TorchCheckpointEngine(TorchEngineConfig config = {});

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

 private:
  TorchEngineConfig config_;
  std::map<std::string, std::string> save_dirs_;           // tag -> save_dir
  std::map<std::string, std::vector<std::string>> files_;  // tag -> files written
};

}  // namespace ckptkv

#endif  // CKPTKV_ENGINE_TORCH_CHECKPOINT_ENGINE_H_
