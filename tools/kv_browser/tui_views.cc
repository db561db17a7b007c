#include <algorithm>
#include <cstdarg>
#include <cstdio>

#include "tools/kv_browser/commands.h"
#include "tools/kv_browser/text.h"
#include "tools/kv_browser/tui.h"
#include "tools/json_text.h"

namespace ckptkv::kvb {

namespace {

// Stats are computed for the selected parameter up to this size.
constexpr uint64_t kAutoStatsBytes = 64ull << 20;

std::string Fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string Fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

bool Matches(const std::string& filter, const std::string& key) {
  if (filter.empty()) return true;
  if (filter.find_first_of("*?[") != std::string::npos) return GlobMatch(filter, key);
  return key.find(filter) != std::string::npos;
}

std::string Str(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_number()) return FormatNumber(j.get<double>());
  return tools::JsonText(j);
}

}  // namespace

const char* TuiModel::SortName() const {
  switch (sort) {
    case TuiSort::kName:
      return "name";
    case TuiSort::kSize:
      return "size";
    case TuiSort::kOrder:
      return "stored order";
  }
  return "";
}

std::string TuiModel::Where() const {
  switch (level) {
    case TuiLevel::kTags:
      return "tags";
    case TuiLevel::kFiles:
      return tag;
    case TuiLevel::kParams:
      return tag + " / " + file;
  }
  return "";
}

Result<std::vector<TuiRow>> TuiModel::Rows() {
  std::vector<TuiRow> rows;
  if (level == TuiLevel::kTags) {
    ASSIGN_OR_RETURN(const auto* tags, b_.Tags());
    ASSIGN_OR_RETURN(std::string latest, b_.Latest());
    for (const auto& t : *tags) {
      ASSIGN_OR_RETURN(TagSpace sp, b_.SpaceOf(t.tag));
      std::string mark = marked.count(t.tag) ? "[x]" : "[ ]";
      rows.push_back(
          {t.tag,
           Fmt("%s %c %-20s %10s  new %10s  shared %10s", mark.c_str(), t.tag == latest ? '*' : ' ',
               t.tag.c_str(), HumanBytes(t.logical_bytes).c_str(), HumanBytes(t.new_bytes).c_str(),
               HumanBytes(sp.shared_bytes).c_str()),
           t.logical_bytes});
    }
  } else {
    ASSIGN_OR_RETURN(const TagContents* c, b_.Contents(tag));
    if (level == TuiLevel::kFiles) {
      for (const auto& f : c->info.files) {
        uint64_t bytes = 0, n = 0;
        for (const auto& e : c->tensors) {
          if (e.file == f) bytes += e.bytes(), n++;
        }
        rows.push_back({f,
                        Fmt("%-44s %6llu tensors %10s", f.c_str(),
                            static_cast<unsigned long long>(n), HumanBytes(bytes).c_str()),
                        bytes});
      }
    } else {
      ASSIGN_OR_RETURN(const BlockMap* blocks, b_.Blocks());
      for (const auto& e : c->tensors) {
        if (e.file != file) continue;
        uint64_t shared = 0;
        for (size_t i = 0; i < e.num_chunks(); ++i) {
          if (blocks->at(e.chunk(i)).tags.size() > 1) shared += e.chunk_length(i);
        }
        int pct = e.bytes() ? static_cast<int>(100 * shared / e.bytes()) : 0;
        rows.push_back(
            {e.param,
             Fmt("%-34s %-8s %-12s %10s %3d%% shared", e.param.c_str(), DTypeName(e.dtype()),
                 ShapeString(e.shape()).c_str(), HumanBytes(e.bytes()).c_str(), pct),
             e.bytes()});
      }
    }
  }
  rows.erase(std::remove_if(rows.begin(), rows.end(),
                            [&](const TuiRow& r) { return !Matches(filter, r.key); }),
             rows.end());
  if (sort == TuiSort::kName) {
    std::stable_sort(rows.begin(), rows.end(),
                     [](const TuiRow& a, const TuiRow& b) { return a.key < b.key; });
  } else if (sort == TuiSort::kSize) {
    std::stable_sort(rows.begin(), rows.end(),
                     [](const TuiRow& a, const TuiRow& b) { return a.bytes > b.bytes; });
  }
  return rows;
}

std::vector<std::string> TuiModel::Detail(const TuiRow& row, int width) {
  std::vector<std::string> out;
  auto error = [&](const Status& s) {
    out.push_back("error: " + s.message());
    return out;
  };
  if (level == TuiLevel::kTags) {
    auto info = b_.store().GetTag(row.key);
    if (!info.ok()) return error(info.status());
    auto sp = b_.SpaceOf(row.key);
    if (!sp.ok()) return error(sp.status());
    out.push_back("tag " + row.key);
    out.push_back("committed  " + FormatTime(info->committed_at_ms));
    out.push_back(Fmt("files      %zu", info->files.size()));
    out.push_back(Fmt("tensors    %llu", static_cast<unsigned long long>(info->tensors)));
    out.push_back("logical    " + HumanBytes(info->logical_bytes));
    out.push_back("new        " + HumanBytes(info->new_bytes));
    out.push_back("shared     " + HumanBytes(sp->shared_bytes));
    out.push_back("unique     " + HumanBytes(sp->unique_bytes));
    if (info->new_bytes) {
      out.push_back(Fmt("dedup      %.2fx", static_cast<double>(info->logical_bytes) /
                                                static_cast<double>(info->new_bytes)));
    }
    if (!info->parent_tag.empty()) out.push_back("parent     " + info->parent_tag);
    return out;
  }
  if (level == TuiLevel::kFiles) {
    auto tree = TreeReport(b_, tag, ParamFilter{"", false, row.key});
    if (!tree.ok()) return error(tree.status());
    for (const auto& f : (*tree)["files"]) {
      if (f["file"] != row.key) continue;
      out.push_back("file " + row.key);
      const json& c = f["coordinates"];
      out.push_back("kind " + Str(c["kind"]) + "  pp " + Str(c["pp"]) + "  tp " + Str(c["tp"]) +
                    "  dp " + Str(c["dp"]));
      out.push_back("tensors " + Str(f["tensors"]) + "  " + HumanBytes(f["bytes"].get<uint64_t>()));
    }
    return out;
  }
  auto e_or = b_.FindParam(tag, file, row.key);
  if (!e_or.ok()) return error(e_or.status());
  const TensorEntry& e = **e_or;
  out.push_back(e.param);
  out.push_back(std::string(DTypeName(e.dtype())) + " " + ShapeString(e.shape()) + "  " +
                HumanBytes(e.bytes()));
  out.push_back("digest " + e.digest().Hex());
  std::set<std::string> sharing;
  for (size_t i = 0; i < e.num_chunks(); ++i) {
    for (const auto& t : b_.TagsOf(e.chunk(i))) {
      if (t != tag) sharing.insert(t);
    }
  }
  std::string with;
  for (const auto& t : sharing) with += (with.empty() ? "" : ", ") + t;
  out.push_back(Fmt("%zu chunks%s", e.num_chunks(), e.is_inline() ? " (inline)" : ""));
  out.push_back("shared with: " + (with.empty() ? std::string("(no other tag)") : with));
  if (e.bytes() > kAutoStatsBytes) {
    out.emplace_back("(stats: run kv-browser stats for tensors over 64 MiB)");
    return out;
  }
  auto hist = HistReport(b_, e, 10);
  if (!hist.ok()) return error(hist.status());
  const json& h = *hist;
  out.emplace_back("");
  out.push_back("min " + Str(h["min"]) + "  max " + Str(h["max"]));
  out.push_back("mean " + Str(h["mean"]) + "  std " + Str(h["std"]));
  out.push_back("l2 " + Str(h["l2_norm"]) + "  nan " + Str(h["nan"]) + "  inf " + Str(h["inf"]) +
                "  zeros " + Str(h["zeros"]));
  out.emplace_back("histogram:");
  for (auto& l : HistogramLines(h, std::max(8, width - 26))) out.push_back(l);
  return out;
}

std::vector<std::string> TuiModel::DiffLines() {
  std::vector<std::string> out;
  if (marked.size() != 2) return {"mark two tags (space) to diff them"};
  // Older tag first.
  std::vector<std::string> two;
  if (auto tags = b_.Tags(); tags.ok()) {
    for (const auto& t : **tags) {
      if (marked.count(t.tag)) two.push_back(t.tag);
    }
  }
  if (two.size() != 2) return {"a marked tag is gone; refresh with r"};
  auto d = DiffReport(b_, two[0], two[1], ParamFilter{});
  if (!d.ok()) return {"error: " + d.status().message()};
  const json& j = *d;
  out.push_back("diff " + two[0] + " -> " + two[1]);
  for (const auto& p : j["added"]) out.push_back("+ " + Str(p["param"]));
  for (const auto& p : j["removed"]) out.push_back("- " + Str(p["param"]));
  for (const auto& p : j["reshaped"]) {
    out.push_back("~ " + Str(p["param"]) + " " + Str(p["from"]["shape"]) + " -> " +
                  Str(p["to"]["shape"]));
  }
  for (const auto& p : j["changed"]) {
    out.push_back("* " + Str(p["param"]) + "  l2 " + Str(p["l2_diff"]) + "  max " +
                  Str(p["max_abs_diff"]) + "  changed " + Str(p["elements_changed"]) + "/" +
                  Str(p["numel"]));
  }
  out.push_back(Fmt("%zu added, %zu removed, %zu reshaped, %zu changed, %s unchanged; read %s",
                    j["added"].size(), j["removed"].size(), j["reshaped"].size(),
                    j["changed"].size(), Str(j["unchanged"]).c_str(),
                    HumanBytes(j["bytes_read"].get<uint64_t>()).c_str()));
  return out;
}

std::vector<std::string> TuiModel::VerifyLines(const std::string& only_tag) {
  std::vector<std::string> only;
  if (!only_tag.empty()) only.push_back(only_tag);
  auto r = VerifyTags(b_, only);
  if (!r.ok()) return {"error: " + r.status().message()};
  const json& j = *r;
  std::vector<std::string> out;
  out.push_back("verify " + (only_tag.empty() ? std::string("(all tags)") : only_tag) + ": " +
                (j["ok"].get<bool>() ? "ok" : "PROBLEMS"));
  out.push_back("tags " + Str(j["tags"]) + "  tensors " + Str(j["tensors"]) + "  blocks " +
                Str(j["blocks_checked"]) + "  " + HumanBytes(j["bytes_checked"].get<uint64_t>()));
  for (const auto& p : j["problems"]) {
    out.push_back(Str(p["tag"]) + " " + Str(p["file"]) + " " + Str(p["param"]) + ": " +
                  Str(p["what"]));
  }
  return out;
}

std::vector<std::string> TuiModel::HelpLines() {
  return {"kv-browser keys",
          "",
          "  up/down j/k    move        PgUp/PgDn   page",
          "  enter/right/l  open        left/h/bksp back",
          "  /              filter (substring, or glob with * ? [)",
          "  s              sort: stored order, name, size",
          "  space/m        mark a tag (tags list)",
          "  d              diff the two marked tags",
          "  v              verify the selected tag (all tags from the tag list: V)",
          "  r              refresh: reopen the store, see new commits",
          "  ?              this help",
          "  q              quit (or close this view)"};
}

}  // namespace ckptkv::kvb
