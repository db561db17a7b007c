// Deterministic checkpoint contents for the SIGKILL crash test.
//
// The child process saves, and the parent regenerates and compares, the
// files of step i from (seed, i) alone. Some tensors are the same in every
// step (dedup), one large tensor changes only in its first chunk (partial
// dedup), the rest change every step; sizes go from a few bytes to a few
// MiB; the values nest dicts (string and int keys), lists, a tuple, ints,
// doubles, bools, strings and None, and one tensor appears twice.
#ifndef CKPTKV_TESTS_CRASH_CRASH_STATE_H_
#define CKPTKV_TESTS_CRASH_CRASH_STATE_H_

#include <ATen/core/ivalue.h>

#include <cstdint>
#include <string>
#include <vector>

namespace ckptkv::crash_testing {

struct StepFile {
  std::string name;   // file name inside the tag, e.g. "mp_rank_00_model_states.pt"
  c10::IValue state;  // what is saved to it
};

std::string StepTag(int64_t step);  // "step<i>"
// Parses "step<i>"; false for any other name.
bool ParseStepTag(const std::string& tag, int64_t* step);

// The 1-3 files of step `step`.
std::vector<StepFile> MakeStepFiles(uint64_t seed, int64_t step);

// Compares two values recursively: kinds, container types, keys (and their
// order), scalars, and tensors (dtype, shape and bit-exact bytes, and
// at::equal). Returns "" when equal, else where and how they differ.
std::string CompareIValues(const c10::IValue& expected, const c10::IValue& actual,
                           const std::string& path = "");

}  // namespace ckptkv::crash_testing

#endif  // CKPTKV_TESTS_CRASH_CRASH_STATE_H_
