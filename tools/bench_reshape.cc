#include "tools/bench_reshape.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "tools/kv_browser/text.h"
#include "tools/proc_stats.h"

extern char** environ;

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace ckptkv::tools {

using kvb::HumanBytes;
using kvb::ReportError;

namespace {

constexpr double kMiB = 1024.0 * 1024.0;
constexpr const char* kSourceTag = "src";
// The source layout; CheckReshapeBenchOptions knows its constraints.
constexpr int kSrcTp = 4, kSrcPp = 2, kSrcDp = 2;

struct Target {
  int tp, pp, dp;
  std::string Name() const {
    return "tp" + std::to_string(tp) + " pp" + std::to_string(pp) + " dp" + std::to_string(dp);
  }
  std::string Key() const {
    return "tp" + std::to_string(tp) + "_pp" + std::to_string(pp) + "_dp" + std::to_string(dp);
  }
};

// One child process: what it was asked, what it reported, what it cost.
// (nlohmann::json's members make clang-tidy doubt the implicit moves.)
// NOLINTNEXTLINE(bugprone-exception-escape)
struct Child {
  std::string step;  // "naive reshape to tp2 pp1 dp1"
  std::vector<std::string> args;
  double process_seconds = 0;       // spawn to exit
  uint64_t peak_rss_bytes = 0;      // ru_maxrss
  uint64_t device_read_bytes = 0;   // ru_inblock x 512
  uint64_t device_write_bytes = 0;  // ru_oublock x 512
  bool cold_cache = false;          // the page cache was dropped just before
  json report;                      // its --json stdout
};

std::string Join(const std::vector<std::string>& args) {
  std::string s = "ckptkv";
  for (const auto& a : args) s += " " + a;
  return s;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The last `lines` lines of a file (for error messages).
std::string Tail(const std::string& path, int lines) {
  std::string s = ReadFile(path);
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  size_t pos = s.size();
  for (int n = 0; n < lines && pos > 0; ++n) {
    pos = s.rfind('\n', pos - 1);
    if (pos == std::string::npos) {
      pos = 0;
      break;
    }
  }
  if (pos > 0) pos++;
  s = s.substr(pos);
  return s.empty() ? "(empty)" : s;
}

// Runs this binary with `c->args`; stdout and stderr go to <dir>/<name>.out
// and .err. Fills the figures and parses stdout as JSON.
Status RunChild(const std::string& dir, const std::string& name, Child* c) {
  const std::string out_path = dir + "/" + name + ".out";
  const std::string err_path = dir + "/" + name + ".err";
  const std::string exe = "/proc/self/exe";
  std::vector<std::string> argv_s = {"ckptkv"};
  argv_s.insert(argv_s.end(), c->args.begin(), c->args.end());
  std::vector<char*> argv;
  argv.reserve(argv_s.size() + 1);
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  const double t0 = NowSeconds();
  pid_t pid = 0;
  int rc = ::posix_spawn(&pid, exe.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) {
    return Status::IOError("bench step '" + c->step + "': cannot start " + Join(c->args) + ": " +
                           std::strerror(rc));
  }
  int status = 0;
  struct rusage ru {};
  while (::wait4(pid, &status, 0, &ru) < 0) {
    if (errno != EINTR) {
      return Status::IOError("bench step '" + c->step + "': wait4: " + std::strerror(errno));
    }
  }
  c->process_seconds = NowSeconds() - t0;
  c->peak_rss_bytes = static_cast<uint64_t>(ru.ru_maxrss) * 1024;
  c->device_read_bytes = static_cast<uint64_t>(ru.ru_inblock) * 512;
  c->device_write_bytes = static_cast<uint64_t>(ru.ru_oublock) * 512;
  std::string how;
  if (WIFSIGNALED(status)) {
    how = "was killed by signal " + std::to_string(WTERMSIG(status)) + " (" +
          strsignal(WTERMSIG(status)) + ")";
  } else if (WIFEXITED(status) && WEXITSTATUS(status) != 0) {
    how = "exited with code " + std::to_string(WEXITSTATUS(status));
  }
  if (!how.empty()) {
    return Status::IOError("bench step '" + c->step + "' failed: `" + Join(c->args) + "` " + how +
                           "; its stderr (" + err_path + ", kept with --keep) ends with:\n" +
                           Tail(err_path, 20));
  }
  try {
    c->report = json::parse(ReadFile(out_path));
  } catch (const json::exception& e) {
    return Status::IOError("bench step '" + c->step + "': `" + Join(c->args) +
                           "` did not print one JSON object (" + e.what() +
                           "); its stdout ends with:\n" + Tail(out_path, 20));
  }
  return Status::OK();
}

// A copy of a closed store that shares its immutable files: RocksDB never
// changes an SST or blob file once written, so those are hard-linked; the
// files it appends to or rewrites (MANIFEST, WAL, CURRENT, OPTIONS, LOG,
// lock files) are copied.
Status CloneStore(const std::string& from, const std::string& to) {
  std::error_code ec;
  fs::create_directories(to, ec);
  if (ec) return Status::IOError("cannot make '" + to + "': " + ec.message());
  for (auto it = fs::recursive_directory_iterator(from, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    const fs::path rel = fs::relative(it->path(), from);
    const fs::path dst = fs::path(to) / rel;
    std::error_code e2;
    if (it->is_directory(e2)) {
      fs::create_directories(dst, e2);
    } else if (it->is_regular_file(e2)) {
      const std::string ext = it->path().extension().string();
      bool linked = false;
      if (ext == ".sst" || ext == ".blob") {
        fs::create_hard_link(it->path(), dst, e2);
        linked = !e2;
      }
      if (!linked) {
        e2.clear();
        fs::copy_file(it->path(), dst, fs::copy_options::overwrite_existing, e2);
      }
    }
    if (e2) {
      return Status::IOError("cannot clone '" + it->path().string() + "' to '" + dst.string() +
                             "': " + e2.message());
    }
  }
  if (ec) return Status::IOError("cannot list '" + from + "': " + ec.message());
  return Status::OK();
}

double Ratio(double a, double b) { return b > 0 ? a / b : 0.0; }

uint64_t U(const json& j, const char* key) { return j.value(key, uint64_t{0}); }
double D(const json& j, const char* key) { return j.value(key, 0.0); }

// The figures of one measured reshape.
json StepJson(const Child& c, const Target& ran) {
  const json& r = c.report;
  json j;
  j["target"] = ran.Name();
  j["command"] = Join(c.args);
  j["seconds"] = D(r, "total_seconds");
  j["reshape_seconds"] = D(r, "seconds");
  j["process_seconds"] = c.process_seconds;
  j["bytes_read"] = U(r, "bytes_read");
  if (r.contains("files_loaded")) {
    j["files_loaded"] = U(r, "files_loaded");
    j["tensor_bytes_read"] = U(r, "tensor_bytes_read");
  } else {
    j["tensors"] = U(r, "tensors");
    j["linked_tensors"] = U(r, "linked_tensors");
  }
  j["files"] = U(r, "files");
  j["logical_bytes"] = U(r, "logical_bytes");
  j["new_bytes"] = U(r, "new_bytes");
  j["peak_rss_bytes"] = c.peak_rss_bytes;
  j["device_read_bytes"] = c.device_read_bytes;
  j["device_write_bytes"] = c.device_write_bytes;
  j["cold_cache"] = c.cold_cache;
  return j;
}

std::vector<std::string> LayoutArgs(const Target& t) {
  return {"--tp", std::to_string(t.tp), "--pp", std::to_string(t.pp), "--dp", std::to_string(t.dp)};
}

// Runs the steps, each in a child, and logs them.
class StepRunner {
 public:
  StepRunner(const BenchOptions& o, std::string root, std::ostream& log)
      : o_(o), root_(std::move(root)), src_(root_ + "/source"), logs_(root_ + "/logs"), log_(log) {}

  const std::string& root() const { return root_; }
  const std::string& logs() const { return logs_; }
  // Whether the page cache was dropped before every step that asked for it.
  bool all_cold() const { return all_cold_; }

  // Runs one step, with "@DB" in its arguments standing for the source
  // store or (on_clone) a fresh clone of it, removed afterwards unless
  // --keep; drop: the page cache is dropped first (if allowed).
  Status Run(Child* c, bool on_clone, bool drop) {
    const std::string name = std::to_string(n_++);
    const std::string db = on_clone ? root_ + "/clone-" + name : src_;
    if (on_clone) RETURN_IF_ERROR(CloneStore(src_, db));
    for (auto& a : c->args) {
      if (a == "@DB") a = db;
    }
    log_ << "  " << c->step << " ..." << std::flush;
    if (drop) {
      c->cold_cache = o_.drop_caches && DropPageCache();
      all_cold_ = all_cold_ && c->cold_cache;
    }
    Status st = RunChild(logs_, name, c);
    std::error_code ec;
    if (on_clone && !o_.keep) fs::remove_all(db, ec);
    if (!st.ok()) {
      log_ << " failed" << std::endl;
      return st;
    }
    char secs[32];
    std::snprintf(secs, sizeof secs, "%.3f", c->process_seconds);
    log_ << " " << secs << " s, peak RSS " << HumanBytes(c->peak_rss_bytes) << std::endl;
    return Status::OK();
  }

 private:
  const BenchOptions& o_;
  const std::string root_, src_, logs_;
  std::ostream& log_;
  bool all_cold_ = true;
  int n_ = 0;
};

// (a) The source: synth of a tp4 pp2 dp2 ZeRO-2 bf16 checkpoint.
Child SynthStep(const BenchOptions& o) {
  Child c;
  c.step = "synth of the source";
  c.args = {"synth", "--db", "@DB", "--tag", kSourceTag};
  for (auto& a : LayoutArgs({kSrcTp, kSrcPp, kSrcDp})) c.args.push_back(a);
  c.args.insert(c.args.end(),
                {"--zero-stage", "2", "--dtype", "bf16", "--layers",
                 std::to_string(o.reshape_layers), "--hidden", std::to_string(o.reshape_hidden),
                 "--vocab", std::to_string(o.reshape_vocab), "--json"});
  return c;
}

// (b) The floor: a process that loads LibTorch, opens the store and plans a
// reshape to `t` (reads records only, writes nothing).
Child FloorStep(const Target& t) {
  Child c;
  c.step = "floor: reshape --plan to " + t.Name();
  c.args = {"reshape", "--db", "@DB", "--tag", kSourceTag};
  for (auto& a : LayoutArgs(t)) c.args.push_back(a);
  c.args.insert(c.args.end(), {"--plan", "--json"});
  return c;
}

// (c) One target, by fragment queries and by the naive way.
// NOLINTNEXTLINE(bugprone-exception-escape): as Child
struct Row {
  Target target, naive_target;
  std::string naive_label;
  Child fragment, naive;
};

Row MakeRow(const Target& t) {
  Row row;
  row.target = t;
  // DeepSpeed refuses any expansion (model_3d_desc.can_reshape); for a DP
  // expansion its nearest run is the merge to dp 1, which loads every
  // file whole and concatenates exactly as it would before any re-split.
  row.naive_target = t;
  row.naive_label = t.Name();
  if (t.dp > kSrcDp) {
    row.naive_target.dp = 1;
    row.naive_label = row.naive_target.Name() + " (DeepSpeed cannot expand DP)";
  }
  row.fragment.step = "fragment reshape to " + t.Name();
  row.fragment.args = {"reshape", "--db", "@DB", "--tag", kSourceTag};
  for (auto& a : LayoutArgs(t)) row.fragment.args.push_back(a);
  row.fragment.args.insert(row.fragment.args.end(), {"--out-tag", "fragment", "--json"});
  row.naive.step = "naive reshape to " + row.naive_label;
  row.naive.args = {"reshape", "--naive", "--db", "@DB", "--tag", kSourceTag};
  for (auto& a : LayoutArgs(row.naive_target)) row.naive.args.push_back(a);
  row.naive.args.insert(row.naive.args.end(), {"--out-tag", "naive", "--json"});
  return row;
}

// The results: (*out)["reshape"] of the bench's --json.
json ReshapeJson(const BenchOptions& o, const Child& synth, const Child& floor,
                 const Target& floor_target, const std::vector<Row>& rows, bool all_cold) {
  const json& s = synth.report;
  json j;
  j["source"] = {{"layout", s.value("layout", json::object())},
                 {"layers", o.reshape_layers},
                 {"hidden", o.reshape_hidden},
                 {"vocab", o.reshape_vocab},
                 {"files", U(s, "files")},
                 {"tensors", U(s, "tensors")},
                 {"logical_bytes", U(s, "logical_bytes")},
                 {"new_bytes", U(s, "new_bytes")},
                 {"seconds", D(s, "seconds")},
                 {"process_seconds", synth.process_seconds},
                 {"peak_rss_bytes", synth.peak_rss_bytes},
                 {"command", Join(synth.args)}};
  j["page_cache_dropped"] = all_cold;
  j["floor"] = {
      {"what", "a process that loads LibTorch, opens the store and plans the reshape to " +
                   floor_target.Name() + " (reads records only)"},
      {"command", Join(floor.args)},
      {"process_seconds", floor.process_seconds},
      {"peak_rss_bytes", floor.peak_rss_bytes},
      {"device_read_bytes", floor.device_read_bytes},
      {"bytes_to_read", U(floor.report, "bytes_to_read")},
      {"cold_cache", floor.cold_cache}};
  json rows_j = json::object();
  for (const Row& r : rows) {
    json row;
    row["target"] = r.target.Name();
    row["naive_target"] = r.naive_label;
    row["fragment"] = StepJson(r.fragment, r.target);
    row["naive"] = StepJson(r.naive, r.naive_target);
    const json& f = row["fragment"];
    const json& nv = row["naive"];
    const double floor_rss = static_cast<double>(floor.peak_rss_bytes);
    row["ratios"] = {
        {"seconds", Ratio(D(f, "seconds"), D(nv, "seconds"))},
        {"bytes_read", Ratio(double(U(f, "bytes_read")), double(U(nv, "bytes_read")))},
        {"peak_rss", Ratio(double(U(f, "peak_rss_bytes")), double(U(nv, "peak_rss_bytes")))},
        {"peak_rss_above_floor",
         Ratio(std::max(0.0, double(U(f, "peak_rss_bytes")) - floor_rss),
               std::max(0.0, double(U(nv, "peak_rss_bytes")) - floor_rss))}};
    rows_j[r.target.Key()] = std::move(row);
  }
  j["rows"] = std::move(rows_j);
  return j;
}

// The table of the results (ReshapeJson's document), on stdout.
void PrintReshapeTable(const BenchOptions& o, const json& j) {
  const json& s = j["source"];
  const json& floor = j["floor"];
  std::printf(
      "\nreshape source: tp%d pp%d dp%d ZeRO-2 bf16, %d layers, hidden %lld, vocab %lld: "
      "%llu files, %llu tensors, %s (synth %.2f s)\n",
      kSrcTp, kSrcPp, kSrcDp, o.reshape_layers, static_cast<long long>(o.reshape_hidden),
      static_cast<long long>(o.reshape_vocab), static_cast<unsigned long long>(U(s, "files")),
      static_cast<unsigned long long>(U(s, "tensors")), HumanBytes(U(s, "logical_bytes")).c_str(),
      D(s, "seconds"));
  std::printf("page cache %s before each step; each step is a child process on its own clone\n",
              j["page_cache_dropped"].get<bool>() ? "dropped" : "not dropped");
  std::printf(
      "floor (a process that loads LibTorch, opens the store, plans): peak RSS %.1f MiB, "
      "%.3f s\n\n",
      U(floor, "peak_rss_bytes") / kMiB, D(floor, "process_seconds"));
  std::printf("%-12s %-9s %-42s %8s %9s %6s %7s %9s %9s %12s\n", "target", "method", "ran",
              "seconds", "read MiB", "loaded", "linked", "logic MiB", "new MiB", "peak RSS MiB");
  for (const auto& item : j["rows"].items()) {
    const json& row = item.value();
    for (const char* method : {"fragment", "naive"}) {
      const json& m = row[method];
      const std::string ran = std::string(method) == "naive"
                                  ? row["naive_target"].get<std::string>()
                                  : row["target"].get<std::string>();
      const std::string loaded =
          m.contains("files_loaded") ? std::to_string(U(m, "files_loaded")) : "-";
      const std::string linked =
          m.contains("linked_tensors") ? std::to_string(U(m, "linked_tensors")) : "-";
      std::printf("%-12s %-9s %-42s %8.3f %9.1f %6s %7s %9.1f %9.1f %12.1f\n",
                  row["target"].get<std::string>().c_str(), method, ran.c_str(), D(m, "seconds"),
                  U(m, "bytes_read") / kMiB, loaded.c_str(), linked.c_str(),
                  U(m, "logical_bytes") / kMiB, U(m, "new_bytes") / kMiB,
                  U(m, "peak_rss_bytes") / kMiB);
    }
    const json& r = row["ratios"];
    std::printf("%-12s %-9s %-42s %7.3fx %8.3fx %6s %7s %9s %9s %11.3fx\n", "", "ratio",
                "fragment / naive", D(r, "seconds"), D(r, "bytes_read"), "", "", "", "",
                D(r, "peak_rss"));
  }
}

}  // namespace

Status CheckReshapeBenchOptions(const BenchOptions& o) {
  if (o.reshape_layers < 1 || o.reshape_layers % kSrcPp != 0) {
    return Status::InvalidArgument("--reshape-layers " + std::to_string(o.reshape_layers) +
                                   ": the reshape source has pp " + std::to_string(kSrcPp) +
                                   ", so the layer count must be a positive multiple of " +
                                   std::to_string(kSrcPp) + " (e.g. 2, 4, 8)");
  }
  if (o.reshape_hidden < 8 || o.reshape_hidden % kSrcTp != 0) {
    return Status::InvalidArgument("--reshape-hidden " + std::to_string(o.reshape_hidden) +
                                   ": the reshape source has tp " + std::to_string(kSrcTp) +
                                   ", so the hidden size must be a multiple of " +
                                   std::to_string(kSrcTp) + " and at least 8 (e.g. 64, 1024)");
  }
  if (o.reshape_vocab < 1) {
    return Status::InvalidArgument("--reshape-vocab " + std::to_string(o.reshape_vocab) +
                                   ": the vocabulary must hold at least 1 token");
  }
  return Status::OK();
}

int RunReshapeBench(const BenchOptions& o, const std::string& scratch, std::ostream& log,
                    json* out) {
  if (Status st = CheckReshapeBenchOptions(o); !st.ok()) return ReportError(st);
  StepRunner steps(o, scratch + "/reshape", log);
  std::error_code ec;
  fs::create_directories(steps.logs(), ec);
  if (ec)
    return ReportError(Status::IOError("cannot make '" + steps.logs() + "': " + ec.message()));
  log << "ckptkv bench (reshape): source tp" << kSrcTp << " pp" << kSrcPp << " dp" << kSrcDp
      << " ZeRO-2 bf16, " << o.reshape_layers << " layers, hidden " << o.reshape_hidden
      << ", vocab " << o.reshape_vocab << ", scratch " << steps.root() << std::endl;

  Child synth = SynthStep(o);
  if (Status st = steps.Run(&synth, /*on_clone=*/false, /*drop=*/false); !st.ok()) {
    return ReportError(st);
  }
  const std::vector<Target> targets = {{2, 1, 1}, {1, 1, 4}};
  Child floor = FloorStep(targets[0]);
  if (Status st = steps.Run(&floor, /*on_clone=*/true, /*drop=*/true); !st.ok()) {
    return ReportError(st);
  }
  // Each target, fragment then naive, each on its own clone.
  std::vector<Row> rows;
  for (const Target& t : targets) {
    Row row = MakeRow(t);
    for (Child* c : {&row.fragment, &row.naive}) {
      if (Status st = steps.Run(c, /*on_clone=*/true, /*drop=*/true); !st.ok()) {
        return ReportError(st);
      }
    }
    rows.push_back(std::move(row));
  }
  if (!o.keep) fs::remove_all(steps.root(), ec);

  json j = ReshapeJson(o, synth, floor, targets[0], rows, steps.all_cold());
  if (o.json) {
    (*out)["reshape"] = std::move(j);
  } else {
    PrintReshapeTable(o, j);
  }
  return 0;
}

}  // namespace ckptkv::tools
