// The admin commands' options (admin.h), defined once for kv-browser
// (cli.cc, where --db and --json belong to the program) and ckptkv
// (ckptkv_main.cc, where each subcommand takes them). Header-only, so that
// kv_browser_core does not depend on CLI11.
#ifndef CKPTKV_TOOLS_KV_BROWSER_ADMIN_CLI_H_
#define CKPTKV_TOOLS_KV_BROWSER_ADMIN_CLI_H_

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "tools/cli_args.h"
#include "tools/kv_browser/admin.h"

namespace ckptkv::kvb {

struct AdminArgs {
  std::string tag;                // verify: one tag; empty = every tag
  bool all = false;               // verify --all
  bool repair = false;            // verify --repair
  std::vector<std::string> tags;  // rm
  int last = 0, every = 0;        // keep
  WriteFlags write;               // gc, rm, keep

  // The tag verify checks: empty for every tag.
  std::string verify_tag() const { return all ? "" : tag; }
};

inline CLI::App* AddVerifyCommand(CLI::App& app, AdminArgs& a) {
  auto* c = app.add_subcommand("verify", "re-hash every block; check every record");
  c->add_option("tag", a.tag, "one tag, or latest (default: all)");
  c->add_flag("--all", a.all, "every tag");
  c->add_flag("--repair", a.repair,
              "drop the index entries of bad blocks (takes the write lock), so that the next "
              "save of their bytes writes them again");
  return c;
}

namespace internal {
inline void AddWriteFlags(CLI::App* c, WriteFlags& f) {
  c->add_flag("--dry-run", f.dry_run, "only show what would be done");
  c->add_flag("-y,--yes", f.yes, "write without asking");
}
}  // namespace internal

inline CLI::App* AddGcCommand(CLI::App& app, AdminArgs& a) {
  auto* c = app.add_subcommand("gc", "remove blocks no tag references (writes)");
  internal::AddWriteFlags(c, a.write);
  return c;
}

inline CLI::App* AddRmCommand(CLI::App& app, AdminArgs& a) {
  auto* c = app.add_subcommand("rm", "delete tags (writes); gc then reclaims their blocks");
  c->add_option("tags", a.tags, "tags to delete")->required();
  c->add_flag("--gc", a.write.run_gc, "run gc afterwards");
  internal::AddWriteFlags(c, a.write);
  return c;
}

inline CLI::App* AddKeepCommand(CLI::App& app, AdminArgs& a) {
  auto* c = app.add_subcommand("keep", "delete all but the last N tags (writes)");
  c->add_option("--last", a.last, "tags to keep, newest first")
      ->required()
      ->check(tools::IntArg(1, 1 << 30));
  c->add_option("--every", a.every, "also keep every K-th older tag (1st, K+1-th, ...)")
      ->check(tools::IntArg(1, 1 << 30));
  c->add_flag("--gc", a.write.run_gc, "run gc afterwards");
  internal::AddWriteFlags(c, a.write);
  return c;
}

}  // namespace ckptkv::kvb

#endif  // CKPTKV_TOOLS_KV_BROWSER_ADMIN_CLI_H_
