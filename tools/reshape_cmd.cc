#include "tools/reshape_cmd.h"

#include <spdlog/spdlog.h>

#include <fstream>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "checkpoint/deepspeed/naive_reshape.h"
#include "checkpoint/query/placer.h"
#include "checkpoint/query/reshape.h"
#include "checkpoint/query/synth.h"
#include "tools/cli_args.h"
#include "tools/json_text.h"
#include "tools/kv_browser/text.h"
#include "tools/proc_stats.h"

namespace ckptkv::tools {

using checkpoint::TrainLayout;
using kvb::ReportError;
using json = nlohmann::json;

namespace {

Result<std::unique_ptr<Store>> OpenStore(const std::string& db, bool create) {
  StoreOptions o;
  o.create_if_missing = create;
  return Store::Open(db, o);
}

json LayoutJson(const TrainLayout& l) {
  return json{{"tp", l.tp},
              {"pp", l.pp},
              {"dp", l.dp},
              {"zero_stage", l.zero_stage},
              {"dtype", l.bf16 ? "bf16" : "fp32"},
              {"layer_files", l.layer_files != checkpoint::LayerFiles::kNone}};
}

json Layout3dJson(const checkpoint::Model3dDesc& d) {
  return json{{"tp", d.tp}, {"pp", d.pp}, {"dp", d.dp}};
}

// `total_seconds` runs from opening the store to closing it: the index
// build (fragment reshape) and the store's open and close are in it, so it
// compares with the naive reshape's, which opens and closes its own store.
void PrintReport(const checkpoint::ReshapeReport& r, const std::string& what, double total_seconds,
                 bool as_json) {
  const uint64_t rss = PeakRssBytes();
  if (as_json) {
    json j{{"from", LayoutJson(r.from)},     {"to", LayoutJson(r.to)},
           {"out_tag", r.out_tag},           {"files", r.write.files},
           {"tensors", r.write.tensors},     {"linked_tensors", r.write.linked_tensors},
           {"bytes_read", r.bytes_read},     {"logical_bytes", r.write.logical_bytes},
           {"new_bytes", r.write.new_bytes}, {"seconds", r.seconds},
           {"total_seconds", total_seconds}, {"peak_rss_bytes", rss}};
    std::cout << JsonText(j, 2) << std::endl;
    return;
  }
  std::cout << what << " " << r.from.ToString() << " -> " << r.to.ToString() << " as tag "
            << r.out_tag << "\n"
            << "  read    " << r.bytes_read << " bytes of blocks\n"
            << "  wrote   " << r.write.files << " files, " << r.write.tensors << " tensors ("
            << r.write.linked_tensors << " linked), " << r.write.logical_bytes << " logical bytes, "
            << r.write.new_bytes << " new bytes\n"
            << "  time    " << r.seconds << " s (" << total_seconds
            << " s with the store's open, index and close), peak RSS " << rss / (1 << 20) << " MiB"
            << std::endl;
}

}  // namespace

void CheckpointCommands::Add(CLI::App& app) {
  auto layout_opts = [&](CLI::App* c) {
    c->add_option("--tp", tp_, "tensor-parallel degree")->check(IntArg(1, 1024));
    c->add_option("--pp", pp_, "pipeline-parallel degree")->check(IntArg(1, 1024));
    c->add_option("--dp", dp_, "data-parallel degree")->check(IntArg(1, 65536));
  };
  synth_ = app.add_subcommand(
      "synth", "write a synthetic GPT checkpoint with DeepSpeed's files at a chosen layout");
  synth_->add_option("--db", db_, "store directory (created if absent)")->required();
  synth_->add_option("--tag", tag_, "tag to write")->required();
  layout_opts(synth_);
  synth_->add_option("--zero-stage", zero_stage_, "ZeRO stage")->check(IntArg(1, 3));
  synth_->add_option("--dtype", dtype_, "training dtype")->check(CLI::IsMember({"bf16", "fp32"}));
  synth_->add_option("--layers", layers_, "transformer layers")->check(IntArg(1, 4096));
  synth_->add_option("--hidden", hidden_, "hidden size")->check(IntArg(8, 1 << 16));
  synth_->add_option("--vocab", vocab_, "vocabulary (padded to --vocab-multiple)")
      ->check(IntArg(1, 1 << 24));
  synth_->add_option("--vocab-multiple", vocab_multiple_, "vocabulary padding multiple")
      ->check(IntArg(1, 1 << 20));
  synth_->add_option("--positions", positions_, "position embeddings")->check(IntArg(1, 1 << 20));
  synth_->add_option("--seed", seed_, "seed of every value")
      ->check(UintArg(0, std::numeric_limits<uint64_t>::max()));
  synth_->add_option("--iteration", iteration_, "training iteration recorded")
      ->check(IntArg(0, std::numeric_limits<int64_t>::max()));
  synth_->add_flag("--layer-files", layer_files_,
                   "save the weights as PipelineModule does: layer_XX-model_YY-model_states.pt "
                   "files, module None in the mp_rank files (ZeRO 1/2)");
  synth_->add_flag("--overwrite", overwrite_, "replace an existing tag");
  synth_->add_flag("--json", json_, "JSON output");

  reshape_ = app.add_subcommand(
      "reshape", "rewrite a DeepSpeed checkpoint tag at a new (tp, pp, dp) as a new tag");
  reshape_->add_option("--db", db_, "store directory")->required();
  reshape_->add_option("--tag", tag_, "source tag")->required();
  layout_opts(reshape_);
  reshape_->add_option("--out-tag", out_tag_,
                       "new tag (default <tag>_tpN_ppM_dpK, and _naive after it with --naive)");
  reshape_->add_option("--device", device_, "where fragments are assembled: cpu, cuda, cuda:N");
  reshape_->add_flag("--plan", plan_, "print what would be read; write nothing");
  reshape_->add_flag("--naive", naive_,
                     "DeepSpeed's way instead (the benchmark baseline): load every file whole, "
                     "concatenate, save; contraction only, CPU only");
  reshape_
      ->add_option("--weights", weights_,
                   "where the new tag keeps the weights: as the source does, the module of the "
                   "mp_rank files, or PipelineModule layer files")
      ->check(CLI::IsMember({"as-source", "module", "layers"}));
  reshape_->add_flag("--overwrite", overwrite_, "replace an existing out tag");
  reshape_->add_flag("--json", json_, "JSON output");

  export_ = app.add_subcommand(
      "export-universal", "write a tag's topology-free universal form (ds_to_universal) as a tag");
  export_->add_option("--db", db_, "store directory")->required();
  export_->add_option("--tag", tag_, "source tag")->required();
  export_->add_option("--out-tag", out_tag_, "new tag (default <tag>_universal)");
  export_->add_option("--device", device_, "cpu, cuda, cuda:N");
  export_->add_flag("--overwrite", overwrite_, "replace an existing out tag");
  export_->add_flag("--json", json_, "JSON output");

  import_ = app.add_subcommand("import-universal",
                               "load a universal tag into any (tp, pp, dp) as a new tag");
  import_->add_option("--db", db_, "store directory")->required();
  import_->add_option("--tag", tag_, "universal tag")->required();
  layout_opts(import_);
  import_->add_option("--zero-stage", zero_stage_, "ZeRO stage")->check(IntArg(1, 3));
  import_->add_option("--dtype", dtype_, "training dtype")->check(CLI::IsMember({"bf16", "fp32"}));
  import_->add_option("--out-tag", out_tag_, "new tag")->required();
  import_->add_option("--device", device_, "cpu, cuda, cuda:N");
  import_->add_flag("--layer-files", layer_files_,
                    "write the weights as PipelineModule layer files (ZeRO 1/2)");
  import_->add_flag("--overwrite", overwrite_, "replace an existing out tag");
  import_->add_flag("--json", json_, "JSON output");

  place_ = app.add_subcommand(
      "place",
      "record fragment placements for a DeepSpeed tag saved without them (reads no tensor bytes)");
  place_->add_option("--db", db_, "store directory")->required();
  place_->add_option("--tag", tag_, "tag to index")->required();
  place_->add_option("--out-tag", out_tag_,
                     "write the placed tag under this name (default: replace "
                     "the tag itself, atomically)");
  place_
      ->add_option("--rules", rules_file_,
                   "sharding rules file: lines REGEX=DIM (DIM -1 = replicated), first match "
                   "wins; default: Megatron's")
      ->check(CLI::ExistingFile);
  place_->add_flag("--json", json_, "JSON output");
}

int CheckpointCommands::RunPlace() {
  checkpoint::ShardingRules rules = checkpoint::ShardingRules::MegatronDefaults();
  if (!rules_file_.empty()) {
    std::ifstream in(rules_file_);
    std::stringstream text;
    text << in.rdbuf();
    auto parsed = checkpoint::ShardingRules::Parse(text.str());
    if (!parsed.ok()) return ReportError(parsed.status().WithContext(rules_file_));
    rules = std::move(parsed).value();
  }
  auto store = OpenStore(db_, /*create=*/false);
  if (!store.ok()) return ReportError(store.status());
  checkpoint::DeepSpeedPlacer placer(std::move(rules));
  auto r = checkpoint::PlaceTag(**store, tag_, out_tag_, placer);
  if (!r.ok()) return ReportError(r.status());
  if (json_) {
    json unplaced = json::array();
    for (const auto& [file, why] : r->unplaced_files) {
      unplaced.push_back(json{{"file", file}, {"why", why}});
    }
    json j{{"tag", tag_},
           {"out_tag", r->out_tag},
           {"files", r->files},
           {"tensors", r->tensors},
           {"placed_tensors", r->placed_tensors},
           {"unplaced_files", unplaced}};
    std::cout << JsonText(j, 2) << std::endl;
  } else {
    std::cout << "placed " << tag_ << " as " << r->out_tag << ": " << r->files << " files, "
              << r->placed_tensors << " of " << r->tensors << " tensors placed\n";
    for (const auto& [file, why] : r->unplaced_files) {
      std::cout << "  unplaced " << file << ": " << why << "\n";
    }
    std::cout << std::flush;
  }
  return 0;
}

std::optional<int> CheckpointCommands::Run() {
  const bool any = synth_->parsed() || reshape_->parsed() || export_->parsed() ||
                   import_->parsed() || place_->parsed();
  if (!any) return std::nullopt;
  if (reshape_->parsed() && naive_) return RunNaive();
  if (place_->parsed()) return RunPlace();
  const double t0 = NowSeconds();
  auto store = OpenStore(db_, /*create=*/synth_->parsed());
  if (!store.ok()) return ReportError(store.status());
  checkpoint::WriteOptions w;
  w.device = device_;
  w.overwrite = overwrite_;
  if (synth_->parsed()) {
    checkpoint::SynthOptions o;
    o.model.layers = layers_;
    o.model.hidden = hidden_;
    o.model.vocab = vocab_;
    o.model.vocab_multiple = vocab_multiple_;
    o.model.max_positions = positions_;
    o.layout = TrainLayout{
        tp_,
        pp_,
        dp_,
        zero_stage_,
        dtype_ == "bf16",
        layer_files_ ? checkpoint::LayerFiles::kModelAxis : checkpoint::LayerFiles::kNone};
    o.seed = seed_;
    o.iteration = iteration_;
    w.set_latest = true;
    auto r = checkpoint::Synth(**store, tag_, o, w);
    if (!r.ok()) return ReportError(r.status());
    if (json_) {
      json j;
      j["tag"] = tag_;
      j["layout"] = LayoutJson(o.layout);
      j["files"] = r->files;
      j["tensors"] = r->tensors;
      j["logical_bytes"] = r->logical_bytes;
      j["new_bytes"] = r->new_bytes;
      j["seconds"] = r->seconds;
      std::cout << JsonText(j, 2) << std::endl;
    } else {
      std::cout << "synth " << tag_ << ": " << o.layout.ToString() << ", " << r->files << " files, "
                << r->tensors << " tensors, " << r->logical_bytes << " bytes in " << r->seconds
                << " s" << std::endl;
    }
    return 0;
  }
  if (reshape_->parsed() && plan_) {
    auto plan = checkpoint::PlanReshape(**store, tag_, tp_, pp_, dp_);
    if (!plan.ok()) return ReportError(plan.status());
    json zero = json::array();
    for (const auto& m : plan->zero_files) zero.push_back(m);
    json j;
    j["from"] = LayoutJson(plan->from);
    j["to"] = LayoutJson(plan->to);
    j["model_files"] = plan->model_files;
    j["zero_files"] = zero;
    j["bytes_to_read"] = plan->bytes_to_read;
    j["tensors_linked"] = plan->tensors_linked;
    std::cout << (json_ ? JsonText(j, 2) : JsonText(j)) << std::endl;
    return 0;
  }
  Result<checkpoint::ReshapeReport> r = Status::OK();
  std::string what;
  if (reshape_->parsed()) {
    checkpoint::ReshapeOptions o;
    o.tp = tp_;
    o.pp = pp_;
    o.dp = dp_;
    o.out_tag = out_tag_;
    o.write = w;
    if (weights_ == "module") o.layer_files = checkpoint::LayerFiles::kNone;
    if (weights_ == "layers") o.layer_files = checkpoint::LayerFiles::kModelAxis;
    r = checkpoint::Reshape(**store, tag_, o);
    what = "reshaped " + tag_;
  } else if (export_->parsed()) {
    r = checkpoint::ExportUniversal(**store, tag_,
                                    out_tag_.empty() ? tag_ + "_universal" : out_tag_, w);
    what = "exported " + tag_ + " (universal)";
  } else {
    r = checkpoint::ImportUniversal(**store, tag_,
                                    TrainLayout{tp_, pp_, dp_, zero_stage_, dtype_ == "bf16",
                                                layer_files_ ? checkpoint::LayerFiles::kModelAxis
                                                             : checkpoint::LayerFiles::kNone},
                                    out_tag_, w);
    what = "imported " + tag_;
  }
  if (!r.ok()) return ReportError(r.status());
  store.value().reset();  // closed: part of total_seconds
  PrintReport(*r, what, NowSeconds() - t0, json_);
  return 0;
}

int CheckpointCommands::RunNaive() {
  if (plan_) {
    return ReportError(Status::InvalidArgument(
        "--naive and --plan do not combine: --plan shows what the fragment reshape would read; "
        "give one of them"));
  }
  if (device_ != "cpu") {
    return ReportError(Status::InvalidArgument(
        "--naive runs on the CPU only (DeepSpeed's merge loads every file into host memory); "
        "--device '" +
        device_ + "' is valid only without --naive"));
  }
  const checkpoint::Model3dDesc target{pp_, tp_, dp_};
  const std::string out = out_tag_.empty()
                              ? tag_ + "_tp" + std::to_string(tp_) + "_pp" + std::to_string(pp_) +
                                    "_dp" + std::to_string(dp_) + "_naive"
                              : out_tag_;
  // The engine's commit line says what the report below says.
  spdlog::set_level(spdlog::level::warn);
  checkpoint::NaiveReshapeOptions o;
  o.overwrite = overwrite_;
  o.store.create_if_missing = false;  // never make a store out of a mistyped --db
  const double t0 = NowSeconds();
  auto r = checkpoint::NaiveReshape(db_, tag_, target, out, o);
  const double total = NowSeconds() - t0;
  if (!r.ok()) {
    Status s = r.status();
    if (s.IsInvalidArgument()) {
      s = s.WithContext("naive reshape (DeepSpeed's way, which only contracts)");
    }
    return ReportError(s);
  }
  const uint64_t rss = PeakRssBytes();
  if (json_) {
    json j{{"method", "naive"},
           {"from", Layout3dJson(r->source)},
           {"to", Layout3dJson(r->target)},
           {"out_tag", out},
           {"files_loaded", r->files_loaded},
           {"tensor_bytes_read", r->tensor_bytes_read},
           {"bytes_read", r->block_bytes_read},
           {"files", r->files_written},
           {"logical_bytes", r->tensor_bytes_written},
           {"new_bytes", r->new_bytes_written},
           {"seconds", r->seconds},
           {"total_seconds", total},
           {"peak_rss_bytes", rss}};
    std::cout << JsonText(j, 2) << std::endl;
    return 0;
  }
  std::cout << "naive reshape of " << tag_ << " " << r->source.Desc() << " -> " << r->target.Desc()
            << " as tag " << out << "\n"
            << "  loaded  " << r->files_loaded << " files whole, " << r->tensor_bytes_read
            << " tensor bytes (" << r->block_bytes_read << " bytes of blocks)\n"
            << "  wrote   " << r->files_written << " files, " << r->tensor_bytes_written
            << " logical bytes, " << r->new_bytes_written << " new bytes\n"
            << "  time    " << r->seconds << " s (" << total
            << " s with the store's close), peak RSS " << rss / (1 << 20) << " MiB" << std::endl;
  return 0;
}

}  // namespace ckptkv::tools
