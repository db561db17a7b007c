// `ckptkv bench`: KvCheckpointEngine against raw sequential writes and
// TorchCheckpointEngine on one synthetic state dict, in one run. Field
// names of the --json output are documented in BENCHMARKS.md.
#ifndef CKPTKV_TOOLS_BENCH_H_
#define CKPTKV_TOOLS_BENCH_H_

#include <cstdint>
#include <string>

namespace ckptkv::tools {

struct BenchOptions {
  std::string dir;                   // parent of the scratch directory; empty = /tmp
  uint64_t size_mb = 1024;           // logical MiB of the synthetic state dict
  bool json = false;                 // one JSON object on stdout instead of tables
  std::string durability = "flush";  // block durability of the main kv store: flush | wal
  bool alt_durability = true;        // also measure a full save with the other durability
  uint32_t chunk_kb = 1024;          // chunk size of the stores, KiB
  size_t threads = 0;                // store workers; 0 = store default
  int series_saves = 20;             // saves of the frozen-base series
  bool drop_caches = true;           // drop the page cache before the load scenarios
  bool keep = false;                 // keep the scratch directory
  bool verbose = false;              // engine log lines
};

// Returns the process exit code: 0 on success, 2 if a loaded checkpoint
// differs from what was saved.
int RunBench(const BenchOptions& options);

}  // namespace ckptkv::tools

#endif  // CKPTKV_TOOLS_BENCH_H_
