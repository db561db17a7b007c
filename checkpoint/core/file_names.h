// DeepSpeed checkpoint file names and the rank coordinates they encode.
//
// Names follow DeepSpeed's engine and checkpoint utilities: MP ranks
// are two-digit, DP ranks unpadded, layer ids two-digit (more when >= 100),
// MoE layer / expert ids unpadded. With pipeline parallelism the MP rank is
// pp-major: mp = pp * tp_degree + tp.
#ifndef CKPTKV_CHECKPOINT_CORE_FILE_NAMES_H_
#define CKPTKV_CHECKPOINT_CORE_FILE_NAMES_H_

#include <optional>
#include <string>
#include <string_view>

namespace ckptkv::checkpoint {

enum class FileKind {
  kModelStates,      // mp_rank_XX_model_states.pt
  kZeroModelStates,  // zero_pp_rank_D_mp_rank_XX_model_states.pt (ZeRO-3)
  kOptimStates,      // [bf16_|fp16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt
  kLayer,            // layer_LL-model_TT-model_states.pt, layer_LL-model_states.pt
  kExpert,           // layer_M_expert_E_mp_rank_XX_model_states.pt, expert_E_mp_rank_XX_...
  kExpertOptim,      // expp_rank_P_mp_rank_XX_optim_states.pt
};

struct FileCoordinates {
  FileKind kind = FileKind::kModelStates;
  int mp_rank = -1;
  int dp_rank = -1;
  int layer = -1;
  int tp_rank = -1;  // layer files with a model axis
  int moe_layer = -1;
  int expert = -1;
  int ep_rank = -1;
  std::string prefix;  // "bf16_" / "fp16_" / "" for optimizer files
};

// Parses a file name (its last path component); nullopt if it is not one
// of DeepSpeed's checkpoint file names.
std::optional<FileCoordinates> ParseFileName(std::string_view name);

// The names DeepSpeed gives: get_model_ckpt_name_for_rank,
// get_zero_ckpt_name_for_rank (+ bf16 prefix) and PipelineModule layer files.
std::string ModelFileName(int mp_rank);
std::string ZeroOptimFileName(int dp_rank, int mp_rank, bool bf16 = false);
std::string ZeroModelFileName(int dp_rank, int mp_rank);
std::string LayerFileName(int layer, std::optional<int> tp_rank);

// The last component of a '/'-separated path, and a prefix test: how
// DeepSpeed's get_files_with_prefix looks at names.
std::string Basename(const std::string& path);
inline bool StartsWith(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

// pp-major MP index <-> (pp, tp).
inline int MpRank(int pp_rank, int tp_rank, int tp_degree) { return pp_rank * tp_degree + tp_rank; }
inline int PpOfMp(int mp_rank, int tp_degree) { return mp_rank / tp_degree; }
inline int TpOfMp(int mp_rank, int tp_degree) { return mp_rank % tp_degree; }

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_CORE_FILE_NAMES_H_
