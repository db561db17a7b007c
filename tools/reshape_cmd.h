// ckptkv synth / reshape / export-universal / import-universal: the
// command-line side of checkpoint/ (DeepSpeed layouts in the store).
#ifndef CKPTKV_TOOLS_RESHAPE_CMD_H_
#define CKPTKV_TOOLS_RESHAPE_CMD_H_

#include <optional>
#include <string>

#include <CLI/CLI.hpp>

namespace ckptkv::tools {

class CheckpointCommands {
 public:
  void Add(CLI::App& app);
  // The exit code of the subcommand that was given, if it is one of these.
  std::optional<int> Run();

 private:
  // reshape --naive: checkpoint::NaiveReshape (DeepSpeed's way), which
  // opens the store itself.
  int RunNaive();
  // place: checkpoint::PlaceTag.
  int RunPlace();

  CLI::App* synth_ = nullptr;
  CLI::App* reshape_ = nullptr;
  CLI::App* export_ = nullptr;
  CLI::App* import_ = nullptr;
  CLI::App* place_ = nullptr;
  std::string rules_file_;
  std::string db_, tag_, out_tag_, device_ = "cpu", dtype_ = "bf16";
  int tp_ = 1, pp_ = 1, dp_ = 1, zero_stage_ = 2;
  int layers_ = 4;
  int64_t hidden_ = 256, vocab_ = 1000, vocab_multiple_ = 1024, positions_ = 512;
  uint64_t seed_ = 1;
  int64_t iteration_ = 1000;
  bool plan_ = false, json_ = false, overwrite_ = false, naive_ = false;
  bool layer_files_ = false;           // PipelineModule layer files (synth, import-universal)
  std::string weights_ = "as-source";  // reshape --weights
};

}  // namespace ckptkv::tools

#endif  // CKPTKV_TOOLS_RESHAPE_CMD_H_
