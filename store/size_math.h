// Checked arithmetic for sizes read from records.
//
// Every product of dimensions, element sizes and counts that comes from a
// stored record (or a caller) goes through these helpers: a result that
// does not fit is reported, never wrapped. Dimensions are int64 as in the
// schema; a negative dimension is never a valid size.
#ifndef CKPTKV_STORE_SIZE_MATH_H_
#define CKPTKV_STORE_SIZE_MATH_H_

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace ckptkv {

// a * b, or nullopt if it does not fit in uint64_t.
inline std::optional<uint64_t> CheckedMul(uint64_t a, uint64_t b) {
  uint64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

// a + b, or nullopt if it does not fit in uint64_t.
inline std::optional<uint64_t> CheckedAdd(uint64_t a, uint64_t b) {
  uint64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}

// a + b and a * b for int64 values, or nullopt on overflow.
inline std::optional<int64_t> CheckedAdd64(int64_t a, int64_t b) {
  int64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}
inline std::optional<int64_t> CheckedMul64(int64_t a, int64_t b) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

// The number of elements of `shape`, or nullopt when a dimension is
// negative or the product exceeds int64_t (so that it is also a valid
// LibTorch numel and index).
template <typename Dims>
std::optional<int64_t> CheckedNumel(const Dims& shape) {
  int64_t n = 1;
  for (auto d : shape) {
    const int64_t v = static_cast<int64_t>(d);
    if (v < 0) return std::nullopt;
    auto p = CheckedMul64(n, v);
    if (!p) return std::nullopt;
    n = *p;
  }
  return n;
}

// numel * element_size, or nullopt if either fails or the product does
// not fit in int64_t.
template <typename Dims>
std::optional<uint64_t> CheckedByteLength(const Dims& shape, uint64_t element_size) {
  auto n = CheckedNumel(shape);
  if (!n) return std::nullopt;
  auto b = CheckedMul(static_cast<uint64_t>(*n), element_size);
  if (!b || *b > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
  return b;
}

// ceil(bytes / chunk_size) without wrapping; 0 for zero bytes.
// REQUIRES: chunk_size > 0.
inline uint64_t ChunkCount(uint64_t bytes, uint64_t chunk_size) {
  return bytes / chunk_size + (bytes % chunk_size != 0 ? 1 : 0);
}

}  // namespace ckptkv

#endif  // CKPTKV_STORE_SIZE_MATH_H_
