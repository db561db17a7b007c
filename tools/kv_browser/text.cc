#include "tools/kv_browser/text.h"

#include <fnmatch.h>
#include <cctype>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <map>

namespace ckptkv::kvb {

int ExitCodeFor(const Status& s) { return s.IsCorruption() ? 2 : 1; }

int ReportError(const Status& s) {
  std::cerr << "error: " << s.message() << std::endl;
  return ExitCodeFor(s);
}

std::string HumanBytes(uint64_t bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 5) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  if (u == 0) {
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  } else {
    std::snprintf(buf, sizeof buf, "%.2f %s", v, units[u]);
  }
  return buf;
}

std::string FormatTime(int64_t ms) {
  std::time_t t = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[64];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

std::string FormatNumber(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[40];
  if (v == std::floor(v) && std::fabs(v) < 1e15) {
    std::snprintf(buf, sizeof buf, "%.0f", v);
  } else {
    std::snprintf(buf, sizeof buf, "%.6g", v);
  }
  return buf;
}

size_t EditDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::vector<std::string> ClosestNames(const std::string& name,
                                      const std::vector<std::string>& candidates, size_t max) {
  std::vector<std::pair<size_t, std::string>> scored;
  for (const auto& c : candidates) {
    size_t d;
    if (!name.empty() && c.find(name) != std::string::npos) {
      d = 0;  // the name is part of the candidate
    } else {
      d = EditDistance(name, c) + 1;
      // Far from the name: leave it out (more than half of it differs).
      if (d > std::max<size_t>(3, std::max(name.size(), c.size()) / 2 + 1)) continue;
    }
    scored.emplace_back(d, c);
  }
  std::stable_sort(scored.begin(), scored.end(),
                   [](const auto& x, const auto& y) { return x.first < y.first; });
  std::vector<std::string> out;
  for (size_t i = 0; i < scored.size() && out.size() < max; ++i) out.push_back(scored[i].second);
  return out;
}

std::string ClosestSuffix(const std::string& name, const std::vector<std::string>& candidates) {
  auto close = ClosestNames(name, candidates);
  if (close.empty()) return "";
  std::string out = "; closest: ";
  for (size_t i = 0; i < close.size(); ++i) out += (i ? ", " : "") + close[i];
  return out;
}

bool GlobMatch(const std::string& pattern, const std::string& name) {
  return ::fnmatch(pattern.c_str(), name.c_str(), 0) == 0;
}

namespace {

// Splits "P<digits><sep>S" at its first numeric path component.
bool SplitNumbered(const std::string& name, std::string* prefix, long* n, std::string* rest) {
  for (size_t i = 0; i < name.size(); ++i) {
    if (!std::isdigit(static_cast<unsigned char>(name[i]))) continue;
    if (i > 0 && name[i - 1] != '.' && name[i - 1] != '/') continue;
    size_t j = i;
    while (j < name.size() && std::isdigit(static_cast<unsigned char>(name[j]))) ++j;
    if (j >= name.size() || (name[j] != '.' && name[j] != '/') || j - i > 9) {
      i = j;
      continue;
    }
    *prefix = name.substr(0, i);
    *n = std::stol(name.substr(i, j - i));
    *rest = name.substr(j);  // keeps the separator
    return true;
  }
  return false;
}

}  // namespace

std::vector<CollapsedRow> CollapseNumberedRuns(const std::vector<NamedRow>& rows) {
  std::vector<CollapsedRow> out;
  size_t i = 0;
  while (i < rows.size()) {
    std::string prefix, rest;
    long n = 0;
    if (!SplitNumbered(rows[i].name, &prefix, &n, &rest)) {
      out.push_back({rows[i].name, rows[i].signature, rows[i].bytes, 1});
      ++i;
      continue;
    }
    // The contiguous segment of rows with this numbered prefix.
    std::map<long, std::vector<size_t>> by_n;
    size_t j = i;
    for (; j < rows.size(); ++j) {
      std::string p, r;
      long m = 0;
      if (!SplitNumbered(rows[j].name, &p, &m, &r) || p != prefix) break;
      by_n[m].push_back(j);
    }
    auto members = [&](long k) {
      std::vector<std::string> sig;
      for (size_t r : by_n[k]) {
        std::string p, s;
        long m = 0;
        SplitNumbered(rows[r].name, &p, &m, &s);
        sig.push_back(s + "\n" + rows[r].signature);
      }
      return sig;
    };
    std::vector<long> ns;
    ns.reserve(by_n.size());
    for (const auto& kv : by_n) ns.push_back(kv.first);
    size_t a = 0;
    while (a < ns.size()) {
      size_t b = a + 1;
      auto first = members(ns[a]);
      while (b < ns.size() && ns[b] == ns[b - 1] + 1 && members(ns[b]) == first) ++b;
      if (b - a >= 2) {
        std::string range = "{" + std::to_string(ns[a]);
        range.append("..").append(std::to_string(ns[b - 1])).append("}");
        for (size_t m = 0; m < by_n[ns[a]].size(); ++m) {
          std::string p, s;
          long k = 0;
          SplitNumbered(rows[by_n[ns[a]][m]].name, &p, &k, &s);
          std::string name = prefix;
          name.append(range).append(s);
          CollapsedRow row{std::move(name), rows[by_n[ns[a]][m]].signature, 0, b - a};
          for (size_t x = a; x < b; ++x) row.bytes += rows[by_n[ns[x]][m]].bytes;
          out.push_back(std::move(row));
        }
      } else {
        for (size_t r : by_n[ns[a]])
          out.push_back({rows[r].name, rows[r].signature, rows[r].bytes, 1});
      }
      a = b;
    }
    i = j;
  }
  return out;
}

namespace {
double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

Progress::Progress(std::string label, uint64_t total)
    : label_(std::move(label)), total_(total), enabled_(::isatty(STDERR_FILENO) == 1) {}

Progress::~Progress() { Done(); }

void Progress::Add(uint64_t n) { Set(done_ + n); }

void Progress::Set(uint64_t done) {
  done_ = done;
  Draw(false);
}

void Progress::Draw(bool force) {
  if (!enabled_ || finished_) return;
  double now = Now();
  if (!force && now - last_draw_ < 0.1) return;
  last_draw_ = now;
  const int width = 30;
  double frac = total_ ? std::min(1.0, static_cast<double>(done_) / total_) : 0.0;
  int fill = static_cast<int>(frac * width);
  std::string bar(fill, '#');
  bar.resize(width, '.');
  std::fprintf(stderr, "\r%s [%s] %5.1f%% %s / %s ", label_.c_str(), bar.c_str(), frac * 100,
               HumanBytes(done_).c_str(), HumanBytes(total_).c_str());
  std::fflush(stderr);
}

void Progress::Done() {
  if (!enabled_ || finished_) return;
  Draw(true);
  std::fprintf(stderr, "\r\033[K");
  std::fflush(stderr);
  finished_ = true;
}

}  // namespace ckptkv::kvb
