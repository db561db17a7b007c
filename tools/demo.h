// `ckptkv demo`: trains a small LibTorch model, checkpoints it through
// KvCheckpointEngine (and, for comparison, as plain files through
// TorchCheckpointEngine), then resumes from the latest checkpoint and
// checks that training continues bit-exactly.
#ifndef CKPTKV_TOOLS_DEMO_H_
#define CKPTKV_TOOLS_DEMO_H_

#include <cstdint>
#include <string>

namespace ckptkv::tools {

struct DemoOptions {
  std::string db = "./ckptkv-demo";  // the store
  int steps = 48;                    // training steps of the uninterrupted run
  int every = 4;                     // checkpoint interval
  int64_t vocab = 32768;             // frozen embedding rows
  int64_t dim = 256;                 // embedding width
  int64_t hidden = 768;              // MLP width
  int64_t batch = 256;
  bool keep_files = false;  // keep the plain-file checkpoints
  bool verbose = false;     // engine log lines
};

// Returns the process exit code: 0 on success, 3 if the resumed run's
// losses differ from the uninterrupted run's.
int RunDemo(const DemoOptions& options);

}  // namespace ckptkv::tools

#endif  // CKPTKV_TOOLS_DEMO_H_
