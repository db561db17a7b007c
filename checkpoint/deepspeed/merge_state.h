// DeepSpeed's merge_state (deepspeed/checkpoint/reshape_utils.py) over
// LibTorch values: how DeepSpeed merges the states of several checkpoint
// files into one when reshaping.
//
//   - the two values must be of the same Python type (dict, list, tuple,
//     tensor, int, float, str, bool, None, ...), else InvalidArgument;
//   - dicts: iterate b's keys in b's order; keys in both are merged, keys
//     only in b are copied, keys only in a are DROPPED;
//   - lists / tuples: same length required, merged element by element;
//   - tensors: at::cat({a, b}, 0);
//   - anything else: a (ints, strings, ... come from the first file).
//
// This is the behaviour of DeepSpeed 0.16.5 to 0.19.6. A later upstream
// revision keeps a-only keys and keeps 0-dim tensors (the Adam step) from
// a instead of failing to cat them; MergeOptions selects that behaviour.
#ifndef CKPTKV_CHECKPOINT_DEEPSPEED_MERGE_STATE_H_
#define CKPTKV_CHECKPOINT_DEEPSPEED_MERGE_STATE_H_

#include <ATen/core/ivalue.h>

#include <string>
#include <vector>

#include "store/status.h"

namespace ckptkv::checkpoint {

struct MergeOptions {
  // Keep keys only the first dict has (DeepSpeed 0.19.6 drops them).
  bool keep_first_only_keys = false;
  // Take 0-dim tensors from the first value (DeepSpeed 0.19.6 fails: a
  // 0-dim tensor cannot be concatenated).
  bool scalar_tensors_from_first = false;
};

// merge_state(a, b). `path` names where a and b sit (for messages). Tensors
// of the result are new (concatenated); other values are shared with a or b.
Result<c10::IValue> MergeState(const c10::IValue& a, const c10::IValue& b,
                               const MergeOptions& options = {},
                               const std::vector<std::string>& path = {});

// The Python type name DeepSpeed's type check compares ("dict", "list",
// "tuple", "Tensor", "int", "float", "bool", "str", "NoneType", ...).
std::string PyTypeName(const c10::IValue& v);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_DEEPSPEED_MERGE_STATE_H_
