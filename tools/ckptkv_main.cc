// ckptkv: the command-line program.
//
//   ckptkv demo   [--db DIR] [--steps N] [--every K]
//   ckptkv bench  [--dir DIR] [--size-mb N] [--json] [--durability flush|wal] [--chunk-kb N]
//                 [--codec raw|zstd|grouped-zstd]
//                 [--scenarios all|core|reshape] [--reshape-layers N] [--reshape-hidden H]
//                 [--reshape-vocab V]
//   ckptkv ls     --db DIR [--json]
//   ckptkv verify --db DIR [--tag T | TAG | --all] [--json] [--repair]
//   ckptkv gc     --db DIR [--dry-run] [--yes] [--json]
//   ckptkv rm     --db DIR TAG... [--gc] [--dry-run] [--yes] [--json]
//   ckptkv synth  --db DIR --tag T --tp N --pp M --dp K --zero-stage S [--dtype bf16|fp32] ...
//   ckptkv reshape --db DIR --tag T --tp N --pp M --dp K [--out-tag T2] [--device D] [--plan]
//                  [--naive]
//   ckptkv export-universal --db DIR --tag T [--out-tag T2]
//   ckptkv import-universal --db DIR --tag T --tp N --pp M --dp K --out-tag T2
//   ckptkv import --db DIR PATH [--tag T | --all-tags] [--overwrite] [--json]
//                 [--codec raw|zstd|grouped-zstd]
//   ckptkv export --db DIR TAG --format pt|deepspeed|universal|safetensors --out DIR2
//                 [--overwrite] [--json]
//   ckptkv codec-stats --db DIR [--tag T] [--level N] [--chunk-kb N] [--random-mb N] [--json]
//
// ls, verify, gc and rm are kv-browser's tags, verify, gc and rm
// (tools/kv_browser/admin.h): the same code, output and JSON.
//
// Exit codes: 0 success; 1 usage errors, missing stores or tags and other
// failures; 2 corruption (verify problems, a checkpoint that loads wrong);
// 3 a demo whose resumed run diverges.

#include <atomic>
#include <csignal>
#include <iostream>
#include <memory>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "checkpoint/query/torch_export.h"
#include "checkpoint/query/torch_import.h"
#include "engine/torch_call.h"
#include "store/status.h"
#include "tools/bench.h"
#include "tools/cli_args.h"
#include "tools/codec_stats.h"
#include "tools/demo.h"
#include "tools/json_text.h"
#include "tools/kv_browser/admin_cli.h"
#include "tools/kv_browser/browser_core.h"
#include "tools/kv_browser/safetensors.h"
#include "tools/kv_browser/text.h"
#include "tools/reshape_cmd.h"

namespace {

namespace kvb = ckptkv::kvb;

int RunImport(const std::string& db, const std::string& path, const std::string& tag,
              bool overwrite, bool json, const std::string& codec, bool all_tags) {
  ckptkv::StoreOptions options;
  options.codec = ckptkv::ParseCodec(codec).value_or(ckptkv::Codec::kRaw);  // checked by CLI11
  if (all_tags && !tag.empty()) {
    return kvb::ReportError(ckptkv::Status::InvalidArgument(
        "--all-tags imports every tag directory under its own name; drop --tag"));
  }
  auto store = ckptkv::Store::Open(db, options);
  if (!store.ok()) return kvb::ReportError(store.status());
  // One bar per tag, on a terminal only.
  std::unique_ptr<kvb::Progress> bar;
  std::string bar_tag;
  auto progress = [&](const std::string& t, uint64_t done, uint64_t total) {
    if (!bar || bar_tag != t) {
      if (bar) bar->Done();
      bar = std::make_unique<kvb::Progress>("import " + t, total);
      bar_tag = t;
    }
    bar->Set(done);
  };
  if (all_tags) {
    auto tags = ckptkv::checkpoint::ImportSaveDir(**store, path, overwrite, progress);
    if (bar) bar->Done();
    if (!tags.ok()) return kvb::ReportError(tags.status());
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const auto& t : *tags) {
      const auto& r = t.report;
      if (json) {
        list.push_back({{"tag", t.info.tag},
                        {"files", r.files},
                        {"tensors", r.tensors},
                        {"logical_bytes", r.logical_bytes},
                        {"new_bytes", r.new_bytes}});
      } else {
        std::cout << "imported " << path << "/" << t.info.tag << " as tag " << t.info.tag << ": "
                  << r.files << " files, " << r.tensors << " tensors, "
                  << kvb::HumanBytes(r.logical_bytes) << " (" << kvb::HumanBytes(r.new_bytes)
                  << " new)" << std::endl;
      }
    }
    if (json)
      std::cout << ckptkv::tools::JsonText(nlohmann::ordered_json{{"tags", list}}, 2) << std::endl;
    return 0;
  }
  ckptkv::checkpoint::ImportReport r;
  auto info = ckptkv::checkpoint::ImportPath(**store, path, tag, overwrite, &r, progress);
  if (bar) bar->Done();
  if (!info.ok()) return kvb::ReportError(info.status());
  if (json) {
    nlohmann::ordered_json j{{"tag", info->tag},
                             {"files", r.files},
                             {"tensors", r.tensors},
                             {"logical_bytes", r.logical_bytes},
                             {"new_bytes", r.new_bytes}};
    std::cout << ckptkv::tools::JsonText(j, 2) << std::endl;
  } else {
    std::cout << "imported " << path << " as tag " << info->tag << ": " << r.files << " files, "
              << r.tensors << " tensors, " << kvb::HumanBytes(r.logical_bytes) << " ("
              << kvb::HumanBytes(r.new_bytes) << " new)" << std::endl;
  }
  return 0;
}

std::atomic<bool> g_interrupted{false};

extern "C" void OnInterrupt(int) { g_interrupted.store(true); }

int RunExport(const std::string& db, const std::string& tag, const std::string& format,
              const std::string& out, bool overwrite, bool json) {
  if (format == "safetensors") {
    // kv-browser's export (tools/kv_browser/safetensors.h), the same code.
    auto b = kvb::Browser::Open(db, kvb::Browser::Mode::kReadOnly);
    if (!b.ok()) return kvb::ReportError(b.status());
    kvb::ExportOptions eo;
    eo.out_dir = out;
    eo.overwrite = overwrite;
    auto r = kvb::ExportSafetensors(**b, tag, eo);
    if (!r.ok()) return kvb::ReportError(r.status());
    if (json) {
      std::cout << ckptkv::tools::JsonText(*r, 2) << std::endl;
    } else {
      std::cout << "exported tag " << tag << " to " << out << ": " << (*r)["files"].size()
                << " safetensors files, " << (*r)["tensors"].get<uint64_t>() << " tensors, "
                << kvb::HumanBytes((*r)["total_bytes"].get<uint64_t>()) << ", verified"
                << std::endl;
    }
    return 0;
  }
  ckptkv::StoreOptions options;
  // Only a universal export of a non-universal tag writes (a temporary tag).
  options.read_only = format != "universal";
  auto store = ckptkv::Store::Open(db, options);
  if (!store.ok()) return kvb::ReportError(store.status());
  ckptkv::checkpoint::TorchExportOptions eo;
  eo.out_dir = out;
  eo.format = format;
  eo.overwrite = overwrite;
  std::unique_ptr<kvb::Progress> bar;
  eo.progress = [&bar](uint64_t done, uint64_t total) {
    if (!bar) bar = std::make_unique<kvb::Progress>("export", total);
    bar->Set(done);
  };
  eo.cancel = &g_interrupted;
  auto old_int = std::signal(SIGINT, OnInterrupt);
  auto old_term = std::signal(SIGTERM, OnInterrupt);
  auto r = ckptkv::checkpoint::ExportTorch(**store, tag, eo);
  std::signal(SIGINT, old_int);
  std::signal(SIGTERM, old_term);
  if (bar) bar->Done();
  if (!r.ok()) return kvb::ReportError(r.status());
  if (json) {
    std::cout << ckptkv::checkpoint::TorchExportJson(*r, 2) << std::endl;
  } else {
    std::cout << "exported tag " << r->tag << " as " << format << " to " << out << ": "
              << r->files.size() << " files, " << r->tensors << " tensors, "
              << kvb::HumanBytes(r->bytes_written) << " written and verified" << std::endl;
  }
  return 0;
}

int Run(int argc, char** argv) {
  using namespace ckptkv::tools;
  // stdout carries results (tables, --json documents); log lines (commit
  // lines, placement warnings) go to stderr.
  spdlog::set_default_logger(std::make_shared<spdlog::logger>(
      "", std::make_shared<spdlog::sinks::stderr_color_sink_mt>()));
  CLI::App app{"ckptkv: content-addressed checkpoint store for deep-learning training"};
  app.require_subcommand(1);

  DemoOptions demo;
  auto* demo_cmd = app.add_subcommand(
      "demo", "train a small model, checkpoint it, resume and check the losses match");
  demo_cmd->add_option("--db", demo.db, "store directory (default ./ckptkv-demo, recreated)");
  demo_cmd->add_option("--steps", demo.steps, "training steps")->check(IntArg(3, 100000));
  demo_cmd->add_option("--every", demo.every, "checkpoint every K steps")->check(IntArg(1, 100000));
  demo_cmd->add_option("--hidden", demo.hidden, "MLP width")->check(IntArg(8, 8192));
  demo_cmd->add_option("--vocab", demo.vocab, "rows of the frozen embedding")
      ->check(IntArg(16, 1 << 24));
  demo_cmd->add_flag("--keep-files", demo.keep_files,
                     "keep the plain-file checkpoints (<db>-files)");
  demo_cmd->add_flag("-v,--verbose", demo.verbose, "show the engines' log lines");

  BenchOptions bench;
  auto* bench_cmd = app.add_subcommand(
      "bench",
      "measure ckptkv against raw writes and torch files on a synthetic state dict, and its "
      "reshape against DeepSpeed's naive one on a synthetic DeepSpeed checkpoint");
  bench_cmd
      ->add_option("--scenarios", bench.scenarios,
                   "core (saves and loads), reshape (fragment vs naive reshape) or all")
      ->check(CLI::IsMember({"all", "core", "reshape"}));
  bench_cmd->add_option("--dir", bench.dir,
                        "parent directory for the scratch data (default /tmp); a fresh "
                        "subdirectory is made and removed");
  bench_cmd->add_option("--size-mb", bench.size_mb, "MiB of tensors in the state dict")
      ->check(IntArg(8, 1 << 20));
  bench_cmd->add_flag("--json", bench.json, "print one JSON object instead of tables");
  bench_cmd->add_option("--durability", bench.durability, "block durability of the main kv store")
      ->check(CLI::IsMember({"flush", "wal"}));
  bench_cmd->add_flag("!--no-alt", bench.alt_durability,
                      "skip the full save with the other block durability");
  bench_cmd->add_option("--chunk-kb", bench.chunk_kb, "chunk size of the stores in KiB")
      ->check(IntArg(4, int64_t{64} * 1024));
  bench_cmd->add_option("--codec", bench.codec, "block codec of the kv stores")->check(CodecArg());
  bench_cmd->add_option("--threads", bench.threads, "store hashing workers (0 = store default)")
      ->check(IntArg(0, 1024));
  bench_cmd->add_option("--series", bench.series_saves, "saves in the frozen-base series")
      ->check(IntArg(2, 1000));
  bench_cmd->add_flag("!--no-drop-caches", bench.drop_caches,
                      "do not drop the page cache before the load scenarios and reshape steps");
  bench_cmd->add_flag("--keep", bench.keep, "keep the scratch directory");
  bench_cmd->add_flag("-v,--verbose", bench.verbose, "show the engines' log lines");
  bench_cmd
      ->add_option("--reshape-layers", bench.reshape_layers,
                   "transformer layers of the reshape source (a multiple of its pp 2)")
      ->check(IntArg(2, 4096));
  bench_cmd
      ->add_option("--reshape-hidden", bench.reshape_hidden,
                   "hidden size of the reshape source (a multiple of its tp 4)")
      ->check(IntArg(8, 1 << 16));
  bench_cmd
      ->add_option("--reshape-vocab", bench.reshape_vocab,
                   "vocabulary of the reshape source (padded to a multiple of 1024)")
      ->check(IntArg(1, 1 << 24));

  CheckpointCommands checkpoint_cmds;
  checkpoint_cmds.Add(app);

  std::string import_db, import_path, import_tag;
  bool import_overwrite = false, import_json = false;
  auto* import_cmd = app.add_subcommand(
      "import",
      "import a torch.save file, a DeepSpeed save_dir (its latest tag) or a tag directory into a "
      "store as one tag, without running pickle (docs/torch-files.md)");
  import_cmd->add_option("--db", import_db, "store directory (created if missing)")->required();
  import_cmd->add_option("path", import_path, "the .pt file or the directory")->required();
  import_cmd->add_option("--tag", import_tag,
                         "the tag to make (default: what latest names, or the file's or "
                         "directory's name)");
  import_cmd->add_flag("--overwrite", import_overwrite, "replace a committed tag of that name");
  import_cmd->add_flag("--json", import_json, "print one JSON object");
  bool import_all = false;
  import_cmd->add_flag("--all-tags", import_all,
                       "PATH is a DeepSpeed save_dir: import every tag directory as its own tag "
                       "(natural order, the one latest names last)");
  std::string import_codec = "raw";
  import_cmd
      ->add_option("--codec", import_codec,
                   "block codec of a new store (an existing store keeps its own)")
      ->check(CodecArg());

  std::string export_db, export_tag, export_format = "pt", export_out;
  bool export_overwrite = false, export_json = false;
  auto* export_cmd = app.add_subcommand(
      "export",
      "write a tag as files torch.load, DeepSpeed or Hugging Face read: pt (each file as a "
      "torch.save file), deepspeed (<out>/<tag>/ and latest), universal (DeepSpeed's universal "
      "folder) or safetensors; every file is re-read and checked (docs/export.md)");
  export_cmd->add_option("--db", export_db, "store directory")->required();
  export_cmd->add_option("tag", export_tag, "the tag to export")->required();
  export_cmd->add_option("--format", export_format, "pt, deepspeed, universal or safetensors")
      ->check(CLI::IsMember({"pt", "deepspeed", "universal", "safetensors"}));
  export_cmd->add_option("--out", export_out, "output directory (created if missing)")->required();
  export_cmd->add_flag("--overwrite", export_overwrite, "replace files that exist");
  export_cmd->add_flag("--json", export_json, "print one JSON object");

  CodecStatsOptions cstats;
  auto* cstats_cmd = app.add_subcommand(
      "codec-stats",
      "measure the block codecs (zstd, grouped-zstd) on a tag's tensors: stored/raw and encode / "
      "decode MiB/s per core, by kind of tensor");
  cstats_cmd->add_option("--db", cstats.db, "store directory")->required();
  cstats_cmd->add_option("--tag", cstats.tag, "the tag (default: latest)");
  cstats_cmd->add_option("--level", cstats.level, "zstd level of both codecs (default: their own)")
      ->check(IntArg(-131072, 22));
  cstats_cmd->add_option("--chunk-kb", cstats.chunk_kb, "cut tensors into chunks of N KiB")
      ->check(IntArg(4, int64_t{256} * 1024));
  cstats_cmd->add_option("--random-mb", cstats.random_mb, "MiB of random bytes measured beside")
      ->check(IntArg(0, 4096));
  cstats_cmd
      ->add_option("--seconds", cstats.min_seconds, "time each measurement at least this long")
      ->check(CLI::Range(0.0, 60.0));
  cstats_cmd->add_flag("--json", cstats.json, "print one JSON object");

  // The admin commands: kv-browser's, each taking --db and --json here.
  std::string db;
  bool json = false;
  kvb::AdminArgs admin;
  admin.write.unattended = kvb::Unattended::kWrite;
  auto* ls_cmd = app.add_subcommand("ls", "list the committed tags of a store");
  auto* verify_cmd = kvb::AddVerifyCommand(app, admin);
  verify_cmd->add_option("--tag", admin.tag, "only this tag (as the TAG argument)");
  auto* gc_cmd = kvb::AddGcCommand(app, admin);
  auto* rm_cmd = kvb::AddRmCommand(app, admin);
  for (CLI::App* c : {ls_cmd, verify_cmd, gc_cmd, rm_cmd}) {
    c->add_option("--db", db, "store directory")->required();
    c->add_flag("--json", json, "JSON output (fields in docs/kv-browser.md)");
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 1;
  }

  if (*demo_cmd) {
    return RunDemo(demo);
  }
  if (*bench_cmd) return RunBench(bench);
  if (auto rc = checkpoint_cmds.Run()) return *rc;
  if (*import_cmd)
    return RunImport(import_db, import_path, import_tag, import_overwrite, import_json,
                     import_codec, import_all);
  if (*export_cmd)
    return RunExport(export_db, export_tag, export_format, export_out, export_overwrite,
                     export_json);
  if (*cstats_cmd) return RunCodecStats(cstats);
  admin.write.as_json = json;
  if (*ls_cmd) return kvb::RunTags(db, json);
  if (*verify_cmd) return kvb::RunVerify(db, admin.verify_tag(), admin.repair, json);
  if (*gc_cmd) return kvb::RunGc(db, admin.write);
  if (*rm_cmd) return kvb::RunRm(db, admin.tags, admin.write);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (...) {
    // StatusError, LibTorch's errors, bad_alloc, std::exception: the one
    // mapping (engine/torch_call.h); anything else is not ours to name.
    try {
      return kvb::ReportError(ckptkv::StatusFromException(
          std::current_exception(), ckptkv::TorchErrorKind::kUserValue, "ckptkv"));
    } catch (...) {
      std::cerr << "error: unknown exception" << std::endl;
      return 1;
    }
  }
}
