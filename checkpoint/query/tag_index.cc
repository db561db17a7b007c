#include "checkpoint/query/tag_index.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <tuple>
#include <unordered_set>

#include "checkpoint/core/file_names.h"
#include "checkpoint/query/writer.h"
#include "engine/state_codec.h"
#include "engine/torch_call.h"
#include "schema/records.h"
#include "store/names.h"

namespace ckptkv::checkpoint {

namespace {

std::string Key(const std::string& param, const std::string& state) { return param + "\n" + state; }

// The MP rank of a DeepSpeed file name, or -1.
int MpRankOf(const std::string& file) {
  auto c = ParseFileName(file);
  return c ? c->mp_rank : -1;
}

std::vector<int64_t> Vec(const flatbuffers::Vector<int64_t>* v) {
  return v ? std::vector<int64_t>(v->begin(), v->end()) : std::vector<int64_t>();
}

std::vector<int64_t> RowMajorStrides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> s(shape.size(), 1);
  for (size_t d = shape.size(); d-- > 1;) s[d - 1] = s[d] * shape[d];
  return s;
}

size_t EditDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t prev = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t cur = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] == b[j - 1] ? 0 : 1)});
      prev = cur;
    }
  }
  return row[b.size()];
}

}  // namespace

std::string Closest(const std::string& name, std::vector<std::string> names) {
  if (names.empty()) return "there are none";
  std::stable_sort(names.begin(), names.end(), [&](const std::string& x, const std::string& y) {
    return EditDistance(name, x) < EditDistance(name, y);
  });
  std::string s = "closest: ";
  for (size_t i = 0; i < names.size() && i < 3; ++i) s += (i ? ", " : "") + names[i];
  return s;
}

Placement PlacementOf(const fb::Placement& p) {
  Placement pl;
  pl.global_shape = Vec(p.global_shape());
  pl.offsets = Vec(p.offsets());
  pl.flat_group = p.flat_group();
  pl.flat_offset = p.flat_offset();
  pl.flat_numel = p.flat_numel();
  if (p.param()) pl.param = p.param()->str();
  if (p.state()) pl.state = p.state()->str();
  pl.shard_shape = Vec(p.shard_shape());
  if (p.segments()) {
    for (const auto* s : *p.segments()) {
      pl.segments.push_back(PlacementSegment{s->param() ? s->param()->str() : "", s->start(),
                                             s->numel(), s->shard_start()});
    }
  }
  pl.tp_rank = p.tp_rank();
  pl.tp_degree = p.tp_degree();
  pl.shard_dim = p.shard_dim();
  return pl;
}

std::string PlacementSignature(const Placement& p, fb::DType dtype) {
  std::string s = std::to_string(static_cast<int>(dtype)) + "|" + p.state + "|" + p.param + "|" +
                  ShapeString(p.offsets) + ShapeString(p.shard_shape) + "|" +
                  std::to_string(p.tp_rank) + "/" + std::to_string(p.tp_degree) + "|" +
                  std::to_string(p.flat_numel) + "|";
  for (const auto& g : p.segments) {
    s += g.param + "@" + std::to_string(g.start) + "+" + std::to_string(g.numel) + ":" +
         std::to_string(g.shard_start) + ";";
  }
  return s;
}

Result<std::unique_ptr<TagIndex>> TagIndex::Build(const Store& store, const std::string& tag) {
  std::unique_ptr<TagIndex> ix(new TagIndex(store, tag));
  ASSIGN_OR_RETURN(std::vector<std::string> files, store.ListFiles(tag));
  std::map<std::string, std::string> info_from;  // param -> the tensor its ParamInfo came from
  for (const auto& file : files) {
    ASSIGN_OR_RETURN(std::vector<std::string> paths, store.ListParams(tag, file));
    for (const auto& path : paths) {
      ASSIGN_OR_RETURN(TensorRecordRef rec, store.GetTensorRecord(tag, file, path));
      if (rec->placement() == nullptr) continue;
      StoredTensor st{file, path, rec, PlacementOf(*rec->placement())};
      const Placement& pl = st.placement;
      const std::string where = TensorName(tag, file, path);
      RETURN_IF_ERROR(CheckPlacement(pl, Vec(rec->shape()), where));
      if (!pl.param.empty()) {
        auto [it, fresh] = ix->params_.try_emplace(pl.param);
        ParamInfo& info = it->second;
        if (fresh) {
          info.global_shape = pl.global_shape;
          info_from[pl.param] = where;
        } else if (info.global_shape != pl.global_shape) {
          return Status::Corruption(where + ": placement global_shape " +
                                    ShapeString(pl.global_shape) + " of " + pl.param +
                                    " differs from " + ShapeString(info.global_shape) + " in " +
                                    info_from[pl.param]);
        }
        if (pl.shard_dim >= 0) {
          if (info.shard_dim >= 0 && info.shard_dim != pl.shard_dim) {
            return Status::Corruption(where + ": placement shard_dim " +
                                      std::to_string(pl.shard_dim) + " of " + pl.param +
                                      " differs from " + std::to_string(info.shard_dim) +
                                      " in another fragment of it");
          }
          info.shard_dim = pl.shard_dim;
        }
      }
      ix->tensors_.push_back(std::move(st));
    }
  }
  // Copies by (set, stage, TP rank of a replicated parameter), and the
  // rectangles already in each: an identical rectangle in the same copy is
  // a replica (another file's copy of the same module tensor), read once.
  std::map<std::tuple<std::string, int, int>, size_t> copy_of;
  std::unordered_set<std::string> rects;
  std::map<std::string, int> mp_rank;  // by file
  auto add = [&](const std::string& key, const Placement& pl, int stage, int shard_dim, Piece piece,
                 bool replicas) {
    const int tp_rank = shard_dim < 0 ? pl.tp_rank : -1;
    PieceSet& set = ix->pieces_[key];
    auto [it, fresh] = copy_of.try_emplace({key, stage, tp_rank}, set.copies.size());
    if (fresh) set.copies.push_back(PieceCopy{stage, tp_rank, pl.tp_degree, {}, {}});
    if (replicas) {
      const std::string sig = key + "\n" + std::to_string(it->second) +
                              ShapeString(piece.rect.offsets) + ShapeString(piece.rect.shape);
      if (!rects.insert(sig).second) return;
    }
    set.copies[it->second].by_row.push_back(set.pieces.size());
    set.pieces.push_back(std::move(piece));
  };
  for (size_t t = 0; t < ix->tensors_.size(); ++t) {
    const StoredTensor& st = ix->tensors_[t];
    const Placement& pl = st.placement;
    const std::string where = TensorName(tag, st.file, st.path);
    const std::vector<int64_t> shape = Vec(st.record->shape());
    if (pl.state == "placeholder") continue;
    ix->exact_.emplace(PlacementSignature(pl, st.record->dtype()), t);
    // The pipeline stage of the file (mp = pp * tp + tp_rank).
    auto mp = mp_rank.try_emplace(st.file, 0);
    if (mp.second) mp.first->second = MpRankOf(st.file);
    const int stage =
        mp.first->second < 0 || pl.tp_degree <= 0 ? -1 : mp.first->second / pl.tp_degree;
    if (!pl.param.empty()) {
      Rect r{pl.offsets, pl.shard_shape.empty() ? shape : pl.shard_shape};
      add(Key(pl.param, pl.state), pl, stage, ix->params_[pl.param].shard_dim, Piece{t, r, 0},
          /*replicas=*/true);
      continue;
    }
    for (const auto& seg : pl.segments) {
      auto it = ix->params_.find(seg.param);
      if (it == ix->params_.end()) {
        return Status::Corruption(where + ": segment names parameter " + seg.param +
                                  " that no fragment of the tag describes");
      }
      const ParamInfo& info = it->second;
      ASSIGN_OR_RETURN(Rect shard, SegmentShard(pl, seg, info.global_shape, info.shard_dim, where));
      for (const FlatRect& fr :
           SplitFlatRange(shard.shape, seg.shard_start, seg.shard_start + seg.numel)) {
        Rect g = fr.rect;
        for (size_t d = 0; d < g.offsets.size(); ++d) g.offsets[d] += shard.offsets[d];
        add(Key(seg.param, pl.state), pl, stage, info.shard_dim,
            Piece{t, g, seg.start + (fr.flat_begin - seg.shard_start)}, /*replicas=*/false);
      }
    }
  }
  for (auto& [key, set] : ix->pieces_) {
    set.bounds = set.pieces.front().rect;
    for (const Piece& pc : set.pieces) {
      for (size_t d = 0; d < pc.rect.shape.size() && d < set.bounds.shape.size(); ++d) {
        const int64_t lo = std::min(set.bounds.offsets[d], pc.rect.offsets[d]);
        const int64_t hi = std::max(set.bounds.offsets[d] + set.bounds.shape[d],
                                    pc.rect.offsets[d] + pc.rect.shape[d]);
        set.bounds.offsets[d] = lo;
        set.bounds.shape[d] = hi - lo;
      }
    }
    for (PieceCopy& c : set.copies) {
      auto row = [&](size_t i) {
        const Rect& r = set.pieces[i].rect;
        return r.offsets.empty() ? int64_t{0} : r.offsets[0];
      };
      std::stable_sort(c.by_row.begin(), c.by_row.end(),
                       [&](size_t a, size_t b) { return row(a) < row(b); });
      int64_t reach = 0;
      for (size_t i : c.by_row) {
        const Rect& r = set.pieces[i].rect;
        reach = std::max(reach, r.offsets.empty() ? int64_t{1} : r.offsets[0] + r.shape[0]);
        c.reach.push_back(reach);
      }
    }
  }
  return ix;
}

const PieceSet* TagIndex::PiecesFor(const std::string& param, const std::string& state) const {
  auto it = pieces_.find(Key(param, state));
  if (it == pieces_.end() && state == "param") it = pieces_.find(Key(param, "fp32"));
  return it == pieces_.end() ? nullptr : &it->second;
}

Result<std::vector<ReadStep>> TagIndex::Plan(const std::string& param, const std::string& state,
                                             const Rect& rect) const {
  const PieceSet* set = PiecesFor(param, state);
  if (set == nullptr) {
    std::vector<std::string> names;
    for (const auto& [p, info] : params_) names.push_back(p);
    return Status::NotFound("tag " + Quote(tag_) + " has no fragment of " + param + " (" + state +
                            ")" + (params_.count(param) ? "" : "; " + Closest(param, names)));
  }
  const std::string what = param + " (" + state + ")";
  if (auto info = params_.find(param); info != params_.end()) {
    const Rect whole{std::vector<int64_t>(info->second.global_shape.size(), 0),
                     info->second.global_shape};
    if (rect.offsets.size() != whole.shape.size() || rect.shape.size() != whole.shape.size() ||
        !Contains(whole, rect)) {
      return Status::InvalidArgument("rectangle at " + ShapeString(rect.offsets) + " of shape " +
                                     ShapeString(rect.shape) + " is not inside " + what +
                                     " of shape " + ShapeString(whole.shape));
    }
  }
  if (rect.empty()) return std::vector<ReadStep>();
  // Preferred copies first, so replicated data comes from the matching ranks.
  std::vector<const PieceCopy*> order;
  for (const PieceCopy& c : set->copies) {
    if (Preferred(c)) order.push_back(&c);
  }
  for (const PieceCopy& c : set->copies) {
    if (!Preferred(c)) order.push_back(&c);
  }
  const bool scalar = rect.shape.empty();
  const int64_t row_lo = scalar ? 0 : rect.offsets[0];
  const int64_t row_hi = scalar ? 1 : rect.offsets[0] + rect.shape[0];
  // The two problems the sweep can find (messages built off the loop).
  auto overlap_error = [&](const std::string& at, const std::string& in) {
    return Status::Corruption("tag " + Quote(tag_) + ": element " + at + " of " + what +
                              " is in more than one fragment (" + in +
                              "); their placements overlap");
  };
  auto gap_error = [&](const std::string& at) {
    return Status::Corruption(
        "tag " + Quote(tag_) + ": element " + at + " of " + what +
        " is in no fragment of the tag (a file is missing or a placement leaves it out); " +
        "a reshape needs every element of " + ShapeString(rect.shape) + " at " +
        ShapeString(rect.offsets) + " exactly once");
  };
  std::optional<Status> gap;
  for (const PieceCopy* c : order) {
    // The pieces that start before row_hi and reach past row_lo.
    std::vector<size_t> hit;
    std::vector<Rect> inter;
    const auto first_after = std::partition_point(
        c->by_row.begin(), c->by_row.end(),
        [&](size_t i) { return scalar || set->pieces[i].rect.offsets[0] < row_hi; });
    for (auto k = static_cast<size_t>(first_after - c->by_row.begin()); k-- > 0;) {
      if (c->reach[k] <= row_lo) break;
      const Piece& pc = set->pieces[c->by_row[k]];
      Rect r = Intersect(pc.rect, rect);
      if (r.empty()) continue;
      hit.push_back(c->by_row[k]);
      inter.push_back(std::move(r));
    }
    if (auto problem = FirstCoverProblem(inter, rect)) {
      const std::string at = ShapeString(problem->at);
      if (problem->overlap) {
        std::string in;
        for (size_t k = 0; k < hit.size(); ++k) {
          if (!Contains(inter[k], Rect{problem->at, std::vector<int64_t>(problem->at.size(), 1)})) {
            continue;
          }
          const StoredTensor& st = tensors_[set->pieces[hit[k]].tensor];
          in.append(in.empty() ? "" : " and ").append(st.file).append(":").append(st.path);
        }
        return overlap_error(at, in);
      }
      if (!gap) gap = gap_error(at);
      continue;
    }
    std::sort(hit.begin(), hit.end());  // pieces in tensor order, as stored
    std::vector<ReadStep> steps;
    steps.reserve(hit.size());
    for (size_t i : hit) {
      const Piece& pc = set->pieces[i];
      const Rect target = Intersect(pc.rect, rect);
      const StoredTensor& st = tensors_[pc.tensor];
      const auto strides = RowMajorStrides(pc.rect.shape);
      int64_t first = 0, last = 0;
      for (size_t d = 0; d < strides.size(); ++d) {
        const int64_t l = target.offsets[d] - pc.rect.offsets[d];
        first += l * strides[d];
        last += (l + target.shape[d] - 1) * strides[d];
      }
      const uint64_t es = DTypeSize(st.record->dtype());
      ReadStep s;
      s.tensor = pc.tensor;
      s.byte_offset = static_cast<uint64_t>(pc.elem_begin + first) * es;
      s.byte_length = static_cast<uint64_t>(last - first + 1) * es;
      const uint64_t cs = st.record->chunk_size() ? st.record->chunk_size() : 1;
      s.first_chunk = s.byte_offset / cs;
      s.chunks = st.record->inline_data()
                     ? 0
                     : (s.byte_offset + s.byte_length - 1) / cs + 1 - s.first_chunk;
      s.target = target;
      s.piece_shape = pc.rect.shape;
      steps.push_back(std::move(s));
    }
    return steps;
  }
  return *gap;
}

Status TagIndex::Fill(const std::string& param, const std::string& state, const Rect& rect,
                      at::Tensor out) {
  ASSIGN_OR_RETURN(std::vector<ReadStep> steps, Plan(param, state, rect));
  for (const ReadStep& s : steps) {
    const StoredTensor& st = tensors_[s.tensor];
    const c10::ScalarType type = ToScalarType(st.record->dtype());
    const int64_t es = static_cast<int64_t>(DTypeSize(st.record->dtype()));
    at::Tensor buf = at::empty({static_cast<int64_t>(s.byte_length) / es}, type);
    RETURN_IF_ERROR(ReadBytes(s, static_cast<uint8_t*>(buf.data_ptr())));
    if (out.device() != buf.device()) buf = buf.to(out.device());
    at::Tensor src = buf.as_strided(s.target.shape, RowMajorStrides(s.piece_shape), 0);
    at::Tensor dst = out;
    for (size_t d = 0; d < s.target.shape.size(); ++d) {
      dst = dst.narrow(static_cast<int64_t>(d), s.target.offsets[d] - rect.offsets[d],
                       s.target.shape[d]);
    }
    dst.copy_(src);
  }
  return Status::OK();
}

bool TagIndex::Preferred(const PieceCopy& c) const {
  if (prefer_degree_ <= 0 || c.tp_rank < 0 || c.tp_degree <= 0) return false;
  // Rank ranges [r/R, (r+1)/R) of the two degrees overlap.
  const int64_t a0 = int64_t{c.tp_rank} * prefer_degree_;
  const int64_t a1 = a0 + prefer_degree_;
  const int64_t b0 = int64_t{prefer_rank_} * c.tp_degree;
  const int64_t b1 = b0 + c.tp_degree;
  return a0 < b1 && b0 < a1;
}

Status TagIndex::CopyChunk(size_t tensor, uint64_t chunk, uint64_t lo, uint64_t hi, uint8_t* dst) {
  const StoredTensor& st = tensors_[tensor];
  const uint64_t cs = st.record->chunk_size();
  const auto key = std::make_pair(tensor, chunk);
  auto it = cache_.find(key);
  if (it == cache_.end()) {
    std::string bytes(std::min(cs, st.record->byte_length() - chunk * cs), '\0');
    RETURN_IF_ERROR(store_.ReadTensorRange(*st.record.get(), chunk * cs, bytes.size(),
                                           reinterpret_cast<uint8_t*>(bytes.data()),
                                           TensorName(tag_, st.file, st.path)));
    cache_bytes_ += bytes.size();
    it = cache_.emplace(key, std::move(bytes)).first;
    cache_order_.push_back(key);
    while (cache_bytes_ > kCacheLimit && cache_order_.size() > 1) {
      auto old = cache_.find(cache_order_.front());
      cache_bytes_ -= old->second.size();
      cache_.erase(old);
      cache_order_.pop_front();
    }
  }
  std::memcpy(dst, it->second.data() + (lo - chunk * cs), hi - lo);
  return Status::OK();
}

Status TagIndex::ReadBytes(const ReadStep& s, uint8_t* dst) {
  const StoredTensor& st = tensors_[s.tensor];
  if (s.chunks == 0) {
    return store_.ReadTensorRange(*st.record.get(), s.byte_offset, s.byte_length, dst,
                                  TensorName(tag_, st.file, st.path));
  }
  const uint64_t cs = st.record->chunk_size();
  const uint64_t begin = s.byte_offset, end = s.byte_offset + s.byte_length;
  // Whole chunks inside the range go straight from the store; chunks the
  // range covers only in part go through the cache, because the pieces next
  // to this one (the neighbouring parameters of a flat buffer, the other
  // rows of a shard) read the rest of them.
  uint64_t whole_lo = (begin + cs - 1) / cs * cs;
  uint64_t whole_hi = end / cs * cs;
  if (s.chunks <= 2 || whole_hi <= whole_lo) whole_lo = whole_hi = begin;
  if (whole_hi > whole_lo) {
    RETURN_IF_ERROR(store_.ReadTensorRange(*st.record.get(), whole_lo, whole_hi - whole_lo,
                                           dst + (whole_lo - begin),
                                           TensorName(tag_, st.file, st.path)));
  }
  for (uint64_t c = s.first_chunk; c < s.first_chunk + s.chunks; ++c) {
    const uint64_t lo = std::max(begin, c * cs);
    const uint64_t hi = std::min(end, (c + 1) * cs);
    if (lo >= hi || (lo >= whole_lo && hi <= whole_hi)) continue;
    RETURN_IF_ERROR(CopyChunk(s.tensor, c, lo, hi, dst + (lo - begin)));
  }
  return Status::OK();
}

std::optional<Rect> TagIndex::Bounds(const std::string& param, const std::string& state) const {
  const PieceSet* set = PiecesFor(param, state);
  if (set == nullptr) return std::nullopt;
  return set->bounds;
}

const StoredTensor* TagIndex::ExactStored(const Placement& placement, fb::DType dtype) const {
  auto it = exact_.find(PlacementSignature(placement, dtype));
  return it == exact_.end() ? nullptr : &tensors_[it->second];
}

const fb::TensorRecord* TagIndex::Exact(const Placement& placement, fb::DType dtype) {
  auto it = exact_.find(PlacementSignature(placement, dtype));
  return it == exact_.end() ? nullptr : tensors_[it->second].record.get();
}

Result<at::Tensor> TagIndex::Assemble(const std::string& param, const std::string& state,
                                      const std::string& device) {
  RETURN_IF_ERROR(CheckDevice(device));
  auto it = params_.find(param);
  if (it == params_.end()) {
    std::vector<std::string> names;
    for (const auto& [p, info] : params_) names.push_back(p);
    return Status::NotFound("tag " + Quote(tag_) + " has no parameter " + param + "; " +
                            Closest(param, names));
  }
  const PieceSet* pieces = PiecesFor(param, state);
  if (pieces == nullptr || pieces->pieces.empty()) {
    return Status::NotFound(param + " has no state " + state);
  }
  const c10::ScalarType type =
      ToScalarType(tensors_[pieces->pieces.front().tensor].record->dtype());
  // The output is allocated, and the pieces copied, on `device`: LibTorch
  // reports an exhausted or failing device by throwing.
  return TorchCall(
      TorchErrorKind::kDevice, "assembling " + param + " " + state + " on " + device,
      [&]() -> Result<at::Tensor> {
        at::Tensor out = at::zeros(it->second.global_shape,
                                   at::TensorOptions().dtype(type).device(c10::Device(device)));
        RETURN_IF_ERROR(Fill(
            param, state, Rect{std::vector<int64_t>(out.dim(), 0), it->second.global_shape}, out));
        return out;
      });
}

}  // namespace ckptkv::checkpoint
