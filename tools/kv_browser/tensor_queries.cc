// Queries that read tensor values: stats, hist, peek, history. Tensors are
// streamed a window (about one chunk) at a time, so memory stays bounded
// whatever the tensor's size.
#include <algorithm>
#include <cstdlib>
#include <map>

#include "store/size_math.h"
#include "tools/kv_browser/analysis.h"
#include "tools/kv_browser/slice.h"
#include "tools/kv_browser/text.h"

namespace ckptkv::kvb {

namespace {

// Bytes per read window: a whole number of elements, about one chunk.
uint64_t WindowBytes(const TensorEntry& e) {
  uint64_t es = DTypeSize(e.dtype());
  uint64_t cs = e.rec().chunk_size() ? e.rec().chunk_size() : (1u << 20);
  return std::max<uint64_t>(es, cs / es * es);
}

// One element as JSON: exact integers, bools, floats (non-finite as
// strings "nan", "inf", "-inf"), complex as [re, im].
json ElementJson(fb::DType dtype, const uint8_t* p) {
  auto real = [](double v) -> json {
    if (std::isnan(v)) return "nan";
    if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
    return v;
  };
  switch (dtype) {
    case fb::DType::Bool:
      return *p != 0;
    case fb::DType::Int64: {
      int64_t v;
      std::memcpy(&v, p, 8);
      return v;
    }
    case fb::DType::UInt8:
    case fb::DType::Int8:
    case fb::DType::Int16:
    case fb::DType::Int32:
      return static_cast<int64_t>(ElementValue(dtype, p));
    case fb::DType::ComplexFloat: {
      float re, im;
      std::memcpy(&re, p, 4);
      std::memcpy(&im, p + 4, 4);
      return json::array({real(re), real(im)});
    }
    case fb::DType::ComplexDouble: {
      double re, im;
      std::memcpy(&re, p, 8);
      std::memcpy(&im, p + 8, 8);
      return json::array({real(re), real(im)});
    }
    default:
      return real(ElementValue(dtype, p));
  }
}

std::string Trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t[]");
  size_t b = s.find_last_not_of(" \t[]");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// A decimal int64 with an optional sign, nothing else.
Result<int64_t> ParseSliceInt(const std::string& s, const std::string& slice) {
  auto not_integer = [&] {
    return Status::InvalidArgument("bad slice '" + slice + "': '" + s + "' is not an integer");
  };
  size_t i = s.empty() || (s[0] != '-' && s[0] != '+') ? 0 : 1;
  const bool neg = i == 1 && s[0] == '-';
  if (i == s.size()) return not_integer();
  uint64_t v = 0;
  for (; i < s.size(); ++i) {
    if (s[i] < '0' || s[i] > '9') {
      return not_integer();
    }
    auto m = CheckedMul(v, 10);
    auto n = m ? CheckedAdd(*m, static_cast<uint64_t>(s[i] - '0')) : std::nullopt;
    if (!n || *n > (uint64_t{1} << 63)) {
      v = ~uint64_t{0};
      break;
    }
    v = *n;
  }
  if (v > (neg ? uint64_t{1} << 63 : (uint64_t{1} << 63) - 1)) {
    return Status::InvalidArgument("bad slice '" + slice + "': '" + s +
                                   "' does not fit in a 64-bit integer");
  }
  return neg ? static_cast<int64_t>(0 - v) : static_cast<int64_t>(v);
}

}  // namespace

Result<std::vector<SliceDim>> ParseSlice(const std::string& slice,
                                         const std::vector<int64_t>& shape) {
  for (int64_t n : shape) {
    if (n < 0) return Status::InvalidArgument("shape " + ShapeString(shape) + " is negative");
  }
  std::vector<std::string> parts;
  std::string body = Trim(slice);
  size_t pos = 0;
  while (!body.empty()) {
    size_t comma = body.find(',', pos);
    parts.push_back(Trim(body.substr(pos, comma == std::string::npos ? comma : comma - pos)));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  if (parts.size() > shape.size()) {
    return Status::InvalidArgument("slice '" + slice + "' has " + std::to_string(parts.size()) +
                                   " dimensions; the tensor has " + std::to_string(shape.size()) +
                                   " (shape " + ShapeString(shape) + ")");
  }
  std::vector<SliceDim> dims;
  for (size_t d = 0; d < shape.size(); ++d) {
    const int64_t n = shape[d];
    SliceDim dim;
    std::string p = d < parts.size() ? parts[d] : ":";
    auto where = [&] {
      return " in dimension " + std::to_string(d) + " of size " + std::to_string(n) + " (shape " +
             ShapeString(shape) + ")";
    };
    if (p.find(':') == std::string::npos) {
      ASSIGN_OR_RETURN(int64_t i, ParseSliceInt(p, slice));
      if (i < -n || i >= n) {
        return Status::InvalidArgument("index " + std::to_string(i) + " is out of range" + where() +
                                       "; valid indices are -" + std::to_string(n) + " to " +
                                       std::to_string(n - 1));
      }
      dim.start = i < 0 ? i + n : i;
      dim.count = 1;
      dim.keep = false;
      dims.push_back(dim);
      continue;
    }
    std::string f[3];
    int k = 0;
    for (char ch : p) {
      if (ch == ':') {
        if (++k > 2) {
          std::string msg = "bad slice '" + slice + "': '";
          msg.append(p).append("' has more than two ':'; expected start:stop:step");
          return Status::InvalidArgument(std::move(msg));
        }
      } else {
        f[k] += ch;
      }
    }
    for (auto& x : f) x = Trim(x);
    int64_t step = 1;
    if (!f[2].empty()) {
      ASSIGN_OR_RETURN(step, ParseSliceInt(f[2], slice));
    }
    if (step == 0) return Status::InvalidArgument("slice step must not be zero" + where());
    // A bound in [-n, n], as an offset in [0, n].
    auto bound = [&](const std::string& s) -> Result<int64_t> {
      ASSIGN_OR_RETURN(int64_t v, ParseSliceInt(s, slice));
      if (v < -n || v > n) {
        return Status::InvalidArgument("slice bound " + std::to_string(v) + " is out of range" +
                                       where() + "; valid bounds are -" + std::to_string(n) +
                                       " to " + std::to_string(n));
      }
      return v < 0 ? v + n : v;
    };
    int64_t start = 0, stop = 0;
    if (step > 0) {
      start = 0;
      stop = n;
      if (!f[0].empty()) {
        ASSIGN_OR_RETURN(start, bound(f[0]));
      }
      if (!f[1].empty()) {
        ASSIGN_OR_RETURN(stop, bound(f[1]));
      }
      // Both in [0, n]: the differences and the quotient cannot overflow.
      dim.count = stop > start ? (stop - start - 1) / step + 1 : 0;
    } else {
      start = n - 1;
      stop = -1;  // before element 0
      if (!f[0].empty()) {
        ASSIGN_OR_RETURN(start, bound(f[0]));
      }
      if (!f[1].empty()) {
        ASSIGN_OR_RETURN(stop, bound(f[1]));
      }
      if (start >= n) start = n - 1;
      // -step without overflow for step = INT64_MIN.
      const uint64_t mag = static_cast<uint64_t>(-(step + 1)) + 1;
      dim.count = start > stop
                      ? static_cast<int64_t>(static_cast<uint64_t>(start - stop - 1) / mag + 1)
                      : 0;
    }
    dim.start = dim.count > 0 ? start : 0;
    dim.step = step;
    dims.push_back(dim);
  }
  return dims;
}

namespace {

// Element reader with a one-window cache. Never reads outside the tensor:
// an index at or past its end is an error.
class ElementReader {
 public:
  ElementReader(Browser& b, const TensorEntry& e)
      : b_(b), e_(e), es_(DTypeSize(e.dtype())), window_(WindowBytes(e)) {}
  Result<const uint8_t*> At(uint64_t index) {
    auto off = CheckedMul(index, es_);
    auto end = off ? CheckedAdd(*off, es_) : std::nullopt;
    if (es_ == 0 || !end || *end > e_.bytes()) {
      return Status::InvalidArgument("element " + std::to_string(index) + " is outside " +
                                     e_.where() + " (" + std::to_string(e_.bytes()) + " bytes)");
    }
    if (buf_.empty() || *off < start_ || *end > start_ + buf_.size()) {
      start_ = *off / window_ * window_;
      uint64_t len = std::min<uint64_t>(window_, e_.bytes() - start_);
      buf_.resize(len);
      RETURN_IF_ERROR(b_.Read(e_, start_, len, buf_.data()));
    }
    return buf_.data() + (*off - start_);
  }

 private:
  Browser& b_;
  const TensorEntry& e_;
  uint64_t es_, window_, start_ = 0;
  std::vector<uint8_t> buf_;
};

}  // namespace

Status ForEachValue(Browser& b, const TensorEntry& e, const std::function<void(double)>& fn,
                    Progress* progress) {
  const uint64_t es = DTypeSize(e.dtype());
  const uint64_t window = WindowBytes(e);
  std::vector<uint8_t> buf;
  for (uint64_t off = 0; off < e.bytes(); off += window) {
    uint64_t len = std::min(window, e.bytes() - off);
    buf.resize(len);
    RETURN_IF_ERROR(b.Read(e, off, len, buf.data()));
    const fb::DType dt = e.dtype();
    for (uint64_t i = 0; i + es <= len; i += es) fn(ElementValue(dt, buf.data() + i));
    if (progress) progress->Add(len);
  }
  return Status::OK();
}

Result<Summary> Summarize(Browser& b, const TensorEntry& e, Progress* progress) {
  Summary s;
  RETURN_IF_ERROR(ForEachValue(
      b, e, [&s](double v) { s.Add(v); }, progress));
  return s;
}

json SummaryJson(const Summary& s) {
  auto num = [&](double v) { return s.finite ? json(v) : json(nullptr); };
  return json{{"count", s.count},    {"min", num(s.min)},
              {"max", num(s.max)},   {"mean", num(s.mean)},
              {"std", num(s.std())}, {"l2_norm", s.l2()},
              {"nan", s.nan},        {"inf", s.pos_inf + s.neg_inf},
              {"zeros", s.zeros}};
}

Result<json> StatsReport(Browser& b, const std::string& tag, const ParamFilter& filter) {
  ASSIGN_OR_RETURN(const TagContents* c, b.Contents(tag));
  std::vector<const TensorEntry*> picked;
  uint64_t total = 0;
  for (const auto& e : c->tensors) {
    ASSIGN_OR_RETURN(bool m, filter.Matches(e));
    if (m) {
      picked.push_back(&e);
      total += e.bytes();
    }
  }
  if (picked.empty()) {
    std::vector<std::string> names;
    for (const auto& e : c->tensors) names.push_back(e.param);
    return Status::NotFound("no parameter of tag '" + tag + "' matches '" + filter.pattern + "'" +
                            ClosestSuffix(filter.pattern, names));
  }
  Progress progress("stats", total);
  json rows = json::array();
  for (const TensorEntry* e : picked) {
    ASSIGN_OR_RETURN(Summary s, Summarize(b, *e, &progress));
    json j{{"file", e->file}, {"param", e->param}};
    j.update(TensorBrief(*e));
    j.update(SummaryJson(s));
    rows.push_back(std::move(j));
  }
  progress.Done();
  return json{{"tag", tag}, {"params", std::move(rows)}};
}

Result<json> HistReport(Browser& b, const TensorEntry& e, size_t bins) {
  if (bins == 0 || bins > 10000) return Status::InvalidArgument("--bins must be 1 to 10000");
  ASSIGN_OR_RETURN(Summary s, Summarize(b, e));
  Histogram h;
  h.Init(s.finite ? s.min : 0, s.finite ? s.max : 0, bins);
  RETURN_IF_ERROR(ForEachValue(b, e, [&h](double v) { h.Add(v); }));
  json buckets = json::array();
  for (size_t i = 0; i < h.counts.size(); ++i) {
    buckets.push_back({{"lo", h.edge(i)}, {"hi", h.edge(i + 1)}, {"count", h.counts[i]}});
  }
  json out{{"file", e.file}, {"param", e.param}};
  out.update(TensorBrief(e));
  out.update(SummaryJson(s));
  out["buckets"] = std::move(buckets);
  return out;
}

Result<json> PeekReport(Browser& b, const TensorEntry& e, const std::string& slice, size_t limit) {
  json out{{"file", e.file}, {"param", e.param}};
  out.update(TensorBrief(e));
  ElementReader reader(b, e);
  json values = json::array();
  if (Trim(slice).empty()) {
    uint64_t n = std::min<uint64_t>(limit, e.numel());
    for (uint64_t i = 0; i < n; ++i) {
      ASSIGN_OR_RETURN(const uint8_t* p, reader.At(i));
      values.push_back(ElementJson(e.dtype(), p));
    }
    out["slice"] = nullptr;
    out["result_shape"] = json::array({n});
    out["truncated"] = n < e.numel();
    out["values"] = std::move(values);
    return out;
  }
  const std::vector<int64_t> shape = e.shape();
  ASSIGN_OR_RETURN(std::vector<SliceDim> dims, ParseSlice(slice, shape));
  std::vector<int64_t> result_shape;
  uint64_t count = 1;
  for (const auto& d : dims) {
    if (d.keep) result_shape.push_back(d.count);
    count = CheckedMul(count, static_cast<uint64_t>(d.count)).value_or(~uint64_t{0});
  }
  // Row-major strides; they fit because the record's numel does.
  std::vector<int64_t> strides(shape.size(), 1);
  for (size_t d = shape.size(); d-- > 1;) {
    auto s = CheckedMul64(strides[d], std::max<int64_t>(shape[d], 1));
    if (!s) return Status::Corruption(e.where() + ": shape " + ShapeString(shape) + " overflows");
    strides[d - 1] = *s;
  }
  std::vector<int64_t> idx(dims.size(), 0);
  uint64_t n = std::min<uint64_t>(count, limit);
  for (uint64_t k = 0; k < n; ++k) {
    std::optional<int64_t> flat = 0;
    for (size_t d = 0; d < dims.size() && flat; ++d) {
      auto i = CheckedMul64(idx[d], dims[d].step);
      auto at = i ? CheckedAdd64(dims[d].start, *i) : std::nullopt;
      auto term = at ? CheckedMul64(*at, strides[d]) : std::nullopt;
      flat = term ? CheckedAdd64(*flat, *term) : std::nullopt;
    }
    if (!flat || *flat < 0) {
      return Status::InvalidArgument("slice '" + slice + "' selects an element outside " +
                                     e.where());
    }
    ASSIGN_OR_RETURN(const uint8_t* p, reader.At(static_cast<uint64_t>(*flat)));
    values.push_back(ElementJson(e.dtype(), p));
    for (size_t d = dims.size(); d-- > 0;) {
      if (++idx[d] < dims[d].count) break;
      idx[d] = 0;
    }
  }
  out["slice"] = slice;
  out["result_shape"] = result_shape;
  out["truncated"] = n < count;
  out["values"] = std::move(values);
  return out;
}

Result<json> HistoryReport(Browser& b, const std::string& param, const std::string& file) {
  ASSIGN_OR_RETURN(const auto* tags, b.Tags());
  std::map<std::pair<uint64_t, uint64_t>, double> norms;  // by tensor digest
  json rows = json::array();
  std::vector<std::string> names;
  bool found = false;
  std::string prev_digest;
  for (const auto& t : *tags) {
    auto e_or = b.FindParam(t.tag, file, param);
    if (!e_or.ok()) {
      if (!e_or.status().IsNotFound()) return e_or.status();
      rows.push_back({{"tag", t.tag}, {"present", false}});
      ASSIGN_OR_RETURN(const TagContents* c, b.Contents(t.tag));
      for (const auto& e : c->tensors) names.push_back(e.param);
      continue;
    }
    found = true;
    const TensorEntry* e = *e_or;
    Digest d = e->digest();
    auto key = std::make_pair(d.hi, d.lo);
    auto it = norms.find(key);
    if (it == norms.end()) {
      ASSIGN_OR_RETURN(Summary s, Summarize(b, *e));
      it = norms.emplace(key, s.l2()).first;
    }
    json j{{"tag", t.tag}, {"present", true}, {"file", e->file}};
    j.update(TensorBrief(*e));
    j["digest"] = d.Hex();
    j["l2_norm"] = it->second;
    j["changed"] = !prev_digest.empty() && prev_digest != d.Hex();
    prev_digest = d.Hex();
    rows.push_back(std::move(j));
  }
  if (!found) {
    std::sort(names.begin(), names.end());
    names.erase(std::unique(names.begin(), names.end()), names.end());
    return Status::NotFound("parameter '" + param + "' is in no tag" + ClosestSuffix(param, names));
  }
  return json{{"param", param}, {"tags", std::move(rows)}};
}

}  // namespace ckptkv::kvb
