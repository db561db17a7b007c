// Small helpers shared by the crash tests: the test seed and temporary
// directories.
#ifndef CKPTKV_TESTS_CRASH_CRASH_UTIL_H_
#define CKPTKV_TESTS_CRASH_CRASH_UTIL_H_

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <stdexcept>
#include <string>
#include <system_error>

#include <unistd.h>

namespace ckptkv::crash_testing {

// The seed of a randomized test: CKPTKV_TEST_SEED if set, else the clock.
// Printed as "seed=<n>" (with the test's name) so a failure can be replayed
// with CKPTKV_TEST_SEED=<n>. One seed per process.
inline uint64_t TestSeed(const std::string& test_name) {
  static const uint64_t seed = [] {
    uint64_t seed;
    if (const char* env = std::getenv("CKPTKV_TEST_SEED"); env != nullptr && *env != '\0') {
      seed = std::strtoull(env, nullptr, 0);
    } else {
      seed = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
             (static_cast<uint64_t>(::getpid()) << 32);
      seed %= 1000000000ull;
    }
    return seed;
  }();
  std::cout << test_name << ": seed=" << seed << " (replay with CKPTKV_TEST_SEED=" << seed << ")"
            << std::endl;
  return seed;
}

// An integer from the environment, or `def`.
inline long EnvInt(const char* name, long def) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return def;
  return std::strtol(env, nullptr, 0);
}

// A fresh directory under $TMPDIR (or /tmp), removed with its contents on
// destruction unless CKPTKV_KEEP_TEST_DIRS is set.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "ckptkv-crash") {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/" + prefix + "-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed: " + tmpl);
    path_ = tmpl;
  }
  ~TempDir() {
    if (std::getenv("CKPTKV_KEEP_TEST_DIRS") != nullptr) {
      std::cout << "kept " << path_ << std::endl;
      return;
    }
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace ckptkv::crash_testing

#endif  // CKPTKV_TESTS_CRASH_CRASH_UTIL_H_
