#include "checkpoint/core/reshape_maps.h"

#include <sstream>

namespace ckptkv::checkpoint {
namespace {

std::string Divisors(int n) {
  std::string s;
  for (int d = 1; d <= n; ++d) {
    if (n % d != 0) continue;
    if (!s.empty()) s += ", ";
    s += std::to_string(d);
  }
  return s;
}

std::string List(const std::vector<int>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  return s + "]";
}

std::string Layout2d(int pp, int tp) {
  return "(pp " + std::to_string(pp) + ", tp " + std::to_string(tp) + ")";
}

}  // namespace

Result<std::vector<std::vector<int>>> PartitionData(const std::vector<int>& list, int n) {
  const int size = static_cast<int>(list.size());
  if (n < 1 || size % n != 0) {
    return Status::InvalidArgument("cannot cut " + std::to_string(size) + " file indices " +
                                   List(list) + " into " + std::to_string(n) +
                                   " equal parts; valid part counts: " + Divisors(size));
  }
  const int part = size / n;
  std::vector<std::vector<int>> out;
  out.reserve(n);
  for (int i = 0; i < size; i += part) out.emplace_back(list.begin() + i, list.begin() + i + part);
  return out;
}

Meg2dParallelMap::Meg2dParallelMap(int pp_degree, int tp_degree)
    : pp_(pp_degree < 1 ? 1 : pp_degree),
      tp_(tp_degree < 1 ? 1 : tp_degree),
      cells_(static_cast<size_t>(pp_) * tp_) {}

void Meg2dParallelMap::SimpleInit() {
  for (int i = 0; i < pp_ * tp_; ++i) cells_[i] = {i};
}

Status Meg2dParallelMap::AddData(int pp, int tp, const std::vector<int>& data) {
  if (pp < 0 || pp >= pp_ || tp < 0 || tp >= tp_) {
    return Status::InvalidArgument("2D map cell " + Key(pp, tp) + " is outside the map of " +
                                   Layout2d(pp_, tp_));
  }
  auto& cell = cells_[static_cast<size_t>(pp) * tp_ + tp];
  cell.insert(cell.end(), data.begin(), data.end());
  return Status::OK();
}

Result<std::vector<int>> Meg2dParallelMap::GetData(std::optional<int> pp,
                                                   std::optional<int> tp) const {
  if ((pp && (*pp < 0 || *pp >= pp_)) || (tp && (*tp < 0 || *tp >= tp_))) {
    return Status::InvalidArgument("2D map index (pp " +
                                   (pp ? std::to_string(*pp) : std::string("all")) + ", tp " +
                                   (tp ? std::to_string(*tp) : std::string("all")) +
                                   ") is outside the map of " + Layout2d(pp_, tp_));
  }
  const int pp_lo = pp ? *pp : 0, pp_hi = pp ? *pp + 1 : pp_;
  const int tp_lo = tp ? *tp : 0, tp_hi = tp ? *tp + 1 : tp_;
  std::vector<int> out;
  for (int i = pp_lo; i < pp_hi; ++i) {
    for (int j = tp_lo; j < tp_hi; ++j) {
      const auto& cell = cells_[static_cast<size_t>(i) * tp_ + j];
      out.insert(out.end(), cell.begin(), cell.end());
    }
  }
  return out;
}

std::string Meg2dParallelMap::Key(int pp, int tp) {
  return std::to_string(pp) + "," + std::to_string(tp);
}

std::vector<Meg2dParallelMap::Cell> Meg2dParallelMap::Cells() const {
  std::vector<Cell> out;
  out.reserve(cells_.size());
  for (int i = 0; i < pp_; ++i) {
    for (int j = 0; j < tp_; ++j)
      out.push_back(Cell{i, j, cells_[static_cast<size_t>(i) * tp_ + j]});
  }
  return out;
}

std::string Meg2dParallelMap::ToString() const {
  std::string s;
  for (const Cell& c : Cells()) {
    if (!s.empty()) s += ' ';
    s += Key(c.pp, c.tp) + "=" + List(c.indices);
  }
  return s;
}

Result<Meg2dParallelMap> ReshapeMeg2dParallel(int old_pp, int old_tp, int new_pp, int new_tp) {
  const std::string what =
      "reshape of " + Layout2d(old_pp, old_tp) + " to " + Layout2d(new_pp, new_tp);
  if (old_pp < 1 || old_tp < 1 || new_pp < 1 || new_tp < 1) {
    return Status::InvalidArgument(what + ": every degree must be >= 1");
  }
  if (new_tp > old_tp || old_tp % new_tp != 0) {
    return Status::InvalidArgument(what + ": tp " + std::to_string(old_tp) + " -> " +
                                   std::to_string(new_tp) +
                                   (new_tp > old_tp ? " is an expansion; reshape only contracts"
                                                    : " does not divide the tp ranks evenly") +
                                   "; valid target tp degrees: " + Divisors(old_tp));
  }
  // After the TP step each tp column holds old_pp * (old_tp / new_tp) files,
  // which the PP step cuts into new_pp groups.
  const int column = old_pp * (old_tp / new_tp);
  if (new_pp > old_pp || column % new_pp != 0) {
    std::string valid;
    for (int d = 1; d <= old_pp; ++d) {
      if (column % d != 0) continue;
      if (!valid.empty()) valid += ", ";
      valid += std::to_string(d);
    }
    return Status::InvalidArgument(
        what + ": pp " + std::to_string(old_pp) + " -> " + std::to_string(new_pp) +
        (new_pp > old_pp
             ? " is an expansion; reshape only contracts"
             : " does not divide the " + std::to_string(column) + " files of a tp column evenly") +
        "; valid target pp degrees for tp " + std::to_string(new_tp) + ": " + valid);
  }
  Meg2dParallelMap old_map(old_pp, old_tp);
  old_map.SimpleInit();
  Meg2dParallelMap tp_map = old_map;
  if (old_tp != new_tp) {
    tp_map = Meg2dParallelMap(old_pp, new_tp);
    for (int i = 0; i < old_pp; ++i) {
      ASSIGN_OR_RETURN(auto ranks, old_map.GetData(i, std::nullopt));
      ASSIGN_OR_RETURN(auto split, PartitionData(ranks, new_tp));
      for (int j = 0; j < new_tp; ++j) RETURN_IF_ERROR(tp_map.AddData(i, j, split[j]));
    }
  }
  if (old_pp == new_pp) return tp_map;
  Meg2dParallelMap final_map(new_pp, new_tp);
  for (int i = 0; i < new_tp; ++i) {
    ASSIGN_OR_RETURN(auto ranks, tp_map.GetData(std::nullopt, i));
    ASSIGN_OR_RETURN(auto split, PartitionData(ranks, new_pp));
    for (int j = 0; j < new_pp; ++j) RETURN_IF_ERROR(final_map.AddData(j, i, split[j]));
  }
  return final_map;
}

std::string Model3dDesc::Desc() const {
  std::ostringstream s;
  s << "PP,TP,DP = (" << pp << ", " << tp << ", " << dp << ")";
  return s.str();
}

std::pair<bool, std::vector<std::string>> Model3dDesc::IsValid(int pp_index, int tp_index,
                                                               int dp_index) const {
  std::vector<std::string> errors;
  const std::pair<int, int> dims[] = {{pp_index, pp}, {tp_index, tp}, {dp_index, dp}};
  const char* names[] = {"PP", "TP", "DP"};
  for (int k = 0; k < 3; ++k) {
    if (dims[k].first >= dims[k].second) {
      errors.push_back(std::string(names[k]) + " indexing error: index " +
                       std::to_string(dims[k].first) + " >= degree " +
                       std::to_string(dims[k].second));
    }
  }
  return {errors.empty(), errors};
}

std::pair<bool, std::vector<std::string>> Model3dDesc::CanReshape(const Model3dDesc& target) const {
  std::vector<std::string> errors;
  const std::pair<int, int> dims[] = {{pp, target.pp}, {tp, target.tp}, {dp, target.dp}};
  const char* names[] = {"PP", "TP", "DP"};
  for (int k = 0; k < 3; ++k) {
    if (dims[k].second > dims[k].first) {
      errors.push_back(std::string("Expansion reshape not supported - ") + names[k] + ": " +
                       std::to_string(dims[k].first) + " ---> " + std::to_string(dims[k].second));
    }
  }
  return {errors.empty(), errors};
}

Result<std::vector<Meg2dParallelMap>> Model3dDesc::Reshape(const Model3dDesc& target) const {
  const std::string what = "reshape of " + Desc() + " to " + target.Desc();
  if (pp < 1 || tp < 1 || dp < 1 || target.pp < 1 || target.tp < 1 || target.dp < 1) {
    return Status::InvalidArgument(what + ": every degree must be >= 1");
  }
  auto [ok, errors] = CanReshape(target);
  if (!ok) {
    std::string msg;
    for (const auto& e : errors) msg += (msg.empty() ? "" : ", ") + e;
    return Status::InvalidArgument(what + ": " + msg + "; each target degree must be <= source");
  }
  auto reshaped = ReshapeMeg2dParallel(pp, tp, target.pp, target.tp);
  if (!reshaped.ok()) return reshaped.status().WithContext(what);
  const Meg2dParallelMap& map2d = reshaped.value();
  // flatten_dp_dimension: model index idx -> the ZeRO indices of every DP rank.
  const int src_2d_size = pp * tp;
  std::vector<Meg2dParallelMap> out(target.dp, Meg2dParallelMap(target.pp, target.tp));
  for (int i = 0; i < target.pp; ++i) {
    for (int j = 0; j < target.tp; ++j) {
      ASSIGN_OR_RETURN(auto model_indices, map2d.GetData(i, j));
      std::vector<int> flat;
      flat.reserve(model_indices.size() * dp);
      for (int idx : model_indices) {
        for (int d = 0; d < dp; ++d) flat.push_back(idx + d * src_2d_size);
      }
      // unflatten_dp_dimension.
      auto parts = PartitionData(flat, target.dp);
      if (!parts.ok()) {
        return parts.status().WithContext(what + ": DP " + std::to_string(dp) + " -> " +
                                          std::to_string(target.dp) + " for cell " +
                                          Meg2dParallelMap::Key(i, j));
      }
      for (int d = 0; d < target.dp; ++d) RETURN_IF_ERROR(out[d].AddData(i, j, parts.value()[d]));
    }
  }
  return out;
}

}  // namespace ckptkv::checkpoint
