#include "checkpoint/query/fragments.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "store/size_math.h"

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

namespace {

std::string Num(int64_t v) { return std::to_string(v); }

Status Bad(const std::string& where, const std::string& what) {
  return Status::Corruption(where + ": placement " + what);
}

Status CheckTp(const Placement& pl, const std::vector<int64_t>& global, const std::string& where) {
  if (pl.tp_degree == 0 || pl.tp_degree < -1) {
    return Bad(where, "tp_degree " + Num(pl.tp_degree) + " is invalid; valid: -1 (none) or >= 1");
  }
  if (pl.tp_degree > 0 && (pl.tp_rank < 0 || pl.tp_rank >= pl.tp_degree)) {
    return Bad(where, "tp_rank " + Num(pl.tp_rank) + " is outside [0, tp_degree " +
                          Num(pl.tp_degree) + ")");
  }
  if (pl.tp_degree < 0 && pl.tp_rank != -1) {
    return Bad(where, "tp_rank " + Num(pl.tp_rank) + " without a tp_degree; valid: -1");
  }
  const auto rank = static_cast<int64_t>(global.size());
  if (pl.shard_dim < -1 || pl.shard_dim >= rank) {
    return Bad(where, "shard_dim " + Num(pl.shard_dim) + " is outside [-1, " + Num(rank) +
                          ") for global_shape " + ShapeString(global));
  }
  if (pl.shard_dim >= 0 && pl.tp_degree > 0 && global[pl.shard_dim] % pl.tp_degree != 0) {
    return Bad(where, "tp_degree " + Num(pl.tp_degree) + " does not divide dimension " +
                          Num(pl.shard_dim) + " of global_shape " + ShapeString(global));
  }
  return Status::OK();
}

Status CheckRect(const Placement& pl, const std::vector<int64_t>& tensor_shape, int64_t numel,
                 const std::string& where) {
  const std::string what = "of " + pl.param;
  if (!pl.segments.empty()) {
    return Bad(where, what +
                          " has both a param and segments; a placement is a rectangle (param) "
                          "or a flat buffer (segments)");
  }
  const std::vector<int64_t>& global = pl.global_shape;
  const std::vector<int64_t>& extent = pl.shard_shape.empty() ? tensor_shape : pl.shard_shape;
  if (pl.offsets.size() != global.size() || extent.size() != global.size()) {
    return Bad(where, what + ": offsets " + ShapeString(pl.offsets) + " and shard_shape " +
                          ShapeString(extent) + " must have the rank of global_shape " +
                          ShapeString(global));
  }
  for (size_t d = 0; d < global.size(); ++d) {
    const auto end = CheckedAdd64(pl.offsets[d], extent[d]);
    if (pl.offsets[d] < 0 || extent[d] < 0 || !end || *end > global[d]) {
      return Bad(where, what + ": offsets " + ShapeString(pl.offsets) + " + shard_shape " +
                            ShapeString(extent) + " lie outside global_shape " +
                            ShapeString(global) + " in dimension " + Num(static_cast<int64_t>(d)));
    }
  }
  if (pl.state != "placeholder" && CheckedNumel(extent) != numel) {
    return Bad(where, what + ": shard_shape " + ShapeString(extent) +
                          " does not hold the tensor's " + Num(numel) + " elements (shape " +
                          ShapeString(tensor_shape) + ")");
  }
  if (pl.shard_dim >= 0 && pl.tp_degree > 0) {
    const int64_t size = global[pl.shard_dim] / pl.tp_degree;
    const int64_t offset = size * pl.tp_rank;
    if (extent[pl.shard_dim] != size || pl.offsets[pl.shard_dim] != offset) {
      return Bad(where, what + ": offsets " + ShapeString(pl.offsets) + " and shard_shape " +
                            ShapeString(extent) + " are not the shard of tp_rank " +
                            Num(pl.tp_rank) + " of " + Num(pl.tp_degree) + " on shard_dim " +
                            Num(pl.shard_dim) + "; valid: [" + Num(offset) + ", +" + Num(size) +
                            ")");
    }
  }
  return Status::OK();
}

Status CheckFlat(const Placement& pl, int64_t numel, const std::string& where) {
  if (pl.flat_group < 0) {
    return Bad(where,
               "names neither a param (rectangle form) nor a flat_group (flat form, "
               "flat_group >= 0); flat_group is " +
                   Num(pl.flat_group));
  }
  if (pl.flat_offset < 0 || !CheckedAdd64(pl.flat_offset, pl.flat_numel)) {
    return Bad(where, "flat_offset " + Num(pl.flat_offset) + " is negative or overflows");
  }
  if (pl.flat_numel != numel) {
    return Bad(where, "flat_numel " + Num(pl.flat_numel) + " differs from the tensor's " +
                          Num(numel) + " elements");
  }
  int64_t prev_end = 0;
  for (size_t i = 0; i < pl.segments.size(); ++i) {
    const PlacementSegment& s = pl.segments[i];
    const std::string seg = "segment " + Num(static_cast<int64_t>(i)) + " (" + s.param + ")";
    if (s.param.empty()) return Bad(where, seg + " names no param");
    if (s.start < 0 || s.numel < 0 || s.shard_start < 0) {
      return Bad(where, seg + " is negative: start " + Num(s.start) + ", numel " + Num(s.numel) +
                            ", shard_start " + Num(s.shard_start) + "; valid: all >= 0");
    }
    const auto end = CheckedAdd64(s.start, s.numel);
    if (!end || *end > pl.flat_numel) {
      return Bad(where, seg + " [" + Num(s.start) + ", +" + Num(s.numel) +
                            ") lies outside the buffer's " + Num(pl.flat_numel) + " elements");
    }
    if (s.start < prev_end) {
      return Bad(where, seg + " starts at " + Num(s.start) +
                            ", inside the segment before it "
                            "(which ends at " +
                            Num(prev_end) + "); segments are in buffer order without overlap");
    }
    if (!CheckedAdd64(s.shard_start, s.numel)) {
      return Bad(where, seg + ": shard_start " + Num(s.shard_start) + " + numel overflows");
    }
    prev_end = *end;
  }
  return Status::OK();
}

}  // namespace

Status CheckPlacement(const Placement& pl, const std::vector<int64_t>& tensor_shape,
                      const std::string& where) {
  const auto numel = CheckedNumel(tensor_shape);
  if (!numel) {
    return Status::Corruption(where + ": tensor shape " + ShapeString(tensor_shape) +
                              " has a negative dimension or overflows");
  }
  if (!CheckedNumel(pl.global_shape)) {
    return Bad(where, "global_shape " + ShapeString(pl.global_shape) +
                          " has a negative dimension or overflows");
  }
  RETURN_IF_ERROR(CheckTp(pl, pl.global_shape, where));
  if (!pl.param.empty()) return CheckRect(pl, tensor_shape, *numel, where);
  return CheckFlat(pl, *numel, where);
}

Result<Rect> SegmentShard(const Placement& pl, const PlacementSegment& seg,
                          const std::vector<int64_t>& global_shape, int shard_dim,
                          const std::string& where) {
  const auto rank = static_cast<int64_t>(global_shape.size());
  if (!CheckedNumel(global_shape) || shard_dim < -1 || shard_dim >= rank) {
    return Status::Corruption(where + ": segment of " + seg.param + ": its parameter's shape " +
                              ShapeString(global_shape) + " and shard_dim " + Num(shard_dim) +
                              " are not valid (shard_dim -1 or in [0, " + Num(rank) + "))");
  }
  Rect shard{std::vector<int64_t>(global_shape.size(), 0), global_shape};
  if (shard_dim >= 0 && pl.tp_degree > 0) {
    if (global_shape[shard_dim] % pl.tp_degree != 0 || pl.tp_rank < 0 ||
        pl.tp_rank >= pl.tp_degree) {
      return Bad(where, "tp_rank " + Num(pl.tp_rank) + " of tp_degree " + Num(pl.tp_degree) +
                            " does not name a shard of " + seg.param + " (dimension " +
                            Num(shard_dim) + " of " + ShapeString(global_shape) +
                            "); valid: a tp_degree that divides it and 0 <= tp_rank < tp_degree");
    }
    shard.shape[shard_dim] /= pl.tp_degree;
    shard.offsets[shard_dim] = shard.shape[shard_dim] * pl.tp_rank;
  }
  const auto end = CheckedAdd64(seg.shard_start, seg.numel);
  if (seg.shard_start < 0 || seg.numel < 0 || !end || *end > shard.numel()) {
    return Bad(where, "segment of " + seg.param + " [" + Num(seg.shard_start) + ", +" +
                          Num(seg.numel) + ") lies outside its TP shard " +
                          ShapeString(shard.shape) + " of " + Num(shard.numel()) + " elements");
  }
  return shard;
}

namespace {

// The first problem among `ids` (rectangles that span the current slab in
// the dimensions before `dim`; `at` holds the slab's first element there)
// over the target's dimensions from `dim` on.
std::optional<CoverProblem> CoverFrom(const std::vector<Rect>& rects, std::vector<size_t> ids,
                                      const Rect& target, size_t dim, std::vector<int64_t>& at) {
  const int64_t lo = target.offsets[dim];
  const int64_t hi = lo + target.shape[dim];
  auto begin = [&](size_t i) { return rects[i].offsets[dim]; };
  auto end = [&](size_t i) { return rects[i].offsets[dim] + rects[i].shape[dim]; };
  std::sort(ids.begin(), ids.end(),
            [&](size_t a, size_t b) { return begin(a) != begin(b) ? begin(a) < begin(b) : a < b; });
  auto problem = [&](int64_t x, bool overlap) {
    at[dim] = x;
    for (size_t d = dim + 1; d < at.size(); ++d) at[d] = target.offsets[d];
    return CoverProblem{at, overlap};
  };
  if (dim + 1 == target.shape.size()) {
    int64_t pos = lo;
    for (size_t i : ids) {
      if (begin(i) > pos) return problem(pos, false);
      if (begin(i) < pos) return problem(begin(i), true);
      pos = end(i);
    }
    if (pos < hi) return problem(pos, false);
    return std::nullopt;
  }
  std::vector<int64_t> cuts{lo, hi};
  for (size_t i : ids) {
    cuts.push_back(begin(i));
    cuts.push_back(end(i));
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<size_t> active;
  size_t next = 0;
  bool changed = true;
  for (size_t c = 0; c + 1 < cuts.size(); ++c) {
    const int64_t b = cuts[c];
    const size_t before = active.size();
    active.erase(
        std::remove_if(active.begin(), active.end(), [&](size_t i) { return end(i) <= b; }),
        active.end());
    changed = changed || active.size() != before;
    for (; next < ids.size() && begin(ids[next]) <= b; ++next) {
      active.push_back(ids[next]);
      changed = true;
    }
    if (active.empty()) return problem(b, false);
    // A slab with the same rectangles as the one before has its answer.
    if (!changed) continue;
    changed = false;
    at[dim] = b;
    if (auto p = CoverFrom(rects, active, target, dim + 1, at)) return p;
  }
  return std::nullopt;
}

}  // namespace

std::optional<CoverProblem> FirstCoverProblem(const std::vector<Rect>& pieces, const Rect& target) {
  if (target.empty()) return std::nullopt;
  std::vector<size_t> ids;
  for (size_t i = 0; i < pieces.size(); ++i) {
    if (!pieces[i].empty()) ids.push_back(i);
  }
  if (target.shape.empty()) {  // a scalar
    if (ids.size() == 1) return std::nullopt;
    return CoverProblem{{}, !ids.empty()};
  }
  std::vector<int64_t> at(target.shape.size(), 0);
  return CoverFrom(pieces, std::move(ids), target, 0, at);
}

Status FillFromPlacement(const ModelSpec& spec, const Placement& pl, FragmentSource& source,
                         const at::Tensor& out) {
  return FillRangeFromPlacement(spec, pl, source, out.sizes().vec(), 0, out.numel(),
                                out.view({-1}));
}

Status FillRangeFromPlacement(const ModelSpec& spec, const Placement& pl, FragmentSource& source,
                              const std::vector<int64_t>& shape, int64_t begin, int64_t end,
                              const at::Tensor& out) {
  const auto n = CheckedNumel(shape);
  if (!n || begin < 0 || end > *n || begin > end || out.numel() != end - begin) {
    return Status::InvalidArgument("elements [" + std::to_string(begin) + ", " +
                                   std::to_string(end) + ") of a tensor of shape " +
                                   ShapeString(shape) + " into " + std::to_string(out.numel()) +
                                   " elements");
  }
  const int64_t numel = *n;
  const std::string where =
      "placement of " +
      (pl.param.empty() ? "flat group " + std::to_string(pl.flat_group) : pl.param) + " (" +
      pl.state + ")";
  RETURN_IF_ERROR(CheckPlacement(pl, shape, where));
  out.zero_();
  if (begin == end) return Status::OK();
  source.Prefer(pl.tp_rank, pl.tp_degree);
  if (!pl.param.empty()) {
    const Rect r{pl.offsets, pl.shard_shape.empty() ? shape : pl.shard_shape};
    if (r.numel() != numel) {
      return Status::InvalidArgument(where + " covers " + ShapeString(r.shape) +
                                     " but the tensor has shape " + ShapeString(shape));
    }
    for (const FlatRect& fr : SplitFlatRange(r.shape, begin, end)) {
      Rect g = fr.rect;
      for (size_t d = 0; d < g.offsets.size(); ++d) g.offsets[d] += r.offsets[d];
      at::Tensor dst = out.narrow(0, fr.flat_begin - begin, g.numel()).view(g.shape);
      RETURN_IF_ERROR(source.Fill(pl.param, pl.state, g, dst));
    }
    return Status::OK();
  }
  // Segments are in buffer order without overlap (CheckPlacement): the
  // first one that ends after `begin` is found by bisection.
  auto seg =
      std::partition_point(pl.segments.begin(), pl.segments.end(),
                           [&](const PlacementSegment& s) { return s.start + s.numel <= begin; });
  for (; seg != pl.segments.end() && seg->start < end; ++seg) {
    const ParamSpec* p = spec.Find(seg->param);
    if (p == nullptr) {
      return Status::InvalidArgument(where + ": segment names unknown parameter " + seg->param);
    }
    ASSIGN_OR_RETURN(Rect shard, SegmentShard(pl, *seg, p->global_shape, p->shard_dim, where));
    // The part of this segment inside [begin, end), in the parameter's shard.
    const int64_t lo = std::max(begin, seg->start);
    const int64_t hi = std::min(end, seg->start + seg->numel);
    if (lo >= hi) continue;
    const int64_t shard_lo = seg->shard_start + (lo - seg->start);
    for (const FlatRect& fr : SplitFlatRange(shard.shape, shard_lo, shard_lo + (hi - lo))) {
      Rect g = fr.rect;
      for (size_t d = 0; d < g.offsets.size(); ++d) g.offsets[d] += shard.offsets[d];
      at::Tensor dst =
          out.narrow(0, (lo - begin) + (fr.flat_begin - shard_lo), g.numel()).view(g.shape);
      RETURN_IF_ERROR(source.Fill(seg->param, pl.state, g, dst));
    }
  }
  return Status::OK();
}

}  // namespace ckptkv::checkpoint
