#include "tools/kv_browser/commands.h"

#include <algorithm>
#include <cstdio>
#include <iostream>

#include "tools/kv_browser/text.h"
#include "tools/json_text.h"

namespace ckptkv::kvb {

namespace {

std::string Str(const json& j) {
  if (j.is_null()) return "-";
  if (j.is_string()) return j.get<std::string>();
  if (j.is_number()) return FormatNumber(j.get<double>());
  return tools::JsonText(j);
}

std::string Shape(const json& j) { return ShapeString(j["shape"].get<std::vector<int64_t>>()); }

uint64_t U(const json& j) { return j.get<uint64_t>(); }

}  // namespace

int Emit(const Result<json>& r, bool as_json, const std::function<void(const json&)>& text) {
  if (!r.ok()) return ReportError(r.status());
  if (as_json) {
    std::cout << tools::JsonText(r.value(), 2) << std::endl;
  } else {
    text(r.value());
  }
  return 0;
}

void RenderTags(const json& j) {
  if (j.empty()) {
    std::printf("no committed tags\n");
    return;
  }
  std::printf("  %-22s %-19s %5s %7s %12s %12s %12s %7s\n", "tag", "committed", "files", "tensors",
              "logical", "new", "shared", "dedup");
  for (const auto& t : j) {
    char dedup[32] = "-";
    if (!t["dedup_ratio"].is_null()) {
      std::snprintf(dedup, sizeof dedup, "%.2fx", t["dedup_ratio"].get<double>());
    }
    std::printf("%c %-22s %-19s %5s %7s %12s %12s %12s %7s\n", t["latest"].get<bool>() ? '*' : ' ',
                Str(t["tag"]).c_str(), Str(t["committed_at"]).c_str(), Str(t["files"]).c_str(),
                Str(t["tensors"]).c_str(), HumanBytes(U(t["logical_bytes"])).c_str(),
                HumanBytes(U(t["new_bytes"])).c_str(), HumanBytes(U(t["shared_bytes"])).c_str(),
                dedup);
  }
  std::printf(
      "(* = latest; new = bytes first written by the commit; shared = bytes of blocks "
      "other tags also use)\n");
}

void RenderTree(const json& j, bool expand) {
  std::printf("%s\n", Str(j["tag"]).c_str());
  for (const auto& f : j["files"]) {
    const json& c = f["coordinates"];
    std::printf("  %s  (pp=%s tp=%s dp=%s)  %s tensors, %s\n", Str(f["file"]).c_str(),
                Str(c["pp"]).c_str(), Str(c["tp"]).c_str(), Str(c["dp"]).c_str(),
                Str(f["tensors"]).c_str(), HumanBytes(U(f["bytes"])).c_str());
    std::vector<NamedRow> rows;
    for (const auto& p : f["params"]) {
      rows.push_back({Str(p["param"]), Str(p["dtype"]) + " " + Shape(p), U(p["bytes"])});
    }
    std::vector<CollapsedRow> out;
    if (expand) {
      for (const auto& r : rows) out.push_back({r.name, r.signature, r.bytes, 1});
    } else {
      out = CollapseNumberedRuns(rows);
    }
    for (const auto& r : out) {
      std::string times = r.rows > 1 ? " x" + std::to_string(r.rows) : "";
      std::printf("    %-48s %-28s %12s%s\n", r.name.c_str(), r.signature.c_str(),
                  HumanBytes(r.bytes).c_str(), times.c_str());
    }
  }
}

void RenderShow(const json& j) {
  std::printf("%s %s:%s\n", Str(j["tag"]).c_str(), Str(j["file"]).c_str(), Str(j["param"]).c_str());
  std::printf("  dtype %s  shape %s  numel %s  bytes %s (%s)\n", Str(j["dtype"]).c_str(),
              Shape(j).c_str(), Str(j["numel"]).c_str(), Str(j["bytes"]).c_str(),
              HumanBytes(U(j["bytes"])).c_str());
  std::printf("  digest %s  requires_grad %s  %s\n", Str(j["digest"]).c_str(),
              j["requires_grad"].get<bool>() ? "yes" : "no",
              j["inline"].get<bool>() ? "inline (in its record)" : "");
  if (!j["placement"].is_null()) {
    std::printf("  placement:\n");
    for (const auto& [k, v] : j["placement"].items()) {
      std::printf("    %-14s %s\n", k.c_str(), tools::JsonText(v).c_str());
    }
  }
  if (!j["chunks"].empty()) {
    std::printf("  %zu chunks of %s:\n", j["chunks"].size(),
                HumanBytes(U(j["chunk_size"])).c_str());
    for (const auto& c : j["chunks"]) {
      std::string shared;
      for (const auto& t : c["shared_with"]) shared += (shared.empty() ? "" : ", ") + Str(t);
      std::printf("    #%-4s %10s  %s  shared with: %s\n", Str(c["index"]).c_str(),
                  HumanBytes(U(c["length"])).c_str(), Str(c["digest"]).c_str(),
                  shared.empty() ? "(no other tag)" : shared.c_str());
    }
  }
}

void RenderStats(const json& j) {
  std::printf("%-40s %-9s %12s %12s %12s %12s %12s %6s %6s %8s\n", "param", "dtype", "min", "max",
              "mean", "std", "l2", "nan", "inf", "zeros");
  for (const auto& p : j["params"]) {
    std::printf("%-40s %-9s %12s %12s %12s %12s %12s %6s %6s %8s\n", Str(p["param"]).c_str(),
                Str(p["dtype"]).c_str(), Str(p["min"]).c_str(), Str(p["max"]).c_str(),
                Str(p["mean"]).c_str(), Str(p["std"]).c_str(), Str(p["l2_norm"]).c_str(),
                Str(p["nan"]).c_str(), Str(p["inf"]).c_str(), Str(p["zeros"]).c_str());
  }
}

std::vector<std::string> HistogramLines(const json& j, int width) {
  std::vector<std::string> out;
  uint64_t most = 1;
  for (const auto& b : j["buckets"]) most = std::max(most, U(b["count"]));
  for (const auto& b : j["buckets"]) {
    int n = static_cast<int>(static_cast<double>(U(b["count"])) / most * width);
    char head[64];
    std::snprintf(head, sizeof head, "%11s %10s ", FormatNumber(b["lo"].get<double>()).c_str(),
                  Str(b["count"]).c_str());
    out.push_back(head + std::string(n, '#'));
  }
  return out;
}

void RenderHist(const json& j) {
  std::printf("%s %s:%s %s %s  min %s max %s  nan %s inf %s\n", Str(j["tag"]).c_str(),
              Str(j["file"]).c_str(), Str(j["param"]).c_str(), Str(j["dtype"]).c_str(),
              Shape(j).c_str(), Str(j["min"]).c_str(), Str(j["max"]).c_str(), Str(j["nan"]).c_str(),
              Str(j["inf"]).c_str());
  std::printf("%11s %10s\n", "from", "count");
  for (const auto& l : HistogramLines(j, 50)) std::printf("%s\n", l.c_str());
}

std::string PeekText(const json& j) {
  const auto& vals = j["values"];
  std::vector<int64_t> shape = j["result_shape"].get<std::vector<int64_t>>();
  if (j["truncated"].get<bool>() || shape.empty()) {
    std::string s = shape.empty() ? "" : "[";
    for (size_t i = 0; i < vals.size(); ++i) s += (i ? ", " : "") + Str(vals[i]);
    if (shape.empty()) return s;
    return s + (j["truncated"].get<bool>() ? ", ...]" : "]");
  }
  // Nested brackets, row-major.
  std::string s;
  size_t k = 0;
  std::function<void(size_t)> rec = [&](size_t d) {
    s += "[";
    for (int64_t i = 0; i < shape[d]; ++i) {
      if (i) s += d + 1 == shape.size() ? ", " : ",\n" + std::string(d + 1, ' ');
      if (d + 1 == shape.size()) {
        s += Str(vals[k++]);
      } else {
        rec(d + 1);
      }
    }
    s += "]";
  };
  rec(0);
  return s;
}

void RenderPeek(const json& j) {
  std::printf("%s %s:%s %s %s%s\n", Str(j["tag"]).c_str(), Str(j["file"]).c_str(),
              Str(j["param"]).c_str(), Str(j["dtype"]).c_str(), Shape(j).c_str(),
              j["slice"].is_null() ? "" : (" [" + Str(j["slice"]) + "]").c_str());
  std::printf("%s\n", PeekText(j).c_str());
}

void RenderDiff(const json& j) {
  std::printf("diff %s -> %s\n", Str(j["tag_a"]).c_str(), Str(j["tag_b"]).c_str());
  for (const auto& p : j["added"]) {
    std::printf("  + %s:%s %s %s\n", Str(p["file"]).c_str(), Str(p["param"]).c_str(),
                Str(p["dtype"]).c_str(), Shape(p).c_str());
  }
  for (const auto& p : j["removed"]) {
    std::printf("  - %s:%s %s %s\n", Str(p["file"]).c_str(), Str(p["param"]).c_str(),
                Str(p["dtype"]).c_str(), Shape(p).c_str());
  }
  for (const auto& p : j["reshaped"]) {
    std::printf("  ~ %s:%s %s %s -> %s %s\n", Str(p["file"]).c_str(), Str(p["param"]).c_str(),
                Str(p["from"]["dtype"]).c_str(), Shape(p["from"]).c_str(),
                Str(p["to"]["dtype"]).c_str(), Shape(p["to"]).c_str());
  }
  for (const auto& p : j["changed"]) {
    std::printf("  * %s:%s  l2 %s  max|d| %s  rel %s  changed %s of %s (%.2f%%)\n",
                Str(p["file"]).c_str(), Str(p["param"]).c_str(), Str(p["l2_diff"]).c_str(),
                Str(p["max_abs_diff"]).c_str(), Str(p["rel_diff"]).c_str(),
                Str(p["elements_changed"]).c_str(), Str(p["numel"]).c_str(),
                p["frac_changed"].get<double>() * 100);
  }
  std::printf("%zu added, %zu removed, %zu reshaped, %zu changed, %s unchanged; read %s\n",
              j["added"].size(), j["removed"].size(), j["reshaped"].size(), j["changed"].size(),
              Str(j["unchanged"]).c_str(), HumanBytes(U(j["bytes_read"])).c_str());
}

void RenderHistory(const json& j) {
  std::printf("%s\n", Str(j["param"]).c_str());
  for (const auto& t : j["tags"]) {
    if (!t["present"].get<bool>()) {
      std::printf("  %-24s (absent)\n", Str(t["tag"]).c_str());
      continue;
    }
    std::printf("  %-24s %-9s %-16s l2 %-14s %s%s\n", Str(t["tag"]).c_str(),
                Str(t["dtype"]).c_str(), Shape(t).c_str(), Str(t["l2_norm"]).c_str(),
                Str(t["digest"]).substr(0, 16).c_str(),
                t["changed"].get<bool>() ? "  changed" : "");
  }
}

namespace {
void PrintYaml(const json& v, int indent) {
  std::string pad(indent, ' ');
  if (v.is_object()) {
    for (const auto& [k, x] : v.items()) {
      if ((x.is_object() || x.is_array()) && !x.empty()) {
        std::printf("%s%s:\n", pad.c_str(), k.c_str());
        PrintYaml(x, indent + 2);
      } else {
        std::printf("%s%s: %s\n", pad.c_str(), k.c_str(), tools::JsonText(x).c_str());
      }
    }
  } else if (v.is_array()) {
    bool flat = std::all_of(v.begin(), v.end(), [](const json& x) { return x.is_primitive(); });
    if (flat) {
      std::printf("%s%s\n", pad.c_str(), tools::JsonText(v).c_str());
      return;
    }
    for (const auto& x : v) {
      std::printf("%s-\n", pad.c_str());
      PrintYaml(x, indent + 2);
    }
  } else {
    std::printf("%s%s\n", pad.c_str(), tools::JsonText(v).c_str());
  }
}
}  // namespace

void RenderMeta(const json& j) {
  for (const auto& f : j["files"]) {
    std::printf("%s/%s  (%s tensors, %s, not shown)\n", Str(j["tag"]).c_str(),
                Str(f["file"]).c_str(), Str(f["tensors"]).c_str(),
                HumanBytes(U(f["logical_bytes"])).c_str());
    PrintYaml(f["state"], 2);
  }
}

void RenderDu(const json& j) {
  std::printf("%-40s %8s %12s %12s %12s %12s\n", ("by " + Str(j["by"])).c_str(), "tensors",
              "logical", "stored", "unique", "shared");
  for (const auto& g : j["groups"]) {
    std::printf("%-40s %8s %12s %12s %12s %12s\n", Str(g["group"]).c_str(),
                Str(g["tensors"]).c_str(), HumanBytes(U(g["logical_bytes"])).c_str(),
                HumanBytes(U(g["stored_bytes"])).c_str(), HumanBytes(U(g["unique_bytes"])).c_str(),
                HumanBytes(U(g["shared_bytes"])).c_str());
  }
  std::printf("%s blocks referenced (%s); %s on disk\n", Str(j["blocks"]).c_str(),
              HumanBytes(U(j["referenced_block_bytes"])).c_str(),
              HumanBytes(U(j["disk_bytes"])).c_str());
}

void RenderVerify(const json& j) {
  for (const auto& p : j["problems"]) {
    std::fprintf(stderr, "problem: tag=%s", Str(p["tag"]).c_str());
    if (!Str(p["file"]).empty()) std::fprintf(stderr, " file=%s", Str(p["file"]).c_str());
    if (!Str(p["param"]).empty()) std::fprintf(stderr, " param=%s", Str(p["param"]).c_str());
    if (!Str(p["digest"]).empty()) std::fprintf(stderr, " block=%s", Str(p["digest"]).c_str());
    std::fprintf(stderr, ": %s\n", Str(p["what"]).c_str());
  }
  std::printf(
      "verified %s tags, %s files, %s tensors, %s blocks (%s): %s\n", Str(j["tags"]).c_str(),
      Str(j["files"]).c_str(), Str(j["tensors"]).c_str(), Str(j["blocks_checked"]).c_str(),
      HumanBytes(U(j["bytes_checked"])).c_str(),
      j["ok"].get<bool>() ? "ok" : (std::to_string(j["problems"].size()) + " problem(s)").c_str());
  if (j.value("repair", false)) {
    std::printf("repair: %s bad block(s) forgotten; the next save of their bytes rewrites them\n",
                Str(j["blocks_forgotten"]).c_str());
  }
  if (j.contains("damaged_tags") && !j["damaged_tags"].empty()) {
    std::string names;
    for (const auto& t : j["damaged_tags"]) names += (names.empty() ? "" : ", ") + Str(t);
    std::printf("damaged tags: %s\n", names.c_str());
  }
}

void RenderExport(const json& j) {
  for (const auto& f : j["files"]) {
    std::printf("wrote %s/%s: %s tensors, %s\n", Str(j["out"]).c_str(), Str(f["file"]).c_str(),
                Str(f["tensors"]).c_str(), HumanBytes(U(f["bytes"])).c_str());
  }
  for (const auto& s : j["skipped"]) {
    std::printf("skipped %s: %s\n", Str(s["name"]).c_str(), Str(s["reason"]).c_str());
  }
  std::printf("%s tensors (%s) exported from %s; index %s; re-read and digest-checked\n",
              Str(j["tensors"]).c_str(), HumanBytes(U(j["total_bytes"])).c_str(),
              Str(j["tag"]).c_str(), Str(j["index"]).c_str());
}

}  // namespace ckptkv::kvb
