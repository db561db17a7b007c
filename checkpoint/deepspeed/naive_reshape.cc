#include "checkpoint/deepspeed/naive_reshape.h"

#include <chrono>

#include "checkpoint/deepspeed/deepspeed_checkpoint.h"
#include "checkpoint/core/file_names.h"
#include "checkpoint/deepspeed/zero_checkpoint.h"
#include "engine/kv_checkpoint_engine.h"
#include "engine/state_codec.h"
#include "engine/torch_call.h"

namespace ckptkv::checkpoint {
namespace {

// Sets a top-level key of a dict state (no-op for other values).
void SetKey(const c10::IValue& state, const std::string& key, c10::IValue value) {
  if (!state.isGenericDict()) return;
  auto d = state.toGenericDict();
  d.insert_or_assign(c10::IValue(key), std::move(value));
}

Result<NaiveReshapeStats> Run(KvCheckpointEngine& engine, const std::string& store_dir,
                              const std::string& source_tag, const Model3dDesc& target,
                              const std::string& output_tag, const NaiveReshapeOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  NaiveReshapeStats stats;
  if (!engine.open(store_dir, source_tag)) {
    return Status::NotFound("store '" + store_dir + "' has no tag '" + source_tag + "'");
  }
  Store& store = *engine.store();
  const uint64_t block_bytes_before = store.BlockBytesRead();
  LoadStats loads;
  DeepSpeedCheckpointOptions ds;
  ds.tp = target.tp;
  ds.pp = target.pp;
  ds.dp = target.dp;
  ds.loader = EngineFileLoader(engine, store_dir, source_tag, &loads);
  ds.merge = options.merge;
  ASSIGN_OR_RETURN(DeepSpeedCheckpoint ckpt, DeepSpeedCheckpoint::Open(store, source_tag, ds));
  stats.source =
      Model3dDesc{ckpt.original_pp_degree(), ckpt.original_tp_degree(), ckpt.original_dp_degree()};
  stats.target = target;
  // The zero files keep the source's name prefix (bf16_, fp16_ or none).
  std::string prefix;
  if (!ckpt.zero_files().empty()) {
    auto c = ParseFileName(ckpt.zero_files()[0]);
    if (c) prefix = c->prefix;
  }

  engine.create(store_dir, output_tag);
  auto save = [&](const c10::IValue& state, const std::string& file) {
    engine.save(state, store_dir + "/" + output_tag + "/" + file);
    stats.files_written++;
  };
  for (int pp = 0; pp < target.pp; ++pp) {
    for (int tp = 0; tp < target.tp; ++tp) {
      ASSIGN_OR_RETURN(c10::IValue sd, ckpt.Get2dParallelState(tp, pp));
      // The layout metadata of the new degrees (merge_state kept the first
      // file's).
      if (DictField(sd, "checkpoint_parallel_dimensions") != nullptr) {
        c10::impl::GenericDict dims(c10::StringType::get(), c10::AnyType::get());
        dims.insert("pp_degree", static_cast<int64_t>(target.pp));
        dims.insert("tp_degree", static_cast<int64_t>(target.tp));
        SetKey(sd, "checkpoint_parallel_dimensions", dims);
      }
      if (DictField(sd, "mp_world_size") != nullptr) {
        SetKey(sd, "mp_world_size", static_cast<int64_t>(target.pp * target.tp));
      }
      if (DictField(sd, "dp_world_size") != nullptr)
        SetKey(sd, "dp_world_size", static_cast<int64_t>(target.dp));
      save(sd, ModelFileName(MpRank(pp, tp, target.tp)));
    }
  }
  for (int dp = 0; dp < target.dp; ++dp) {
    for (int pp = 0; pp < target.pp; ++pp) {
      for (int tp = 0; tp < target.tp; ++tp) {
        ASSIGN_OR_RETURN(c10::IValue sd, ckpt.GetZeroCheckpointState(pp, tp, dp));
        save(sd, prefix + ZeroOptimFileName(dp, MpRank(pp, tp, target.tp)));
      }
    }
  }
  CommitInfo info;
  info.tag = output_tag;
  info.save_dir = store_dir;
  info.save_latest = options.set_latest;
  engine.commit(info);
  stats.tensor_bytes_written = engine.last_commit().logical_bytes;
  stats.new_bytes_written = engine.last_commit().new_bytes;
  stats.files_loaded = loads.files;
  stats.tensor_bytes_read = loads.tensor_bytes;
  stats.block_bytes_read = store.BlockBytesRead() - block_bytes_before;
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return stats;
}

}  // namespace

Result<NaiveReshapeStats> NaiveReshape(const std::string& store_dir, const std::string& source_tag,
                                       const Model3dDesc& target, const std::string& output_tag,
                                       const NaiveReshapeOptions& options) {
  KvEngineConfig config;
  config.db = store_dir;
  config.store = options.store;
  config.overwrite = options.overwrite;
  KvCheckpointEngine engine(config);
  return TorchCall(TorchErrorKind::kUserValue, "naive reshape of tag '" + source_tag + "'",
                   [&] { return Run(engine, store_dir, source_tag, target, output_tag, options); });
}

}  // namespace ckptkv::checkpoint
