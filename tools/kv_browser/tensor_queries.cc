// Queries that read tensor values: stats, hist, peek, history. Tensors are
// streamed a window (about one chunk) at a time, so memory stays bounded
// whatever the tensor's size.
#include <algorithm>
#include <cstdlib>
#include <map>

#include "tools/kv_browser/analysis.h"
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

struct Dim {
  int64_t start = 0, step = 1, count = 0;
  bool keep = true;  // false for an integer index (the dimension is dropped)
};

Result<int64_t> ParseInt(const std::string& s, const std::string& slice) {
  char* end = nullptr;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0') {
    return Status::InvalidArgument("bad slice '" + slice + "': '" + s + "' is not an integer");
  }
  return static_cast<int64_t>(v);
}

std::string Trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t[]");
  size_t b = s.find_last_not_of(" \t[]");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// Numpy-style slice over `shape`. Indices and bounds outside a dimension
// are errors (not clamped), so that a typo does not print a silent empty.
Result<std::vector<Dim>> ParseSlice(const std::string& slice, const std::vector<int64_t>& shape) {
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
  std::vector<Dim> dims;
  for (size_t d = 0; d < shape.size(); ++d) {
    const int64_t n = shape[d];
    Dim dim;
    std::string p = d < parts.size() ? parts[d] : ":";
    auto where = [&] {
      return " in dimension " + std::to_string(d) + " of size " + std::to_string(n) + " (shape " +
             ShapeString(shape) + ")";
    };
    if (p.find(':') == std::string::npos) {
      ASSIGN_OR_RETURN(int64_t i, ParseInt(p, slice));
      if (i < -n || i >= n) {
        return Status::InvalidArgument("index " + std::to_string(i) + " is out of range" + where());
      }
      dim.start = i < 0 ? i + n : i;
      dim.count = 1;
      dim.keep = false;
    } else {
      std::string f[3];
      int k = 0;
      for (char ch : p) {
        if (ch == ':') {
          if (++k > 2) return Status::InvalidArgument("bad slice '" + slice + "'");
        } else {
          f[k] += ch;
        }
      }
      int64_t step = 1;
      if (!Trim(f[2]).empty()) {
        ASSIGN_OR_RETURN(step, ParseInt(Trim(f[2]), slice));
      }
      if (step == 0) return Status::InvalidArgument("slice step must not be zero");
      auto bound = [&](const std::string& s, int64_t dflt) -> Result<int64_t> {
        if (Trim(s).empty()) return dflt;
        ASSIGN_OR_RETURN(int64_t v, ParseInt(Trim(s), slice));
        if (v < -n || v > n) {
          return Status::InvalidArgument("slice bound " + std::to_string(v) + " is out of range" +
                                         where());
        }
        return v < 0 ? v + n : v;
      };
      ASSIGN_OR_RETURN(int64_t start, bound(f[0], step > 0 ? 0 : n - 1));
      ASSIGN_OR_RETURN(int64_t stop, bound(f[1], step > 0 ? n : -1));
      if (step < 0 && Trim(f[1]).empty()) stop = -1;
      if (step < 0 && start >= n) start = n - 1;
      dim.start = start;
      dim.step = step;
      dim.count = step > 0 ? std::max<int64_t>(0, (stop - start + step - 1) / step)
                           : std::max<int64_t>(0, (start - stop + (-step) - 1) / (-step));
    }
    dims.push_back(dim);
  }
  return dims;
}

// Element reader with a one-window cache.
class ElementReader {
 public:
  ElementReader(Browser& b, const TensorEntry& e)
      : b_(b), e_(e), es_(DTypeSize(e.dtype())), window_(WindowBytes(e)) {}
  Result<const uint8_t*> At(uint64_t index) {
    uint64_t off = index * es_;
    if (buf_.empty() || off < start_ || off + es_ > start_ + buf_.size()) {
      start_ = off / window_ * window_;
      uint64_t len = std::min<uint64_t>(window_, e_.bytes() - start_);
      buf_.resize(len);
      RETURN_IF_ERROR(b_.Read(e_, start_, len, buf_.data()));
    }
    return buf_.data() + (off - start_);
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
  ASSIGN_OR_RETURN(std::vector<Dim> dims, ParseSlice(slice, shape));
  std::vector<int64_t> result_shape;
  uint64_t count = 1;
  for (const auto& d : dims) {
    if (d.keep) result_shape.push_back(d.count);
    count *= static_cast<uint64_t>(d.count);
  }
  std::vector<int64_t> strides(shape.size(), 1);
  for (size_t d = shape.size(); d-- > 1;) strides[d - 1] = strides[d] * shape[d];
  std::vector<int64_t> idx(dims.size(), 0);
  uint64_t n = std::min<uint64_t>(count, limit);
  for (uint64_t k = 0; k < n; ++k) {
    int64_t flat = 0;
    for (size_t d = 0; d < dims.size(); ++d)
      flat += (dims[d].start + idx[d] * dims[d].step) * strides[d];
    ASSIGN_OR_RETURN(const uint8_t* p, reader.At(static_cast<uint64_t>(flat)));
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
