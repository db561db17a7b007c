#include "checkpoint/tag_index.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#include "checkpoint/writer.h"
#include "engine/state_codec.h"
#include "schema/records.h"
#include "store/names.h"

namespace ckptkv::checkpoint {

namespace {

std::string Key(const std::string& param, const std::string& state) { return param + "\n" + state; }

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
  for (const auto& file : files) {
    ASSIGN_OR_RETURN(std::vector<std::string> paths, store.ListParams(tag, file));
    for (const auto& path : paths) {
      ASSIGN_OR_RETURN(TensorRecordRef rec, store.GetTensorRecord(tag, file, path));
      if (rec->placement() == nullptr) continue;
      StoredTensor st{file, path, rec, PlacementOf(*rec->placement())};
      const Placement& pl = st.placement;
      if (!pl.param.empty() && !pl.global_shape.empty()) {
        ParamInfo& info = ix->params_[pl.param];
        info.global_shape = pl.global_shape;
        if (pl.shard_dim >= 0) info.shard_dim = pl.shard_dim;
      }
      ix->tensors_.push_back(std::move(st));
    }
  }
  for (size_t t = 0; t < ix->tensors_.size(); ++t) {
    const StoredTensor& st = ix->tensors_[t];
    const Placement& pl = st.placement;
    const std::string where = tag + "/" + st.file + ":" + st.path;
    const std::vector<int64_t> shape = Vec(st.record->shape());
    if (pl.state == "placeholder") continue;
    ix->exact_.emplace(PlacementSignature(pl, st.record->dtype()), t);
    if (pl.segments.empty()) {
      Rect r{pl.offsets, pl.shard_shape.empty() ? shape : pl.shard_shape};
      if (r.numel() != Numel(shape) || r.offsets.size() != r.shape.size()) {
        return Status::Corruption(where + ": placement " + ShapeString(r.shape) +
                                  " does not match the tensor's shape " + ShapeString(shape));
      }
      ix->pieces_[Key(pl.param, pl.state)].push_back(Piece{t, r, 0});
      continue;
    }
    const int64_t numel = Numel(shape);
    for (const auto& seg : pl.segments) {
      auto it = ix->params_.find(seg.param);
      if (it == ix->params_.end()) {
        return Status::Corruption(where + ": segment names parameter " + seg.param +
                                  " that no fragment of the tag describes");
      }
      const ParamInfo& info = it->second;
      Rect shard{std::vector<int64_t>(info.global_shape.size(), 0), info.global_shape};
      if (info.shard_dim >= 0 && pl.tp_degree > 0) {
        shard.shape[info.shard_dim] /= pl.tp_degree;
        shard.offsets[info.shard_dim] = shard.shape[info.shard_dim] * pl.tp_rank;
      }
      if (seg.start < 0 || seg.start + seg.numel > numel ||
          seg.shard_start + seg.numel > shard.numel()) {
        return Status::Corruption(where + ": segment of " + seg.param + " lies outside its buffer");
      }
      for (const FlatRect& fr :
           SplitFlatRange(shard.shape, seg.shard_start, seg.shard_start + seg.numel)) {
        Rect g = fr.rect;
        for (size_t d = 0; d < g.offsets.size(); ++d) g.offsets[d] += shard.offsets[d];
        ix->pieces_[Key(seg.param, pl.state)].push_back(
            Piece{t, g, seg.start + (fr.flat_begin - seg.shard_start)});
      }
    }
  }
  return ix;
}

std::vector<std::string> TagIndex::States(const std::string& param) const {
  std::vector<std::string> out;
  for (auto it = pieces_.lower_bound(param + "\n"); it != pieces_.end(); ++it) {
    if (it->first.compare(0, param.size() + 1, param + "\n") != 0) break;
    out.push_back(it->first.substr(param.size() + 1));
  }
  return out;
}

const std::vector<Piece>* TagIndex::PiecesFor(const std::string& param,
                                              const std::string& state) const {
  auto it = pieces_.find(Key(param, state));
  if (it == pieces_.end() && state == "param") it = pieces_.find(Key(param, "fp32"));
  return it == pieces_.end() ? nullptr : &it->second;
}

Result<std::vector<ReadStep>> TagIndex::Plan(const std::string& param, const std::string& state,
                                             const Rect& rect) const {
  const std::vector<Piece>* pieces = PiecesFor(param, state);
  if (pieces == nullptr) {
    std::vector<std::string> names;
    for (const auto& [p, info] : params_) names.push_back(p);
    return Status::NotFound("tag " + Quote(tag_) + " has no fragment of " + param + " (" + state +
                            ")" + (params_.count(param) ? "" : "; " + Closest(param, names)));
  }
  std::vector<ReadStep> steps;
  std::vector<Rect> covered;
  // Preferred copies first, so replicated data comes from the matching ranks.
  std::vector<const Piece*> order;
  for (const Piece& pc : *pieces) {
    if (Preferred(pc)) order.push_back(&pc);
  }
  for (const Piece& pc : *pieces) {
    if (!Preferred(pc)) order.push_back(&pc);
  }
  for (const Piece* pcp : order) {
    const Piece& pc = *pcp;
    Rect inter = Intersect(pc.rect, rect);
    if (inter.empty()) continue;
    bool dup = false;
    for (const Rect& c : covered) dup = dup || Contains(c, inter);
    if (dup) continue;
    covered.push_back(inter);
    const StoredTensor& st = tensors_[pc.tensor];
    const auto strides = RowMajorStrides(pc.rect.shape);
    int64_t first = 0, last = 0;
    for (size_t d = 0; d < strides.size(); ++d) {
      const int64_t l = inter.offsets[d] - pc.rect.offsets[d];
      first += l * strides[d];
      last += (l + inter.shape[d] - 1) * strides[d];
    }
    const uint64_t es = DTypeSize(st.record->dtype());
    ReadStep s;
    s.tensor = pc.tensor;
    s.byte_offset = static_cast<uint64_t>(pc.elem_begin + first) * es;
    s.byte_length = static_cast<uint64_t>(last - first + 1) * es;
    const uint64_t cs = st.record->chunk_size() ? st.record->chunk_size() : 1;
    s.first_chunk = s.byte_offset / cs;
    s.chunks =
        st.record->inline_data() ? 0 : (s.byte_offset + s.byte_length - 1) / cs + 1 - s.first_chunk;
    s.target = inter;
    steps.push_back(std::move(s));
  }
  return steps;
}

Status TagIndex::Fill(const std::string& param, const std::string& state, const Rect& rect,
                      at::Tensor out) {
  ASSIGN_OR_RETURN(std::vector<ReadStep> steps, Plan(param, state, rect));
  const std::vector<Piece>& pieces = *PiecesFor(param, state);
  for (const ReadStep& s : steps) {
    const StoredTensor& st = tensors_[s.tensor];
    const Piece* pc = nullptr;
    for (const Piece& p : pieces) {
      if (p.tensor == s.tensor && Contains(p.rect, s.target)) {
        pc = &p;
        break;
      }
    }
    const c10::ScalarType type = ToScalarType(st.record->dtype());
    const int64_t es = static_cast<int64_t>(DTypeSize(st.record->dtype()));
    at::Tensor buf = at::empty({static_cast<int64_t>(s.byte_length) / es}, type);
    RETURN_IF_ERROR(ReadBytes(s, static_cast<uint8_t*>(buf.data_ptr())));
    if (out.device() != buf.device()) buf = buf.to(out.device());
    at::Tensor src = buf.as_strided(s.target.shape, RowMajorStrides(pc->rect.shape), 0);
    at::Tensor dst = out;
    for (size_t d = 0; d < s.target.shape.size(); ++d) {
      dst = dst.narrow(static_cast<int64_t>(d), s.target.offsets[d] - rect.offsets[d],
                       s.target.shape[d]);
    }
    dst.copy_(src);
  }
  return Status::OK();
}

bool TagIndex::Preferred(const Piece& p) const {
  if (prefer_degree_ <= 0) return false;
  const Placement& pl = tensors_[p.tensor].placement;
  if (pl.tp_degree <= 0) return false;
  // Rank ranges [r/R, (r+1)/R) of the two degrees overlap.
  const int64_t a0 = int64_t{pl.tp_rank} * prefer_degree_;
  const int64_t a1 = a0 + prefer_degree_;
  const int64_t b0 = int64_t{prefer_rank_} * pl.tp_degree;
  const int64_t b1 = b0 + pl.tp_degree;
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
                                           tag_ + "/" + st.file + ":" + st.path));
    cache_bytes_ += bytes.size();
    it = cache_.emplace(key, std::move(bytes)).first;
    cache_order_.push_back(key);
    while (cache_bytes_ > cache_limit_ && cache_order_.size() > 1) {
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
  if (s.chunks == 0 || cache_limit_ == 0) {
    return store_.ReadTensorRange(*st.record.get(), s.byte_offset, s.byte_length, dst,
                                  tag_ + "/" + st.file + ":" + st.path);
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
                                           tag_ + "/" + st.file + ":" + st.path));
  }
  for (uint64_t c = s.first_chunk; c < s.first_chunk + s.chunks; ++c) {
    const uint64_t lo = std::max(begin, c * cs);
    const uint64_t hi = std::min(end, (c + 1) * cs);
    if (lo >= hi || (lo >= whole_lo && hi <= whole_hi)) continue;
    RETURN_IF_ERROR(CopyChunk(s.tensor, c, lo, hi, dst + (lo - begin)));
  }
  return Status::OK();
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
  const std::vector<Piece>* pieces = PiecesFor(param, state);
  if (pieces == nullptr) return Status::NotFound(param + " has no state " + state);
  const c10::ScalarType type = ToScalarType(tensors_[pieces->front().tensor].record->dtype());
  at::Tensor out = at::zeros(it->second.global_shape,
                             at::TensorOptions().dtype(type).device(c10::Device(device)));
  RETURN_IF_ERROR(
      Fill(param, state, Rect{std::vector<int64_t>(out.dim(), 0), it->second.global_shape}, out));
  return out;
}

}  // namespace ckptkv::checkpoint
