#include "checkpoint/core/file_names.h"

#include <cstdio>
#include <regex>

namespace ckptkv::checkpoint {
namespace {

std::string Pad2(int n) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%02d", n);
  return buf;
}

int ToInt(const std::ssub_match& m) { return std::stoi(m.str()); }

}  // namespace

std::optional<FileCoordinates> ParseFileName(std::string_view full) {
  std::string name(full);
  if (auto slash = name.rfind('/'); slash != std::string::npos) name = name.substr(slash + 1);
  static const std::regex model(R"(mp_rank_(\d+)_model_states\.pt)");
  static const std::regex zero_model(R"(zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt)");
  static const std::regex optim(
      R"((bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_?optim_states\.pt)");
  static const std::regex layer_tp(R"(layer_(\d+)-model_(\d+)[-_]model_states\.pt)");
  static const std::regex layer(R"(layer_(\d+)-model_states\.pt)");
  static const std::regex moe(R"(layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt)");
  static const std::regex expert(R"(expert_(\d+)_mp_rank_(\d+)_model_states\.pt)");
  static const std::regex expp(R"(expp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt)");
  std::smatch m;
  FileCoordinates c;
  c.kind = FileKind::kModelStates;
  try {
    if (std::regex_match(name, m, model)) {
      c.kind = FileKind::kModelStates;
      c.mp_rank = ToInt(m[1]);
    } else if (std::regex_match(name, m, zero_model)) {
      c.kind = FileKind::kZeroModelStates;
      c.dp_rank = ToInt(m[1]);
      c.mp_rank = ToInt(m[2]);
    } else if (std::regex_match(name, m, optim)) {
      c.kind = FileKind::kOptimStates;
      c.prefix = m[1].str();
      c.dp_rank = ToInt(m[2]);
      c.mp_rank = ToInt(m[3]);
    } else if (std::regex_match(name, m, layer_tp)) {
      c.kind = FileKind::kLayer;
      c.layer = ToInt(m[1]);
      c.tp_rank = ToInt(m[2]);
    } else if (std::regex_match(name, m, layer)) {
      c.kind = FileKind::kLayer;
      c.layer = ToInt(m[1]);
    } else if (std::regex_match(name, m, moe)) {
      c.kind = FileKind::kExpert;
      c.moe_layer = ToInt(m[1]);
      c.expert = ToInt(m[2]);
      c.mp_rank = ToInt(m[3]);
    } else if (std::regex_match(name, m, expert)) {
      c.kind = FileKind::kExpert;
      c.expert = ToInt(m[1]);
      c.mp_rank = ToInt(m[2]);
    } else if (std::regex_match(name, m, expp)) {
      c.kind = FileKind::kExpertOptim;
      c.ep_rank = ToInt(m[1]);
      c.mp_rank = ToInt(m[2]);
    } else {
      return std::nullopt;
    }
  } catch (const std::out_of_range&) {
    return std::nullopt;  // a rank too large for int is not a rank
  }
  return c;
}

std::string ModelFileName(int mp_rank) { return "mp_rank_" + Pad2(mp_rank) + "_model_states.pt"; }

std::string ZeroOptimFileName(int dp_rank, int mp_rank, bool bf16) {
  return std::string(bf16 ? "bf16_" : "") + "zero_pp_rank_" + std::to_string(dp_rank) +
         "_mp_rank_" + Pad2(mp_rank) + "_optim_states.pt";
}

std::string ZeroModelFileName(int dp_rank, int mp_rank) {
  return "zero_pp_rank_" + std::to_string(dp_rank) + "_mp_rank_" + Pad2(mp_rank) +
         "_model_states.pt";
}

std::string LayerFileName(int layer, std::optional<int> tp_rank) {
  std::string s = "layer_" + Pad2(layer);
  if (tp_rank) s += "-model_" + Pad2(*tp_rank);
  return s + "-model_states.pt";
}

std::string Basename(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace ckptkv::checkpoint
