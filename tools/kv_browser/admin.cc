// The admin commands (admin.h). tags and verify read; gc, rm and keep, the
// only ones that write, show what they would do and what that reclaims,
// then write as Confirm allows.
#include "tools/kv_browser/admin.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <set>

#include "tools/kv_browser/commands.h"
#include "tools/kv_browser/text.h"
#include "tools/json_text.h"

namespace ckptkv::kvb {

namespace {

// Whether to write (the rule in admin.h). The question goes to stderr, so it
// is asked only where someone can see it and answer.
Result<bool> Confirm(const WriteFlags& f, const std::string& what) {
  if (f.dry_run) return false;
  if (f.yes) return true;
  if (::isatty(STDIN_FILENO) && ::isatty(STDERR_FILENO)) {
    std::fprintf(stderr, "%s? [y/N] ", what.c_str());
    std::string answer;
    std::getline(std::cin, answer);
    return answer == "y" || answer == "Y" || answer == "yes";
  }
  if (f.unattended == Unattended::kWrite) return true;
  return Status::InvalidArgument("not writing: " + what +
                                 " needs --yes when not run on a terminal");
}

Result<json> DoGc(Browser& b, const WriteFlags& f, bool quiet) {
  ASSIGN_OR_RETURN(GcStats plan, b.store().Gc(/*dry_run=*/true));
  if (!quiet && !f.as_json) {
    std::printf("gc: %llu of %llu blocks are unreferenced: %s would be reclaimed%s\n",
                static_cast<unsigned long long>(plan.blocks_removed),
                static_cast<unsigned long long>(plan.blocks_scanned),
                HumanBytes(plan.stored_bytes_removed).c_str(),
                plan.resumed_compaction ? "; an interrupted gc's compaction is to finish" : "");
  }
  // Nothing to remove and no compaction of an interrupted gc to finish.
  if (plan.blocks_removed == 0 && !plan.resumed_compaction) return GcJson(plan, true);
  ASSIGN_OR_RETURN(bool go, quiet ? Result<bool>(true) : Confirm(f, "remove them"));
  if (!go) return GcJson(plan, true);
  Progress progress("gc", 1);
  ASSIGN_OR_RETURN(GcStats done, b.store().Gc(false));
  progress.Done();
  if (!f.as_json) {
    std::printf("gc: removed %llu blocks (%s); disk %s -> %s\n",
                static_cast<unsigned long long>(done.blocks_removed),
                HumanBytes(done.stored_bytes_removed).c_str(),
                HumanBytes(done.disk_bytes_before).c_str(),
                HumanBytes(done.disk_bytes_after).c_str());
  }
  return GcJson(done, false);
}

// Deletes `doomed` (after showing the plan); shared by rm and keep.
int DeleteTags(Browser& b, const std::vector<std::string>& doomed,
               const std::vector<std::string>& kept, const WriteFlags& f) {
  auto blocks = b.Blocks();
  auto tags = b.Tags();
  if (!blocks.ok()) return ReportError(blocks.status());
  if (!tags.ok()) return ReportError(tags.status());
  std::set<uint32_t> gone;
  for (uint32_t i = 0; i < (*tags)->size(); ++i) {
    if (std::count(doomed.begin(), doomed.end(), (**tags)[i].tag)) gone.insert(i);
  }
  uint64_t reclaim = 0;
  for (const auto& [d, u] : **blocks) {
    if (std::all_of(u.tags.begin(), u.tags.end(), [&](uint32_t t) { return gone.count(t); })) {
      reclaim += u.length;
    }
  }
  json out{{"delete", doomed}, {"keep", kept}, {"reclaimable_bytes", reclaim}};
  if (!f.as_json) {
    for (const auto& t : doomed) std::printf("delete %s\n", t.c_str());
    std::printf("%zu tag(s) to delete, %zu kept; gc would then reclaim %s\n", doomed.size(),
                kept.size(), HumanBytes(reclaim).c_str());
  }
  bool go = false;
  if (!doomed.empty()) {
    auto c = Confirm(f, "delete " + std::to_string(doomed.size()) + " tag(s)");
    if (!c.ok()) return ReportError(c.status());
    go = *c;
  }
  json deleted = json::array();
  if (go) {
    for (const auto& t : doomed) {
      Status s = b.store().DeleteTag(t);
      if (!s.ok()) return ReportError(s);
      deleted.push_back(t);
    }
    if (!f.as_json) std::printf("deleted %zu tag(s)\n", deleted.size());
  }
  out["dry_run"] = !go;
  out["deleted"] = deleted;
  out["gc"] = nullptr;
  if (go && f.run_gc) {
    auto g = DoGc(b, f, /*quiet=*/true);
    if (!g.ok()) return ReportError(g.status());
    out["gc"] = *g;
    if (!f.as_json) {
      std::printf("gc: removed %s blocks (%s)\n", tools::JsonText((*g)["blocks_removed"]).c_str(),
                  HumanBytes((*g)["stored_bytes_removed"].get<uint64_t>()).c_str());
    }
  }
  if (f.as_json) std::cout << tools::JsonText(out, 2) << std::endl;
  return 0;
}

Result<std::unique_ptr<Browser>> OpenForWrite(const std::string& db) {
  return Browser::Open(db, Browser::Mode::kWrite);
}

}  // namespace

json GcJson(const GcStats& g, bool dry_run) {
  return json{{"dry_run", dry_run},
              {"blocks_scanned", g.blocks_scanned},
              {"blocks_live", g.blocks_live},
              {"blocks_removed", g.blocks_removed},
              {"bytes_removed", g.bytes_removed},
              {"stored_bytes_removed", g.stored_bytes_removed},
              {"disk_bytes_before", g.disk_bytes_before},
              {"disk_bytes_after", g.disk_bytes_after}};
}

int RunTags(const std::string& db, bool as_json) {
  auto b = Browser::Open(db, Browser::Mode::kReadOnly);
  if (!b.ok()) return ReportError(b.status());
  return Emit(TagsReport(**b), as_json, RenderTags);
}

int RunVerify(const std::string& db, const std::string& tag, bool repair, bool as_json) {
  auto b = Browser::Open(db, repair ? Browser::Mode::kWrite : Browser::Mode::kReadOnly);
  if (!b.ok()) return ReportError(b.status());
  std::optional<std::string> only;
  if (!tag.empty()) {
    auto t = (*b)->ResolveTag(tag);
    if (!t.ok()) return ReportError(t.status());
    only = *t;
  }
  auto r = VerifyStore((*b)->store(), only, repair);
  int rc = Emit(r, as_json, RenderVerify);
  return rc == 0 && !(*r)["ok"].get<bool>() ? 2 : rc;
}

int RunGc(const std::string& db, const WriteFlags& f) {
  auto b = OpenForWrite(db);
  if (!b.ok()) return ReportError(b.status());
  auto r = DoGc(**b, f, /*quiet=*/false);
  if (!r.ok()) return ReportError(r.status());
  if (f.as_json) std::cout << tools::JsonText(*r, 2) << std::endl;
  return 0;
}

int RunRm(const std::string& db, const std::vector<std::string>& names, const WriteFlags& f) {
  auto b = OpenForWrite(db);
  if (!b.ok()) return ReportError(b.status());
  std::vector<std::string> doomed;
  for (const auto& n : names) {
    auto t = (*b)->ResolveTag(n);
    if (!t.ok()) return ReportError(t.status());
    if (std::find(doomed.begin(), doomed.end(), *t) == doomed.end()) doomed.push_back(*t);
  }
  auto tags = (*b)->Tags();
  if (!tags.ok()) return ReportError(tags.status());
  std::vector<std::string> kept;
  for (const auto& t : **tags) {
    if (std::find(doomed.begin(), doomed.end(), t.tag) == doomed.end()) kept.push_back(t.tag);
  }
  return DeleteTags(**b, doomed, kept, f);
}

int RunKeep(const std::string& db, int last, int every, const WriteFlags& f) {
  auto b = OpenForWrite(db);
  if (!b.ok()) return ReportError(b.status());
  auto tags = (*b)->Tags();
  if (!tags.ok()) return ReportError(tags.status());
  auto latest = (*b)->Latest();
  if (!latest.ok()) return ReportError(latest.status());
  const size_t n = (*tags)->size();
  std::vector<std::string> doomed, kept;
  for (size_t i = 0; i < n; ++i) {
    const std::string& t = (**tags)[i].tag;
    bool keep = i + static_cast<size_t>(last) >= n || t == *latest ||
                (every > 0 && i % static_cast<size_t>(every) == 0);
    (keep ? kept : doomed).push_back(t);
  }
  return DeleteTags(**b, doomed, kept, f);
}

}  // namespace ckptkv::kvb
