// Numpy-style slices of a tensor for `kv-browser peek`, e.g. "0:2, :, -1".
// Pure parsing, no store access, so that it can be fuzzed alone.
#ifndef CKPTKV_TOOLS_KV_BROWSER_SLICE_H_
#define CKPTKV_TOOLS_KV_BROWSER_SLICE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "store/status.h"

namespace ckptkv::kvb {

// The elements one slice selects in one dimension: start, start + step, ...
// (`count` of them). Every one of them is inside the dimension:
// 0 <= start + k * step < size for 0 <= k < count, and the arithmetic
// does not overflow.
struct SliceDim {
  int64_t start = 0;
  int64_t step = 1;   // never 0
  int64_t count = 0;  // 0..size
  bool keep = true;   // false for an integer index (the dimension is dropped)
};

// Parses `slice` over a tensor of `shape`: one comma-separated part per
// dimension (missing trailing parts are ':'), each an index ("3", "-1") or
// start:stop[:step] with any part empty. Indices and bounds are int64
// numbers in [-size, size) (indices) or [-size, size] (bounds); a value
// outside, one that does not fit in int64, step 0, more parts than
// dimensions or anything that is not a number is InvalidArgument naming the
// part and what is valid. Negative steps count down as in numpy.
// A negative dimension in `shape` is InvalidArgument too.
Result<std::vector<SliceDim>> ParseSlice(const std::string& slice,
                                         const std::vector<int64_t>& shape);

}  // namespace ckptkv::kvb

#endif  // CKPTKV_TOOLS_KV_BROWSER_SLICE_H_
