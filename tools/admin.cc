#include "tools/admin.h"

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <memory>

#include <nlohmann/json.hpp>

#include "store/store.h"
#include "tools/kv_browser/analysis.h"
#include "tools/json_text.h"
#include "tools/proc_stats.h"

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace ckptkv::tools {
namespace {

// Opens an existing store; never creates one.
Result<std::unique_ptr<Store>> OpenExisting(const std::string& db, bool read_only) {
  std::error_code ec;
  if (db.empty()) return Status::InvalidArgument("--db is empty; give the store directory");
  if (!fs::exists(db, ec)) return Status::NotFound("store '" + db + "' does not exist");
  if (fs::is_directory(db, ec) && fs::is_empty(db, ec)) {
    return Status::NotFound("'" + db + "' is an empty directory, not a ckptkv store");
  }
  StoreOptions options;
  options.create_if_missing = false;
  options.read_only = read_only;
  return Store::Open(db, options);
}

std::string FormatTime(int64_t ms) {
  std::time_t t = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[64];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

std::string Mib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return buf;
}

}  // namespace

int ExitCodeFor(const Status& s) { return s.IsCorruption() ? 2 : 1; }

int ReportError(const Status& s) {
  std::cerr << "error: " << s.ToString() << std::endl;
  return ExitCodeFor(s);
}

int RunLs(const std::string& db, bool as_json) {
  auto store_or = OpenExisting(db, /*read_only=*/true);
  if (!store_or.ok()) return ReportError(store_or.status());
  Store& store = **store_or;
  auto tags_or = store.ListTags();
  if (!tags_or.ok()) return ReportError(tags_or.status());
  auto latest_or = store.Latest();
  if (!latest_or.ok()) return ReportError(latest_or.status());
  std::string latest = latest_or->value_or("");

  if (as_json) {
    json out;
    out["store"] = db;
    out["latest"] = latest.empty() ? json(nullptr) : json(latest);
    out["chunk_size"] = store.chunk_size();
    out["inline_threshold"] = store.inline_threshold();
    out["disk_bytes"] = store.DiskBytes();
    json tags = json::array();
    for (const TagInfo& t : *tags_or) {
      json j;
      j["tag"] = t.tag;
      j["latest"] = (t.tag == latest);
      j["sequence"] = t.sequence;
      j["committed_at_ms"] = t.committed_at_ms;
      j["committed_at"] = FormatTime(t.committed_at_ms);
      j["files"] = t.files;
      j["tensors"] = t.tensors;
      j["logical_bytes"] = t.logical_bytes;
      j["new_bytes"] = t.new_bytes;
      j["new_blocks"] = t.new_blocks;
      j["stored_new_bytes"] = t.stored_new_bytes;
      j["parent_tag"] = t.parent_tag.empty() ? json(nullptr) : json(t.parent_tag);
      if (t.layout) {
        j["layout"] = {{"tp", t.layout->tp},
                       {"pp", t.layout->pp},
                       {"dp", t.layout->dp},
                       {"zero_stage", t.layout->zero_stage}};
      }
      tags.push_back(std::move(j));
    }
    out["tags"] = std::move(tags);
    std::cout << JsonText(out, 2) << std::endl;
    return 0;
  }

  if (tags_or->empty()) {
    std::cout << "no committed tags in " << db << "\n";
    return 0;
  }
  std::printf("  %-24s %-19s %5s %8s %12s %12s\n", "tag", "committed", "files", "tensors",
              "logical MiB", "new MiB");
  uint64_t logical = 0, fresh = 0;
  for (const TagInfo& t : *tags_or) {
    std::printf("%c %-24s %-19s %5zu %8llu %12s %12s\n", t.tag == latest ? '*' : ' ', t.tag.c_str(),
                FormatTime(t.committed_at_ms).c_str(), t.files.size(),
                static_cast<unsigned long long>(t.tensors), Mib(t.logical_bytes).c_str(),
                Mib(t.new_bytes).c_str());
    logical += t.logical_bytes;
    fresh += t.new_bytes;
  }
  std::printf("%zu tags, %s MiB logical, %s MiB new, %s on disk (* = latest)\n", tags_or->size(),
              Mib(logical).c_str(), Mib(fresh).c_str(), HumanBytes(store.DiskBytes()).c_str());
  for (const TagInfo& t : *tags_or) {
    if (t.files.size() > 1 || (t.files.size() == 1 && t.tag == latest)) {
      // Files of the latest tag (and of any multi-file tag) for orientation.
      for (const auto& f : t.files) std::printf("    %s/%s\n", t.tag.c_str(), f.c_str());
    }
  }
  return 0;
}

int RunVerify(const std::string& db, const std::optional<std::string>& tag, bool as_json,
              bool repair) {
  auto store_or = OpenExisting(db, /*read_only=*/!repair);
  if (!store_or.ok()) return ReportError(store_or.status());
  double t0 = NowSeconds();
  auto report_or = kvb::VerifyStore(**store_or, tag, repair);
  double secs = NowSeconds() - t0;
  if (!report_or.ok()) return ReportError(report_or.status());
  json out = std::move(report_or).value();
  out["store"] = db;
  out["tag"] = tag ? json(*tag) : json(nullptr);
  out["seconds"] = secs;
  const bool ok = out["ok"].get<bool>();
  if (as_json) {
    std::cout << JsonText(out, 2) << std::endl;
    return ok ? 0 : 2;
  }
  for (const auto& p : out["problems"]) {
    std::cerr << "problem: tag=" << p["tag"].get<std::string>();
    for (const char* k : {"file", "param", "digest"}) {
      const std::string v = p[k].get<std::string>();
      if (!v.empty()) std::cerr << " " << k << "=" << v;
    }
    std::cerr << ": " << p["what"].get<std::string>() << "\n";
  }
  std::printf("verified %llu tags, %llu files, %llu tensors, %llu blocks (%s) in %.2f s: %s\n",
              static_cast<unsigned long long>(out["tags"].get<uint64_t>()),
              static_cast<unsigned long long>(out["files"].get<uint64_t>()),
              static_cast<unsigned long long>(out["tensors"].get<uint64_t>()),
              static_cast<unsigned long long>(out["blocks_checked"].get<uint64_t>()),
              HumanBytes(out["bytes_checked"].get<uint64_t>()).c_str(), secs,
              ok ? "ok" : (std::to_string(out["problems"].size()) + " problem(s)").c_str());
  if (repair) {
    std::printf("repair: %llu bad block(s) forgotten; the next save of their bytes rewrites them\n",
                static_cast<unsigned long long>(out["blocks_forgotten"].get<uint64_t>()));
  }
  if (!out["damaged_tags"].empty()) {
    std::string names;
    for (const auto& t : out["damaged_tags"])
      names += (names.empty() ? "" : ", ") + t.get<std::string>();
    std::printf("damaged tags: %s\n", names.c_str());
  }
  return ok ? 0 : 2;
}

int RunGc(const std::string& db, bool dry_run, bool as_json) {
  auto store_or = OpenExisting(db, /*read_only=*/false);
  if (!store_or.ok()) return ReportError(store_or.status());
  double t0 = NowSeconds();
  auto gc_or = (*store_or)->Gc(dry_run);
  double secs = NowSeconds() - t0;
  if (!gc_or.ok()) return ReportError(gc_or.status());
  const GcStats& g = *gc_or;
  if (as_json) {
    json out;
    out["store"] = db;
    out["dry_run"] = dry_run;
    out["blocks_scanned"] = g.blocks_scanned;
    out["blocks_live"] = g.blocks_live;
    out["blocks_removed"] = g.blocks_removed;
    out["bytes_removed"] = g.bytes_removed;
    out["stored_bytes_removed"] = g.stored_bytes_removed;
    out["disk_bytes_before"] = g.disk_bytes_before;
    out["disk_bytes_after"] = g.disk_bytes_after;
    out["seconds"] = secs;
    std::cout << JsonText(out, 2) << std::endl;
    return 0;
  }
  std::printf("%s%llu blocks scanned, %llu live, %llu %s (%s raw, %s stored)\n",
              dry_run ? "dry run: " : "", static_cast<unsigned long long>(g.blocks_scanned),
              static_cast<unsigned long long>(g.blocks_live),
              static_cast<unsigned long long>(g.blocks_removed),
              dry_run ? "would be removed" : "removed", HumanBytes(g.bytes_removed).c_str(),
              HumanBytes(g.stored_bytes_removed).c_str());
  if (!dry_run) {
    std::printf("disk: %s -> %s in %.2f s\n", HumanBytes(g.disk_bytes_before).c_str(),
                HumanBytes(g.disk_bytes_after).c_str(), secs);
  }
  return 0;
}

int RunRm(const std::string& db, const std::string& tag) {
  auto store_or = OpenExisting(db, /*read_only=*/false);
  if (!store_or.ok()) return ReportError(store_or.status());
  Store& store = **store_or;
  Status s = store.DeleteTag(tag);
  if (!s.ok()) return ReportError(s);
  auto latest_or = store.Latest();
  if (!latest_or.ok()) return ReportError(latest_or.status());
  std::printf(
      "removed tag %s; latest is %s; run `ckptkv gc --db %s` to reclaim unreferenced blocks\n",
      tag.c_str(), latest_or->value_or("(none)").c_str(), db.c_str());
  return 0;
}

}  // namespace ckptkv::tools
