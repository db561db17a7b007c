// Command line of kv-browser: `kv-browser --db DIR SUBCOMMAND ... [--json]`.
// Exit codes: 0 ok, 1 usage error or not found, 2 corruption or failed
// verification.
#include <unistd.h>

#include <iostream>

#include <CLI/CLI.hpp>

#include "tools/cli_args.h"
#include "tools/kv_browser/commands.h"
#include "tools/kv_browser/safetensors.h"

namespace ckptkv::kvb {

using tools::IntArg;

namespace {

// Opens read-only, resolves the tag names and runs `fn`.
int WithBrowser(const std::string& db, const std::function<int(Browser&)>& fn) {
  auto b = Browser::Open(db, Browser::Mode::kReadOnly);
  if (!b.ok()) return ReportError(b.status());
  return fn(**b);
}

Result<std::string> Tag(Browser& b, const std::string& name) { return b.ResolveTag(name); }

// Most values one peek prints.
constexpr int64_t kMaxPeekLimit = 1000000;

}  // namespace

int RunCli(int argc, char** argv) {
  CLI::App app{
      "kv-browser: inspect, compare, verify and clean a ckptkv checkpoint store.\n"
      "Read-only unless the subcommand is gc, rm or keep."};
  app.fallthrough();
  std::string db;
  bool as_json = false;
  app.add_option("--db", db, "store directory")->required();
  app.add_flag("--json", as_json, "print JSON (field names in docs/kv-browser.md)");

  std::string tag, tag_b, file, param, pattern, slice, by = "tag", format = "safetensors";
  bool regex = false, expand = false, all = false, with_tensors = false;
  size_t bins = 20, limit = 10;
  int depth = 2, last = 0, every = 0;
  WriteFlags wf;
  std::vector<std::string> tags;
  ExportOptions ex;
  std::string shard_size = "5GiB";

  auto filter_opts = [&](CLI::App* c) {
    c->add_option("--file", file, "only parameters of this file");
    c->add_flag("--regex", regex, "the pattern is a regular expression, not a glob");
  };
  auto* tags_cmd = app.add_subcommand("tags", "every tag: time, files, tensors, bytes, dedup");
  auto* tree_cmd = app.add_subcommand("tree", "files of a tag with coordinates, then parameters");
  tree_cmd->add_option("tag", tag, "tag (or latest)")->required();
  tree_cmd->add_option("pattern", pattern, "glob (or --regex) over parameter paths");
  tree_cmd->add_flag("--expand", expand, "do not collapse numbered runs (layers.N.*)");
  filter_opts(tree_cmd);
  auto* show_cmd = app.add_subcommand("show", "one tensor: dtype, shape, placement, chunks");
  show_cmd->add_option("tag", tag)->required();
  show_cmd->add_option("file", file)->required();
  show_cmd->add_option("param", param)->required();
  auto* stats_cmd = app.add_subcommand("stats", "min, max, mean, std, L2, NaN/Inf/zero counts");
  stats_cmd->add_option("tag", tag)->required();
  stats_cmd->add_option("pattern", pattern, "glob over parameter paths (default: all)");
  filter_opts(stats_cmd);
  auto* hist_cmd = app.add_subcommand("hist", "histogram of one tensor's values");
  hist_cmd->add_option("tag", tag)->required();
  hist_cmd->add_option("param", param)->required();
  hist_cmd->add_option("--file", file, "the file holding the parameter");
  hist_cmd->add_option("--bins", bins, "number of buckets")->check(IntArg(1, 10000));
  auto* peek_cmd = app.add_subcommand("peek", "first values, or a numpy-style slice");
  peek_cmd->add_option("tag", tag)->required();
  peek_cmd->add_option("param", param)->required();
  peek_cmd->add_option("slice", slice, "e.g. '0:2, :, -1'");
  peek_cmd->add_option("--file", file, "the file holding the parameter");
  peek_cmd
      ->add_option("--limit", limit,
                   "most values printed (default 10 without a slice, 1000 with one)")
      ->check(IntArg(1, kMaxPeekLimit));
  auto* diff_cmd = app.add_subcommand("diff", "parameters added, removed, reshaped, changed");
  diff_cmd->add_option("tag_a", tag)->required();
  diff_cmd->add_option("tag_b", tag_b)->required();
  diff_cmd->add_option("pattern", pattern, "glob over parameter paths");
  filter_opts(diff_cmd);
  auto* history_cmd = app.add_subcommand("history", "norm and digest of a parameter per tag");
  history_cmd->add_option("param", param)->required();
  history_cmd->add_option("--file", file, "the file holding the parameter");
  auto* meta_cmd = app.add_subcommand("meta", "the non-tensor part of the saved state");
  meta_cmd->add_option("tag", tag)->required();
  meta_cmd->add_option("file", file);
  meta_cmd->add_flag("--tensors", with_tensors, "also list the tensors in the tree");
  auto* du_cmd = app.add_subcommand("du", "space: logical, unique and shared bytes");
  du_cmd->add_option("--by", by, "tag, file or param-prefix")
      ->check(CLI::IsMember({"tag", "file", "param-prefix"}));
  du_cmd->add_option("--depth", depth, "param-prefix: path components kept")
      ->check(IntArg(1, 1024));
  auto* verify_cmd = app.add_subcommand("verify", "re-hash every block; check every record");
  verify_cmd->add_option("tag", tag, "one tag (default: all)");
  verify_cmd->add_flag("--all", all, "every tag");
  bool repair = false;
  verify_cmd->add_flag("--repair", repair,
                       "drop the index entries of bad blocks (takes the write lock), so the "
                       "next save of their bytes writes them again");
  auto write_opts = [&](CLI::App* c) {
    c->add_flag("--dry-run", wf.dry_run, "only show what would be done");
    c->add_flag("-y,--yes", wf.yes, "write without asking");
  };
  auto* gc_cmd = app.add_subcommand("gc", "remove blocks no tag references (writes)");
  write_opts(gc_cmd);
  auto* rm_cmd = app.add_subcommand("rm", "delete tags (writes)");
  rm_cmd->add_option("tags", tags, "tags to delete")->required();
  rm_cmd->add_flag("--gc", wf.run_gc, "run gc afterwards");
  write_opts(rm_cmd);
  auto* keep_cmd = app.add_subcommand("keep", "delete all but the last N tags (writes)");
  keep_cmd->add_option("--last", last, "tags to keep, newest first")
      ->required()
      ->check(IntArg(1, 1 << 30));
  keep_cmd->add_option("--every", every, "also keep every K-th older tag (1st, K+1-th, ...)")
      ->check(IntArg(1, 1 << 30));
  keep_cmd->add_flag("--gc", wf.run_gc, "run gc afterwards");
  write_opts(keep_cmd);
  auto* export_cmd = app.add_subcommand("export", "write a tag as safetensors files");
  export_cmd->add_option("tag", tag)->required();
  export_cmd->add_option("--format", format)->check(CLI::IsMember({"safetensors"}));
  export_cmd->add_option("--out", ex.out_dir, "output directory")->required();
  export_cmd->add_option("--include", ex.include, "glob of tensor names to export");
  export_cmd->add_option("--exclude", ex.exclude, "glob of tensor names to leave out");
  export_cmd->add_option("--file", ex.file, "only this file of the tag");
  export_cmd->add_option("--max-shard-size", shard_size, "e.g. 5GiB, 500MiB");
  export_cmd->add_flag("--force", ex.overwrite, "replace existing files in the directory");
  auto* tui_cmd = app.add_subcommand("tui", "terminal UI (the default on a terminal)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 1;
  }
  wf.as_json = as_json;
  ParamFilter filter{pattern, regex, file};

  if (*tags_cmd) {
    return WithBrowser(db, [&](Browser& b) { return Emit(TagsReport(b), as_json, RenderTags); });
  }
  if (*tree_cmd) {
    return WithBrowser(db, [&](Browser& b) {
      auto t = Tag(b, tag);
      if (!t.ok()) return ReportError(t.status());
      return Emit(TreeReport(b, *t, filter), as_json,
                  [&](const json& j) { RenderTree(j, expand); });
    });
  }
  if (*show_cmd) {
    return WithBrowser(db, [&](Browser& b) {
      auto t = Tag(b, tag);
      if (!t.ok()) return ReportError(t.status());
      return Emit(ShowReport(b, *t, file, param), as_json, RenderShow);
    });
  }
  if (*stats_cmd) {
    return WithBrowser(db, [&](Browser& b) {
      auto t = Tag(b, tag);
      if (!t.ok()) return ReportError(t.status());
      return Emit(StatsReport(b, *t, filter), as_json, RenderStats);
    });
  }
  if (*hist_cmd || *peek_cmd) {
    return WithBrowser(db, [&](Browser& b) {
      auto t = Tag(b, tag);
      if (!t.ok()) return ReportError(t.status());
      auto e = b.FindParam(*t, file, param);
      if (!e.ok()) return ReportError(e.status());
      Result<json> r =
          *hist_cmd
              ? HistReport(b, **e, bins)
              : PeekReport(b, **e, slice,
                           slice.empty() || peek_cmd->count("--limit") ? limit : size_t{1000});
      if (r.ok()) r->emplace("tag", *t);
      return Emit(r, as_json, *hist_cmd ? RenderHist : RenderPeek);
    });
  }
  if (*diff_cmd) {
    return WithBrowser(db, [&](Browser& b) {
      auto a = Tag(b, tag);
      if (!a.ok()) return ReportError(a.status());
      auto c = Tag(b, tag_b);
      if (!c.ok()) return ReportError(c.status());
      return Emit(DiffReport(b, *a, *c, filter), as_json, RenderDiff);
    });
  }
  if (*history_cmd) {
    return WithBrowser(db, [&](Browser& b) {
      return Emit(HistoryReport(b, param, file), as_json, RenderHistory);
    });
  }
  if (*meta_cmd) {
    return WithBrowser(db, [&](Browser& b) {
      auto t = Tag(b, tag);
      if (!t.ok()) return ReportError(t.status());
      return Emit(MetaReport(b, *t, file, with_tensors), as_json, RenderMeta);
    });
  }
  if (*du_cmd) {
    return WithBrowser(db,
                       [&](Browser& b) { return Emit(DuReport(b, by, depth), as_json, RenderDu); });
  }
  if (*verify_cmd) {
    auto b = Browser::Open(db, repair ? Browser::Mode::kWrite : Browser::Mode::kReadOnly);
    if (!b.ok()) return ReportError(b.status());
    std::optional<std::string> only;
    if (!tag.empty() && !all) {
      auto t = Tag(**b, tag);
      if (!t.ok()) return ReportError(t.status());
      only = *t;
    }
    auto r = VerifyStore((*b)->store(), only, repair);
    int rc = Emit(r, as_json, RenderVerify);
    return rc == 0 && !(*r)["ok"].get<bool>() ? 2 : rc;
  }
  if (*gc_cmd) return RunGc(db, wf);
  if (*rm_cmd) return RunRm(db, tags, wf);
  if (*keep_cmd) return RunKeep(db, last, every, wf);
  if (*export_cmd) {
    std::string why;
    auto size = tools::ParseByteSize(shard_size, 1, uint64_t{1} << 62, &why);
    if (!size) {
      std::cerr << "error: --max-shard-size: " << why << "\n";
      return 1;
    }
    ex.max_shard_bytes = *size;
    return WithBrowser(db, [&](Browser& b) {
      auto t = Tag(b, tag);
      if (!t.ok()) return ReportError(t.status());
      return Emit(ExportSafetensors(b, *t, ex), as_json, RenderExport);
    });
  }
  if (*tui_cmd) return RunTui(db);
  if (::isatty(STDIN_FILENO) && ::isatty(STDOUT_FILENO)) return RunTui(db);
  std::cerr << "error: give a subcommand (the terminal UI needs a terminal)\n" << app.help();
  return 1;
}

}  // namespace ckptkv::kvb
