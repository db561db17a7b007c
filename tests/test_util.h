// Helpers shared by the test executables.
#ifndef CKPTKV_TESTS_TEST_UTIL_H_
#define CKPTKV_TESTS_TEST_UTIL_H_

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <iostream>
#include <random>
#include <string>

#include "store/status.h"

namespace ckptkv::testing {

// The message of the StatusError `f` throws ("" if it throws none), and
// its code in *code when given (kOk if none).
inline std::string MessageOf(const std::function<void()>& f, Status::Code* code = nullptr) {
  try {
    f();
  } catch (const StatusError& e) {
    if (code != nullptr) *code = e.status().code();
    return e.what();
  }
  if (code != nullptr) *code = Status::Code::kOk;
  return "";
}

// A fresh directory under $TMPDIR, removed when the object goes.
class TempDir {
 public:
  TempDir() {
    std::string base = std::filesystem::temp_directory_path() / "ckptkv-test-XXXXXX";
    if (::mkdtemp(base.data()) == nullptr) std::abort();
    path_ = base;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// The seed of a randomized test: $CKPTKV_TEST_SEED or the clock. Printed so
// a failure can be replayed.
inline uint64_t TestSeed(const char* test) {
  uint64_t seed;
  if (const char* env = std::getenv("CKPTKV_TEST_SEED")) {
    seed = std::strtoull(env, nullptr, 10);
  } else {
    seed = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }
  std::cout << test << ": seed=" << seed << " (replay with CKPTKV_TEST_SEED=" << seed << ")\n";
  return seed;
}

}  // namespace ckptkv::testing

#endif  // CKPTKV_TESTS_TEST_UTIL_H_
