#include "checkpoint/fragments.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace ckptkv::checkpoint {

Rect Intersect(const Rect& a, const Rect& b) {
  Rect r;
  const size_t n = a.shape.size();
  r.offsets.resize(n);
  r.shape.resize(n);
  for (size_t d = 0; d < n; ++d) {
    const int64_t lo = std::max(a.offsets[d], b.offsets[d]);
    const int64_t hi = std::min(a.offsets[d] + a.shape[d], b.offsets[d] + b.shape[d]);
    r.offsets[d] = lo;
    r.shape[d] = std::max<int64_t>(0, hi - lo);
  }
  return r;
}

bool Contains(const Rect& outer, const Rect& inner) {
  for (size_t d = 0; d < outer.shape.size(); ++d) {
    if (inner.offsets[d] < outer.offsets[d] ||
        inner.offsets[d] + inner.shape[d] > outer.offsets[d] + outer.shape[d]) {
      return false;
    }
  }
  return true;
}

namespace {

void Split(const std::vector<int64_t>& shape, size_t dim, std::vector<int64_t> prefix, int64_t base,
           int64_t begin, int64_t end, std::vector<FlatRect>* out) {
  if (begin >= end) return;
  const size_t rank = shape.size();
  if (dim + 1 == rank) {
    FlatRect fr;
    fr.rect.offsets = prefix;
    fr.rect.offsets.push_back(begin);
    fr.rect.shape.assign(dim, 1);
    fr.rect.shape.push_back(end - begin);
    for (size_t d = dim + 1; d < rank; ++d) fr.rect.offsets.push_back(0);
    fr.flat_begin = base + begin;
    out->push_back(std::move(fr));
    return;
  }
  int64_t inner = 1;
  for (size_t d = dim + 1; d < rank; ++d) inner *= shape[d];
  auto sub = [&](int64_t row, int64_t b, int64_t e) {
    std::vector<int64_t> p = prefix;
    p.push_back(row);
    Split(shape, dim + 1, p, base + row * inner, b, e, out);
  };
  int64_t first_full = (begin + inner - 1) / inner;
  const int64_t last_full = end / inner;  // exclusive
  if (begin % inner != 0) {
    const int64_t row = begin / inner;
    sub(row, begin - row * inner, std::min(end, (row + 1) * inner) - row * inner);
    if (end <= (row + 1) * inner) return;
    first_full = row + 1;
  }
  if (last_full > first_full) {
    FlatRect fr;
    fr.rect.offsets = prefix;
    fr.rect.offsets.push_back(first_full);
    fr.rect.shape.assign(dim, 1);
    fr.rect.shape.push_back(last_full - first_full);
    for (size_t d = dim + 1; d < rank; ++d) {
      fr.rect.offsets.push_back(0);
      fr.rect.shape.push_back(shape[d]);
    }
    fr.flat_begin = base + first_full * inner;
    out->push_back(std::move(fr));
  }
  if (end % inner != 0 && last_full >= first_full) sub(last_full, 0, end - last_full * inner);
}

}  // namespace

std::vector<FlatRect> SplitFlatRange(const std::vector<int64_t>& shape, int64_t begin,
                                     int64_t end) {
  std::vector<FlatRect> out;
  if (shape.empty()) {
    if (begin < end) out.push_back(FlatRect{Rect{}, 0});
    return out;
  }
  Split(shape, 0, {}, 0, begin, end, &out);
  return out;
}

Rect ShardRect(const ParamSpec& p, int tp_rank, int tp) {
  Rect r;
  r.offsets.assign(p.global_shape.size(), 0);
  r.shape = p.global_shape;
  if (p.shard_dim >= 0) {
    r.shape[p.shard_dim] /= tp;
    r.offsets[p.shard_dim] = r.shape[p.shard_dim] * tp_rank;
  }
  return r;
}

Status FillFromPlacement(const ModelSpec& spec, const Placement& pl, FragmentSource& source,
                         at::Tensor out) {
  return FillRangeFromPlacement(spec, pl, source, out.sizes().vec(), 0, out.numel(),
                                out.view({-1}));
}

Status FillRangeFromPlacement(const ModelSpec& spec, const Placement& pl, FragmentSource& source,
                              const std::vector<int64_t>& shape, int64_t begin, int64_t end,
                              at::Tensor out) {
  out.zero_();
  const int64_t numel = Numel(shape);
  if (begin < 0 || end > numel || begin > end || out.numel() != end - begin) {
    return Status::InvalidArgument("elements [" + std::to_string(begin) + ", " +
                                   std::to_string(end) + ") of a tensor of shape " +
                                   ShapeString(shape) + " into " + std::to_string(out.numel()) +
                                   " elements");
  }
  if (begin == end) return Status::OK();
  source.Prefer(pl.tp_rank, pl.tp_degree);
  if (pl.segments.empty()) {
    if (pl.param.empty()) {
      return Status::InvalidArgument("placement names neither a parameter nor segments");
    }
    const Rect r{pl.offsets, pl.shard_shape.empty() ? shape : pl.shard_shape};
    if (r.numel() != numel) {
      return Status::InvalidArgument("placement of " + pl.param + " covers " +
                                     ShapeString(r.shape) + " but the tensor has shape " +
                                     ShapeString(shape));
    }
    for (const FlatRect& fr : SplitFlatRange(r.shape, begin, end)) {
      Rect g = fr.rect;
      for (size_t d = 0; d < g.offsets.size(); ++d) g.offsets[d] += r.offsets[d];
      at::Tensor dst = out.narrow(0, fr.flat_begin - begin, g.numel()).view(g.shape);
      RETURN_IF_ERROR(source.Fill(pl.param, pl.state, g, dst));
    }
    return Status::OK();
  }
  for (const auto& seg : pl.segments) {
    const ParamSpec* p = spec.Find(seg.param);
    if (p == nullptr) {
      return Status::InvalidArgument("placement segment names unknown parameter " + seg.param);
    }
    const Rect shard = ShardRect(*p, std::max(0, pl.tp_rank), std::max(1, pl.tp_degree));
    if (seg.start < 0 || seg.start + seg.numel > numel ||
        seg.shard_start + seg.numel > shard.numel()) {
      return Status::InvalidArgument("segment of " + seg.param + " [" + std::to_string(seg.start) +
                                     ", +" + std::to_string(seg.numel) +
                                     ") does not fit its buffer");
    }
    // The part of this segment inside [begin, end), in the parameter's shard.
    const int64_t lo = std::max(begin, seg.start);
    const int64_t hi = std::min(end, seg.start + seg.numel);
    if (lo >= hi) continue;
    const int64_t shard_lo = seg.shard_start + (lo - seg.start);
    for (const FlatRect& fr : SplitFlatRange(shard.shape, shard_lo, shard_lo + (hi - lo))) {
      Rect g = fr.rect;
      for (size_t d = 0; d < g.offsets.size(); ++d) g.offsets[d] += shard.offsets[d];
      at::Tensor dst =
          out.narrow(0, (lo - begin) + (fr.flat_begin - shard_lo), g.numel()).view(g.shape);
      RETURN_IF_ERROR(source.Fill(seg.param, pl.state, g, dst));
    }
  }
  return Status::OK();
}

}  // namespace ckptkv::checkpoint
