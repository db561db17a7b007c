// Element decoding without LibTorch: every stored dtype (bool, integers,
// float16, bfloat16, float32, float64, complex) to double, and the running
// summaries kv-browser computes over them in bounded memory.
#ifndef CKPTKV_TOOLS_KV_BROWSER_VALUES_H_
#define CKPTKV_TOOLS_KV_BROWSER_VALUES_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "schema/records.h"

namespace ckptkv::kvb {

float HalfToFloat(uint16_t h);
float BFloat16ToFloat(uint16_t b);
bool IsFloating(fb::DType dtype);
bool IsComplex(fb::DType dtype);

// Element at `p` as a double; complex elements give their magnitude.
inline double ElementValue(fb::DType dtype, const uint8_t* p) {
  switch (dtype) {
    case fb::DType::Bool:
      return *p != 0 ? 1.0 : 0.0;
    case fb::DType::UInt8:
      return *p;
    case fb::DType::Int8:
      return static_cast<int8_t>(*p);
    case fb::DType::Int16: {
      int16_t v;
      std::memcpy(&v, p, 2);
      return v;
    }
    case fb::DType::Int32: {
      int32_t v;
      std::memcpy(&v, p, 4);
      return v;
    }
    case fb::DType::Int64: {
      int64_t v;
      std::memcpy(&v, p, 8);
      return static_cast<double>(v);
    }
    case fb::DType::Float16: {
      uint16_t v;
      std::memcpy(&v, p, 2);
      return HalfToFloat(v);
    }
    case fb::DType::BFloat16: {
      uint16_t v;
      std::memcpy(&v, p, 2);
      return BFloat16ToFloat(v);
    }
    case fb::DType::Float32: {
      float v;
      std::memcpy(&v, p, 4);
      return v;
    }
    case fb::DType::Float64: {
      double v;
      std::memcpy(&v, p, 8);
      return v;
    }
    case fb::DType::ComplexFloat: {
      float re, im;
      std::memcpy(&re, p, 4);
      std::memcpy(&im, p + 4, 4);
      return std::hypot(static_cast<double>(re), static_cast<double>(im));
    }
    case fb::DType::ComplexDouble: {
      double re, im;
      std::memcpy(&re, p, 8);
      std::memcpy(&im, p + 8, 8);
      return std::hypot(re, im);
    }
  }
  return 0;
}

// Running statistics: finite values feed min/max/mean/std (Welford) and the
// L2 norm; NaN, +-Inf and zeros are counted.
struct Summary {
  uint64_t count = 0;   // all elements
  uint64_t finite = 0;  // elements in min/max/mean/std
  uint64_t nan = 0, pos_inf = 0, neg_inf = 0, zeros = 0;
  double min = 0, max = 0, mean = 0, m2 = 0, sum_sq = 0;

  void Add(double v) {
    ++count;
    if (std::isnan(v)) {
      ++nan;
      return;
    }
    if (std::isinf(v)) {
      ++(v > 0 ? pos_inf : neg_inf);
      return;
    }
    if (v == 0) ++zeros;
    if (finite == 0 || v < min) min = v;
    if (finite == 0 || v > max) max = v;
    ++finite;
    double delta = v - mean;
    mean += delta / static_cast<double>(finite);
    m2 += delta * (v - mean);
    sum_sq += v * v;
  }
  // Population standard deviation of the finite values.
  double std() const { return finite ? std::sqrt(m2 / static_cast<double>(finite)) : 0.0; }
  double l2() const { return std::sqrt(sum_sq); }
};

// Equal-width buckets over [lo, hi]; values outside (and NaN/Inf) are not
// counted in a bucket.
struct Histogram {
  double lo = 0, hi = 0;
  std::vector<uint64_t> counts;
  void Init(double l, double h, size_t bins) {
    lo = l;
    hi = h;
    counts.assign(bins, 0);
  }
  void Add(double v) {
    if (!std::isfinite(v) || v < lo || v > hi || counts.empty()) return;
    size_t b = hi > lo ? static_cast<size_t>((v - lo) / (hi - lo) * counts.size()) : 0;
    if (b >= counts.size()) b = counts.size() - 1;
    ++counts[b];
  }
  double edge(size_t i) const { return lo + (hi - lo) * static_cast<double>(i) / counts.size(); }
};

}  // namespace ckptkv::kvb

#endif  // CKPTKV_TOOLS_KV_BROWSER_VALUES_H_
