// The reshape scenarios of `ckptkv bench`: a synthetic tp4 x pp2 x dp2
// ZeRO-2 bf16 checkpoint reshaped to tp2 x pp1 x dp1 and to tp1 x pp1 x dp4,
// by fragment queries (`ckptkv reshape`) and by DeepSpeed's naive way
// (`ckptkv reshape --naive`: load every file whole, concatenate), in one run.
//
// Every measured step is a child process of this binary (/proc/self/exe) on
// its own clone of the source store (SST and blob files hard-linked, the
// rest copied), so its peak RSS is its own (ru_maxrss from wait4) and no
// step sees blocks another one wrote. Seconds and bytes come from the
// child's --json report. Field names are documented in BENCHMARKS.md.
#ifndef CKPTKV_TOOLS_BENCH_RESHAPE_H_
#define CKPTKV_TOOLS_BENCH_RESHAPE_H_

#include <iosfwd>
#include <string>

#include <nlohmann/json.hpp>

#include "store/status.h"
#include "tools/bench.h"

namespace ckptkv::tools {

// InvalidArgument naming the option when the reshape source cannot be laid
// out at tp 4 x pp 2 (and, through its targets, tp 2 and tp 1).
Status CheckReshapeBenchOptions(const BenchOptions& options);

// Runs the reshape scenarios under `scratch` (a directory of the bench's
// own). Progress goes to `log`. With options.json the results are put in
// (*out)["reshape"]; otherwise a table is printed on stdout. Returns 0, or
// 1 after printing an error naming the failed step, its command and the
// end of its stderr.
int RunReshapeBench(const BenchOptions& options, const std::string& scratch, std::ostream& log,
                    nlohmann::ordered_json* out);

}  // namespace ckptkv::tools

#endif  // CKPTKV_TOOLS_BENCH_RESHAPE_H_
