// Command line of kv-browser: `kv-browser --db DIR SUBCOMMAND ... [--json]`.
// Exit codes: 0 ok, 1 usage error or not found, 2 corruption or failed
// verification.
#include "tools/kv_browser/cli.h"

#include <unistd.h>

#include <functional>
#include <iostream>

#include <CLI/CLI.hpp>

#include "tools/cli_args.h"
#include "tools/kv_browser/admin_cli.h"
#include "tools/kv_browser/commands.h"
#include "tools/kv_browser/safetensors.h"
#include "tools/kv_browser/text.h"
#include "tools/kv_browser/tui.h"

namespace ckptkv::kvb {

using tools::IntArg;

namespace {

// Most values one peek prints.
constexpr int64_t kMaxPeekLimit = 1000000;

// Every value the command line sets.
struct CliArgs {
  std::string db;
  bool as_json = false;
  std::string tag, tag_b, file, param, pattern, slice, by = "tag", format = "safetensors";
  bool regex = false, expand = false, with_tensors = false;
  size_t bins = 20, limit = 10;
  int depth = 2;
  AdminArgs admin;
  ExportOptions ex;
  std::string shard_size = "5GiB";

  ParamFilter filter() const { return ParamFilter{pattern, regex, file}; }
};

// One subcommand: its node in the parser and what it runs once parsed.
struct Command {
  CLI::App* cmd;
  std::function<int()> run;
};

// Opens the store read-only and runs `fn`.
int WithBrowser(const std::string& db, const std::function<int(Browser&)>& fn) {
  auto b = Browser::Open(db, Browser::Mode::kReadOnly);
  if (!b.ok()) return ReportError(b.status());
  return fn(**b);
}

// Opens the store read-only, resolves `name` (a tag or "latest") and runs `fn`.
int WithTag(const std::string& db, const std::string& name,
            const std::function<int(Browser&, const std::string&)>& fn) {
  return WithBrowser(db, [&](Browser& b) {
    auto t = b.ResolveTag(name);
    if (!t.ok()) return ReportError(t.status());
    return fn(b, *t);
  });
}

void AddFilterOptions(CLI::App* c, CliArgs& a) {
  c->add_option("--file", a.file, "only parameters of this file");
  c->add_flag("--regex", a.regex, "the pattern is a regular expression, not a glob");
}

// tags, tree, show, stats, diff, history, meta, du: the catalog queries.
void AddCatalogCommands(CLI::App& app, CliArgs& a, std::vector<Command>& out) {
  out.push_back({app.add_subcommand("tags", "every tag: time, files, tensors, bytes, dedup"),
                 [&a] { return RunTags(a.db, a.as_json); }});

  auto* tree = app.add_subcommand("tree", "files of a tag with coordinates, then parameters");
  tree->add_option("tag", a.tag, "tag (or latest)")->required();
  tree->add_option("pattern", a.pattern, "glob (or --regex) over parameter paths");
  tree->add_flag("--expand", a.expand, "do not collapse numbered runs (layers.N.*)");
  AddFilterOptions(tree, a);
  out.push_back({tree, [&a] {
                   return WithTag(a.db, a.tag, [&](Browser& b, const std::string& t) {
                     return Emit(TreeReport(b, t, a.filter()), a.as_json,
                                 [&](const json& j) { RenderTree(j, a.expand); });
                   });
                 }});

  auto* show = app.add_subcommand("show", "one tensor: dtype, shape, placement, chunks");
  show->add_option("tag", a.tag)->required();
  show->add_option("file", a.file)->required();
  show->add_option("param", a.param)->required();
  out.push_back({show, [&a] {
                   return WithTag(a.db, a.tag, [&](Browser& b, const std::string& t) {
                     return Emit(ShowReport(b, t, a.file, a.param), a.as_json, RenderShow);
                   });
                 }});

  auto* stats = app.add_subcommand("stats", "min, max, mean, std, L2, NaN/Inf/zero counts");
  stats->add_option("tag", a.tag)->required();
  stats->add_option("pattern", a.pattern, "glob over parameter paths (default: all)");
  AddFilterOptions(stats, a);
  out.push_back({stats, [&a] {
                   return WithTag(a.db, a.tag, [&](Browser& b, const std::string& t) {
                     return Emit(StatsReport(b, t, a.filter()), a.as_json, RenderStats);
                   });
                 }});

  auto* diff = app.add_subcommand("diff", "parameters added, removed, reshaped, changed");
  diff->add_option("tag_a", a.tag)->required();
  diff->add_option("tag_b", a.tag_b)->required();
  diff->add_option("pattern", a.pattern, "glob over parameter paths");
  AddFilterOptions(diff, a);
  out.push_back({diff, [&a] {
                   return WithTag(a.db, a.tag, [&](Browser& b, const std::string& ta) {
                     auto tb = b.ResolveTag(a.tag_b);
                     if (!tb.ok()) return ReportError(tb.status());
                     return Emit(DiffReport(b, ta, *tb, a.filter()), a.as_json, RenderDiff);
                   });
                 }});

  auto* history = app.add_subcommand("history", "norm and digest of a parameter per tag");
  history->add_option("param", a.param)->required();
  history->add_option("--file", a.file, "the file holding the parameter");
  out.push_back({history, [&a] {
                   return WithBrowser(a.db, [&](Browser& b) {
                     return Emit(HistoryReport(b, a.param, a.file), a.as_json, RenderHistory);
                   });
                 }});

  auto* meta = app.add_subcommand("meta", "the non-tensor part of the saved state");
  meta->add_option("tag", a.tag)->required();
  meta->add_option("file", a.file);
  meta->add_flag("--tensors", a.with_tensors, "also list the tensors in the tree");
  out.push_back({meta, [&a] {
                   return WithTag(a.db, a.tag, [&](Browser& b, const std::string& t) {
                     return Emit(MetaReport(b, t, a.file, a.with_tensors), a.as_json, RenderMeta);
                   });
                 }});

  auto* du = app.add_subcommand("du", "space: logical, unique and shared bytes");
  du->add_option("--by", a.by, "tag, file or param-prefix")
      ->check(CLI::IsMember({"tag", "file", "param-prefix"}));
  du->add_option("--depth", a.depth, "param-prefix: path components kept")->check(IntArg(1, 1024));
  out.push_back({du, [&a] {
                   return WithBrowser(a.db, [&](Browser& b) {
                     return Emit(DuReport(b, a.by, a.depth), a.as_json, RenderDu);
                   });
                 }});
}

// hist, peek, export: the queries of tensor values.
void AddValueCommands(CLI::App& app, CliArgs& a, std::vector<Command>& out) {
  auto* hist = app.add_subcommand("hist", "histogram of one tensor's values");
  hist->add_option("tag", a.tag)->required();
  hist->add_option("param", a.param)->required();
  hist->add_option("--file", a.file, "the file holding the parameter");
  hist->add_option("--bins", a.bins, "number of buckets")->check(IntArg(1, 10000));

  auto* peek = app.add_subcommand("peek", "first values, or a numpy-style slice");
  peek->add_option("tag", a.tag)->required();
  peek->add_option("param", a.param)->required();
  peek->add_option("slice", a.slice, "e.g. '0:2, :, -1'");
  peek->add_option("--file", a.file, "the file holding the parameter");
  peek->add_option("--limit", a.limit,
                   "most values printed (default 10 without a slice, 1000 with one)")
      ->check(IntArg(1, kMaxPeekLimit));

  // One tensor of a tag, then its histogram or its values.
  auto one_tensor = [&a, hist, peek] {
    return WithTag(a.db, a.tag, [&](Browser& b, const std::string& t) {
      auto e = b.FindParam(t, a.file, a.param);
      if (!e.ok()) return ReportError(e.status());
      const bool is_hist = static_cast<bool>(*hist);
      const size_t limit = a.slice.empty() || peek->count("--limit") ? a.limit : size_t{1000};
      Result<json> r = is_hist ? HistReport(b, **e, a.bins) : PeekReport(b, **e, a.slice, limit);
      if (r.ok()) r->emplace("tag", t);
      return Emit(r, a.as_json, is_hist ? RenderHist : RenderPeek);
    });
  };
  out.push_back({hist, one_tensor});
  out.push_back({peek, one_tensor});

  auto* ex = app.add_subcommand("export", "write a tag as safetensors files");
  ex->add_option("tag", a.tag)->required();
  ex->add_option("--format", a.format)->check(CLI::IsMember({"safetensors"}));
  ex->add_option("--out", a.ex.out_dir, "output directory")->required();
  ex->add_option("--include", a.ex.include, "glob of tensor names to export");
  ex->add_option("--exclude", a.ex.exclude, "glob of tensor names to leave out");
  ex->add_option("--file", a.ex.file, "only this file of the tag");
  ex->add_option("--max-shard-size", a.shard_size, "e.g. 5GiB, 500MiB");
  ex->add_flag("--force", a.ex.overwrite, "replace existing files in the directory");
  out.push_back({ex, [&a] {
                   std::string why;
                   auto size = tools::ParseByteSize(a.shard_size, 1, uint64_t{1} << 62, &why);
                   if (!size) {
                     std::cerr << "error: --max-shard-size: " << why << "\n";
                     return 1;
                   }
                   a.ex.max_shard_bytes = *size;
                   return WithTag(a.db, a.tag, [&](Browser& b, const std::string& t) {
                     return Emit(ExportSafetensors(b, t, a.ex), a.as_json, RenderExport);
                   });
                 }});
}

// verify, gc, rm, keep: the admin commands, whose options ckptkv shares.
void AddAdminCommands(CLI::App& app, CliArgs& a, std::vector<Command>& out) {
  AdminArgs& ad = a.admin;
  out.push_back({AddVerifyCommand(app, ad),
                 [&a, &ad] { return RunVerify(a.db, ad.verify_tag(), ad.repair, a.as_json); }});
  out.push_back({AddGcCommand(app, ad), [&a, &ad] { return RunGc(a.db, ad.write); }});
  out.push_back({AddRmCommand(app, ad), [&a, &ad] { return RunRm(a.db, ad.tags, ad.write); }});
  out.push_back(
      {AddKeepCommand(app, ad), [&a, &ad] { return RunKeep(a.db, ad.last, ad.every, ad.write); }});
}

}  // namespace

int RunCli(int argc, char** argv) {
  CLI::App app{
      "kv-browser: inspect, compare, verify and clean a ckptkv checkpoint store.\n"
      "Read-only unless the subcommand is gc, rm or keep."};
  app.fallthrough();
  CliArgs a;
  app.add_option("--db", a.db, "store directory")->required();
  app.add_flag("--json", a.as_json, "print JSON (field names in docs/kv-browser.md)");

  std::vector<Command> commands;
  AddCatalogCommands(app, a, commands);
  AddValueCommands(app, a, commands);
  AddAdminCommands(app, a, commands);
  auto* tui_cmd = app.add_subcommand("tui", "terminal UI (the default on a terminal)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 1;
  }
  a.admin.write.as_json = a.as_json;

  for (const Command& c : commands) {
    if (*c.cmd) return c.run();
  }
  if (*tui_cmd) return RunTui(a.db);
  if (::isatty(STDIN_FILENO) && ::isatty(STDOUT_FILENO)) return RunTui(a.db);
  std::cerr << "error: give a subcommand (the terminal UI needs a terminal)\n" << app.help();
  return 1;
}

}  // namespace ckptkv::kvb
