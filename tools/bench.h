// `ckptkv bench`: KvCheckpointEngine against raw sequential writes and
// TorchCheckpointEngine on one synthetic state dict (the core scenarios),
// and the fragment reshape against DeepSpeed's naive reshape of a synthetic
// DeepSpeed checkpoint (the reshape scenarios, bench_reshape.h), in one run.
// Field names of the --json output are documented in BENCHMARKS.md.
#ifndef CKPTKV_TOOLS_BENCH_H_
#define CKPTKV_TOOLS_BENCH_H_

#include <cstdint>
#include <string>

namespace ckptkv::tools {

struct BenchOptions {
  std::string scenarios = "all";     // all | core (saves and loads) | reshape
  std::string dir;                   // parent of the scratch directory; empty = /tmp
  uint64_t size_mb = 1024;           // logical MiB of the synthetic state dict
  bool json = false;                 // one JSON object on stdout instead of tables
  std::string durability = "flush";  // block durability of the main kv store: flush | wal
  bool alt_durability = true;        // also measure a full save with the other durability
  uint32_t chunk_kb = 1024;          // chunk size of the stores, KiB
  std::string codec = "raw";         // block codec of the kv stores: raw | zstd | grouped-zstd
  size_t threads = 0;                // store workers; 0 = store default
  int series_saves = 20;             // saves of the frozen-base series
  bool drop_caches = true;           // drop the page cache before the load scenarios
  bool keep = false;                 // keep the scratch directory
  bool verbose = false;              // engine log lines
  // Source of the reshape scenarios: a GPT at tp4 pp2 dp2, ZeRO-2, bf16.
  // The defaults give 1.07 GiB of tensors (1146464384 bytes).
  int reshape_layers = 4;         // transformer layers (a multiple of pp 2)
  int64_t reshape_hidden = 768;   // hidden size (a multiple of tp 4)
  int64_t reshape_vocab = 32000;  // vocabulary, padded to a multiple of 1024
};

// Returns the process exit code: 0 on success, 2 if a loaded checkpoint
// differs from what was saved, 1 for bad options or a failed reshape step.
int RunBench(const BenchOptions& options);

}  // namespace ckptkv::tools

#endif  // CKPTKV_TOOLS_BENCH_H_
