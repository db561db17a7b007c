// Text helpers of kv-browser (and of ckptkv, which links them): error
// lines and exit codes, sizes, times, name suggestions, globs, collapsing of
// numbered runs (layers.N.*) and the progress bar.
#ifndef CKPTKV_TOOLS_KV_BROWSER_TEXT_H_
#define CKPTKV_TOOLS_KV_BROWSER_TEXT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "store/names.h"
#include "store/status.h"

namespace ckptkv::kvb {

// A failed Status's exit code: 2 for corruption, 1 otherwise.
int ExitCodeFor(const Status& s);
// Prints "error: <message>" (one line; the message names what is wrong, the
// code adds nothing for a reader) to stderr and returns ExitCodeFor(s).
int ReportError(const Status& s);

// "1.50 MiB", "312 B".
std::string HumanBytes(uint64_t bytes);
// Local time "YYYY-MM-DD HH:MM:SS" of a unix epoch in milliseconds.
std::string FormatTime(int64_t ms);
// A double in short form (integers without a fraction, nan, inf).
std::string FormatNumber(double v);

// Levenshtein distance (bytes).
size_t EditDistance(const std::string& a, const std::string& b);
// Up to `max` candidates closest to `name`: substring matches first, then by
// edit distance; candidates far from the name are left out.
std::vector<std::string> ClosestNames(const std::string& name,
                                      const std::vector<std::string>& candidates, size_t max = 5);
// "; closest: a, b, c" or "".
std::string ClosestSuffix(const std::string& name, const std::vector<std::string>& candidates);

// Shell-style glob (fnmatch, `*` also matches `/`).
bool GlobMatch(const std::string& pattern, const std::string& name);

// One row of a parameter list before collapsing.
struct NamedRow {
  std::string name;
  std::string signature;  // what must match for rows to collapse (dtype, shape)
  uint64_t bytes = 0;
};
// A displayed row: a single name, or a run "prefix.{0..11}.suffix-set".
struct CollapsedRow {
  std::string name;
  std::string signature;  // of the first row
  uint64_t bytes = 0;     // of all rows of the run
  size_t rows = 1;        // rows the run stands for
};
// Collapses runs of consecutive numbered groups `P.N.*` (N = 0, 1, 2, ...)
// whose members have the same suffixes and signatures into one line
// `P.{a..b}.S` per suffix. Rows keep their order otherwise.
std::vector<CollapsedRow> CollapseNumberedRuns(const std::vector<NamedRow>& rows);

// A progress bar on stderr, drawn only when stderr is a terminal (quiet when
// piped) and at most ten times a second.
class Progress {
 public:
  Progress(std::string label, uint64_t total);
  ~Progress();
  void Add(uint64_t n);
  void Set(uint64_t done);
  void Done();

 private:
  void Draw(bool force);
  std::string label_;
  uint64_t total_;
  uint64_t done_ = 0;
  double last_draw_ = 0;
  bool enabled_;
  bool finished_ = false;
};

}  // namespace ckptkv::kvb

#endif  // CKPTKV_TOOLS_KV_BROWSER_TEXT_H_
