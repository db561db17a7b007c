// A driver for the fuzz targets where libFuzzer is not in use (the g++
// build that ctest runs): replays every input of the corpus, then mutates
// random corpus inputs (bit flips, byte and integer overwrites with edge
// values, insertions, deletions, splices) for a bounded time. The seed is
// printed; CKPTKV_TEST_SEED replays it. A clang build with
// -DCKPTKV_LIBFUZZER=ON links libFuzzer's main instead (scripts/fuzz.sh).
//
// Usage: <target> [--seconds S] CORPUS_DIR...
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

void Mutate(std::mt19937_64& rng, std::vector<uint8_t>& v, const std::vector<uint8_t>& other) {
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int e = 0; e < edits; ++e) {
    switch (rng() % 7) {
      case 0:  // flip a bit
        if (!v.empty()) v[rng() % v.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
        break;
      case 1:  // a random byte
        if (!v.empty()) v[rng() % v.size()] = static_cast<uint8_t>(rng());
        break;
      case 2: {  // an edge integer, little-endian, at a random offset
        static const uint64_t kEdges[] = {0,          1,          0x7f,       0x80,
                                          0xff,       0xffff,     0x7fffffff, 0x80000000,
                                          0xffffffff, 1ull << 32, 1ull << 62, ~0ull >> 1,
                                          ~0ull,      ~0ull - 7,  1ull << 33, 4096};
        const uint64_t x = kEdges[rng() % (sizeof kEdges / sizeof kEdges[0])];
        const size_t width = size_t{1} << (rng() % 4);
        if (v.size() >= width) {
          const size_t at = rng() % (v.size() - width + 1);
          for (size_t i = 0; i < width; ++i) v[at + i] = static_cast<uint8_t>(x >> (8 * i));
        }
        break;
      }
      case 3:  // insert bytes
        v.insert(v.begin() + static_cast<long>(v.empty() ? 0 : rng() % v.size()), 1 + rng() % 8,
                 static_cast<uint8_t>(rng()));
        break;
      case 4:  // delete bytes
        if (!v.empty()) {
          const size_t at = rng() % v.size();
          const size_t n = std::min<size_t>(1 + rng() % 8, v.size() - at);
          v.erase(v.begin() + static_cast<long>(at), v.begin() + static_cast<long>(at + n));
        }
        break;
      case 5:  // splice in a piece of another input
        if (!other.empty()) {
          const size_t a = rng() % other.size();
          const size_t n = std::min<size_t>(1 + rng() % 64, other.size() - a);
          const size_t at = v.empty() ? 0 : rng() % v.size();
          v.insert(v.begin() + static_cast<long>(at), other.begin() + static_cast<long>(a),
                   other.begin() + static_cast<long>(a + n));
        }
        break;
      default:  // truncate
        if (!v.empty()) v.resize(rng() % v.size());
        break;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 5;
  std::vector<std::vector<uint8_t>> corpus;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) {
      seconds = std::atof(argv[++i]);
      continue;
    }
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(argv[i], ec)) {
      std::ifstream in(e.path(), std::ios::binary);
      corpus.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    if (ec) {
      std::fprintf(stderr, "cannot read corpus '%s': %s\n", argv[i], ec.message().c_str());
      return 1;
    }
  }
  if (corpus.empty()) corpus.emplace_back();
  for (const auto& input : corpus) LLVMFuzzerTestOneInput(input.data(), input.size());

  uint64_t seed;
  if (const char* env = std::getenv("CKPTKV_TEST_SEED")) {
    seed = std::strtoull(env, nullptr, 10);
  } else {
    seed = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  }
  std::printf("fuzz: %zu corpus inputs, seed=%llu (replay with CKPTKV_TEST_SEED=%llu)\n",
              corpus.size(), static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(seed));
  std::fflush(stdout);
  std::mt19937_64 rng(seed);
  const auto start = std::chrono::steady_clock::now();
  uint64_t execs = 0;
  double elapsed = 0;
  std::vector<uint8_t> v;
  while (elapsed < seconds) {
    for (int k = 0; k < 64; ++k) {
      v = corpus[rng() % corpus.size()];
      Mutate(rng, v, corpus[rng() % corpus.size()]);
      LLVMFuzzerTestOneInput(v.data(), v.size());
      ++execs;
    }
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  std::printf("fuzz: %llu executions in %.1f s (%.0f/s), no crash\n",
              static_cast<unsigned long long>(execs), elapsed, execs / elapsed);
  return 0;
}
