// diff of two tags. Parameters are matched by (file, param). Tensors with
// the same digest are equal without reading a byte; for changed tensors
// only the chunks whose digests differ are read, so diffing two similar
// checkpoints costs what differs between them.
#include <algorithm>
#include <map>

#include "tools/kv_browser/analysis.h"
#include "tools/kv_browser/text.h"

namespace ckptkv::kvb {

namespace {

struct Delta {
  uint64_t elements_changed = 0;
  uint64_t chunks_differing = 0;
  double diff_sq = 0, a_sq = 0, max_abs = 0;
};

// Compares bytes [off, off+len) (whole elements) of two tensors.
Status CompareRange(Browser& b, const TensorEntry& x, const TensorEntry& y, uint64_t off,
                    uint64_t len, Delta* d, std::vector<uint8_t>* bx, std::vector<uint8_t>* by) {
  const uint64_t es = DTypeSize(x.dtype());
  bx->resize(len);
  by->resize(len);
  RETURN_IF_ERROR(b.Read(x, off, len, bx->data()));
  RETURN_IF_ERROR(b.Read(y, off, len, by->data()));
  const fb::DType dt = x.dtype();
  for (uint64_t i = 0; i + es <= len; i += es) {
    if (std::memcmp(bx->data() + i, by->data() + i, es) == 0) {
      double a = ElementValue(dt, bx->data() + i);
      if (std::isfinite(a)) d->a_sq += a * a;
      continue;
    }
    d->elements_changed++;
    double a = ElementValue(dt, bx->data() + i);
    double c = ElementValue(dt, by->data() + i);
    if (std::isfinite(a)) d->a_sq += a * a;
    double diff = std::fabs(c - a);
    if (std::isnan(diff)) continue;  // NaN or Inf on one side: counted as changed only
    d->diff_sq += diff * diff;
    d->max_abs = std::max(d->max_abs, diff);
  }
  return Status::OK();
}

Result<Delta> CompareTensors(Browser& b, const TensorEntry& x, const TensorEntry& y) {
  Delta d;
  std::vector<uint8_t> bx, by;
  const uint64_t es = DTypeSize(x.dtype());
  const uint64_t cs = x.rec().chunk_size();
  const bool chunked =
      !x.is_inline() && !y.is_inline() && cs == y.rec().chunk_size() && cs > 0 && cs % es == 0;
  if (!chunked) {  // inline, or chunks that do not hold whole elements: compare all
    const uint64_t window = std::max<uint64_t>(es, (1u << 20) / es * es);
    for (uint64_t off = 0; off < x.bytes(); off += window) {
      RETURN_IF_ERROR(CompareRange(b, x, y, off, std::min(window, x.bytes() - off), &d, &bx, &by));
    }
    d.chunks_differing = x.num_chunks();
    return d;
  }
  for (size_t i = 0; i < x.num_chunks(); ++i) {
    if (x.chunk(i) == y.chunk(i)) continue;  // identical bytes: skipped by digest
    d.chunks_differing++;
    RETURN_IF_ERROR(CompareRange(b, x, y, x.chunk_offset(i), x.chunk_length(i), &d, &bx, &by));
  }
  return d;
}

json Brief(const TensorEntry& e) {
  json j{{"file", e.file}, {"param", e.param}};
  j.update(TensorBrief(e));
  return j;
}

}  // namespace

Result<json> DiffReport(Browser& b, const std::string& tag_a, const std::string& tag_b,
                        const ParamFilter& filter) {
  ASSIGN_OR_RETURN(const TagContents* ca, b.Contents(tag_a));
  ASSIGN_OR_RETURN(const TagContents* cb, b.Contents(tag_b));
  using Key = std::pair<std::string, std::string>;
  std::map<Key, const TensorEntry*> a, bm;
  for (const auto& e : ca->tensors) {
    ASSIGN_OR_RETURN(bool m, filter.Matches(e));
    if (m) a[{e.file, e.param}] = &e;
  }
  for (const auto& e : cb->tensors) {
    ASSIGN_OR_RETURN(bool m, filter.Matches(e));
    if (m) bm[{e.file, e.param}] = &e;
  }
  json added = json::array(), removed = json::array(), reshaped = json::array(),
       changed = json::array();
  uint64_t unchanged = 0, total = 0;
  std::vector<std::pair<const TensorEntry*, const TensorEntry*>> to_compare;
  for (const auto& [k, x] : a) {
    auto it = bm.find(k);
    if (it == bm.end()) {
      removed.push_back(Brief(*x));
      continue;
    }
    const TensorEntry* y = it->second;
    if (x->dtype() != y->dtype() || x->shape() != y->shape()) {
      reshaped.push_back({{"file", x->file},
                          {"param", x->param},
                          {"from", TensorBrief(*x)},
                          {"to", TensorBrief(*y)}});
    } else if (x->digest() == y->digest()) {
      unchanged++;
    } else {
      to_compare.emplace_back(x, y);
      total += x->bytes();
    }
  }
  for (const auto& [k, y] : bm) {
    if (!a.count(k)) added.push_back(Brief(*y));
  }
  const uint64_t read_before = b.BlockBytesRead();
  Progress progress("diff", total);
  for (const auto& [x, y] : to_compare) {
    ASSIGN_OR_RETURN(Delta d, CompareTensors(b, *x, *y));
    progress.Add(x->bytes());
    json j = Brief(*x);
    j["chunks"] = x->num_chunks();
    j["chunks_differing"] = d.chunks_differing;
    j["elements_changed"] = d.elements_changed;
    j["frac_changed"] = x->numel() ? static_cast<double>(d.elements_changed) / x->numel() : 0.0;
    j["l2_diff"] = std::sqrt(d.diff_sq);
    j["max_abs_diff"] = d.max_abs;
    j["rel_diff"] = d.a_sq > 0 ? json(std::sqrt(d.diff_sq / d.a_sq)) : json(nullptr);
    changed.push_back(std::move(j));
  }
  progress.Done();
  return json{{"tag_a", tag_a},
              {"tag_b", tag_b},
              {"added", std::move(added)},
              {"removed", std::move(removed)},
              {"reshaped", std::move(reshaped)},
              {"changed", std::move(changed)},
              {"unchanged", unchanged},
              {"bytes_read", b.BlockBytesRead() - read_before},
              {"logical_bytes_a", ca->info.logical_bytes},
              {"logical_bytes_b", cb->info.logical_bytes}};
}

}  // namespace ckptkv::kvb
