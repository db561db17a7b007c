// Catalog queries: tags, tree, show, du, verify.
#include "tools/kv_browser/analysis.h"

#include <algorithm>
#include <map>
#include <regex>
#include <set>
#include <unordered_set>

#include "checkpoint/core/file_names.h"
#include "tools/kv_browser/text.h"

namespace ckptkv::kvb {

Result<bool> ParamFilter::Matches(const TensorEntry& e) const {
  if (!file.empty() && e.file != file) return false;
  if (pattern.empty()) return true;
  if (!regex) return GlobMatch(pattern, e.param);
  try {
    return std::regex_search(e.param, std::regex(pattern));
  } catch (const std::regex_error& err) {
    return Status::InvalidArgument("bad regex '" + pattern + "': " + err.what());
  }
}

json TensorBrief(const TensorEntry& e) {
  return json{{"dtype", DTypeName(e.dtype())},
              {"shape", e.shape()},
              {"numel", e.numel()},
              {"bytes", e.bytes()}};
}

json PlacementJson(const fb::Placement* p) {
  if (p == nullptr) return nullptr;
  json j = json::object();
  auto longs = [](const flatbuffers::Vector<int64_t>* v) {
    return std::vector<int64_t>(v->begin(), v->end());
  };
  if (p->param()) j["param"] = p->param()->str();
  if (p->state()) j["state"] = p->state()->str();
  if (p->global_shape()) j["global_shape"] = longs(p->global_shape());
  if (p->offsets()) j["offsets"] = longs(p->offsets());
  if (p->shard_shape()) j["shard_shape"] = longs(p->shard_shape());
  if (p->shard_dim() >= 0) j["shard_dim"] = p->shard_dim();
  if (p->tp_rank() >= 0) j["tp_rank"] = p->tp_rank();
  if (p->tp_degree() >= 0) j["tp_degree"] = p->tp_degree();
  if (p->flat_group() >= 0) {
    j["flat_group"] = p->flat_group();
    j["flat_offset"] = p->flat_offset();
    j["flat_numel"] = p->flat_numel();
  }
  if (p->segments()) {
    json segs = json::array();
    for (const auto* s : *p->segments()) {
      segs.push_back({{"param", s->param() ? s->param()->str() : ""},
                      {"start", s->start()},
                      {"numel", s->numel()},
                      {"shard_start", s->shard_start()}});
    }
    j["segments"] = std::move(segs);
  }
  return j;
}

namespace {

// The training layout a commit recorded.
json LayoutJson(const Layout& l) {
  return {{"tp", l.tp}, {"pp", l.pp}, {"dp", l.dp}, {"zero_stage", l.zero_stage}};
}

}  // namespace

Result<json> TagsReport(Browser& b) {
  ASSIGN_OR_RETURN(const auto* tags, b.Tags());
  ASSIGN_OR_RETURN(std::string latest, b.Latest());
  json out = json::array();
  for (const TagInfo& t : *tags) {
    ASSIGN_OR_RETURN(TagSpace space, b.SpaceOf(t.tag));
    json j;
    j["tag"] = t.tag;
    j["latest"] = t.tag == latest;
    j["sequence"] = t.sequence;
    j["committed_at"] = FormatTime(t.committed_at_ms);
    j["committed_at_ms"] = t.committed_at_ms;
    j["files"] = t.files.size();
    j["tensors"] = t.tensors;
    j["logical_bytes"] = t.logical_bytes;
    j["new_bytes"] = t.new_bytes;
    j["shared_bytes"] = space.shared_bytes;
    j["unique_bytes"] = space.unique_bytes;
    j["dedup_ratio"] =
        t.new_bytes ? json(static_cast<double>(t.logical_bytes) / t.new_bytes) : json(nullptr);
    j["parent_tag"] = t.parent_tag.empty() ? json(nullptr) : json(t.parent_tag);
    j["new_blocks"] = t.new_blocks;
    j["stored_new_bytes"] = t.stored_new_bytes;
    if (t.layout) j["layout"] = LayoutJson(*t.layout);
    out.push_back(std::move(j));
  }
  return out;
}

namespace {

const char* FileKindName(checkpoint::FileKind k) {
  switch (k) {
    case checkpoint::FileKind::kModelStates:
      return "model_states";
    case checkpoint::FileKind::kZeroModelStates:
      return "zero_model_states";
    case checkpoint::FileKind::kOptimStates:
      return "optim_states";
    case checkpoint::FileKind::kLayer:
      return "layer";
    case checkpoint::FileKind::kExpert:
      return "expert";
    case checkpoint::FileKind::kExpertOptim:
      return "expert_optim";
  }
  return "other";
}

// (pp, tp, dp) of a DeepSpeed file name; null where the name does not say.
json FileCoordinatesJson(const std::string& file, const std::optional<Layout>& layout) {
  std::string base = file.substr(file.rfind('/') == std::string::npos ? 0 : file.rfind('/') + 1);
  json j{{"kind", "other"}, {"pp", nullptr}, {"tp", nullptr}, {"dp", nullptr}};
  auto c = checkpoint::ParseFileName(base);
  if (!c) return j;
  j["kind"] = FileKindName(c->kind);
  if (c->mp_rank >= 0) {
    j["mp_rank"] = c->mp_rank;
    int tp_degree = layout && layout->tp > 0 ? layout->tp : 0;
    if (tp_degree > 0) {
      j["pp"] = checkpoint::PpOfMp(c->mp_rank, tp_degree);
      j["tp"] = checkpoint::TpOfMp(c->mp_rank, tp_degree);
    } else if (!layout || layout->pp <= 1) {
      j["pp"] = 0;  // no pipeline: the MP rank is the TP rank
      j["tp"] = c->mp_rank;
    }
  }
  if (c->tp_rank >= 0) j["tp"] = c->tp_rank;
  if (c->dp_rank >= 0) j["dp"] = c->dp_rank;
  if (c->layer >= 0) j["layer"] = c->layer;
  if (c->expert >= 0) j["expert"] = c->expert;
  return j;
}

}  // namespace

Result<json> TreeReport(Browser& b, const std::string& tag, const ParamFilter& filter) {
  ASSIGN_OR_RETURN(const TagContents* c, b.Contents(tag));
  json files = json::array();
  for (const auto& f : c->info.files) {
    json fj{{"file", f}, {"coordinates", FileCoordinatesJson(f, c->info.layout)}};
    json params = json::array();
    uint64_t bytes = 0;
    for (const auto& e : c->tensors) {
      if (e.file != f) continue;
      ASSIGN_OR_RETURN(bool m, filter.Matches(e));
      if (!m) continue;
      json p{{"param", e.param}};
      p.update(TensorBrief(e));
      params.push_back(std::move(p));
      bytes += e.bytes();
    }
    if (params.empty() && !filter.pattern.empty()) continue;
    fj["tensors"] = params.size();
    fj["bytes"] = bytes;
    fj["params"] = std::move(params);
    files.push_back(std::move(fj));
  }
  json out{{"tag", tag}, {"files", std::move(files)}};
  if (c->info.layout) out["layout"] = LayoutJson(*c->info.layout);
  return out;
}

Result<json> ShowReport(Browser& b, const std::string& tag, const std::string& file,
                        const std::string& param) {
  ASSIGN_OR_RETURN(const TensorEntry* e, b.FindParam(tag, file, param));
  json out{{"tag", tag}, {"file", e->file}, {"param", e->param}};
  out.update(TensorBrief(*e));
  out["requires_grad"] = e->rec().requires_grad();
  out["digest"] = e->digest().Hex();
  out["inline"] = e->is_inline();
  out["chunk_size"] = e->rec().chunk_size();
  out["placement"] = PlacementJson(e->rec().placement());
  json chunks = json::array();
  for (size_t i = 0; i < e->num_chunks(); ++i) {
    std::vector<std::string> others;
    for (auto& t : b.TagsOf(e->chunk(i))) {
      if (t != tag) others.push_back(t);
    }
    chunks.push_back({{"index", i},
                      {"offset", e->chunk_offset(i)},
                      {"length", e->chunk_length(i)},
                      {"digest", e->chunk(i).Hex()},
                      {"shared_with", others}});
  }
  out["chunks"] = std::move(chunks);
  return out;
}

Result<json> DuReport(Browser& b, const std::string& by, int depth) {
  if (by != "tag" && by != "file" && by != "param-prefix") {
    return Status::InvalidArgument("--by must be tag, file or param-prefix, not '" + by + "'");
  }
  ASSIGN_OR_RETURN(const auto* tags, b.Tags());
  ASSIGN_OR_RETURN(const BlockMap* blocks, b.Blocks());
  auto group_of = [&](const std::string& tag, const TensorEntry& e) {
    if (by == "tag") return tag;
    if (by == "file") return e.file;
    size_t pos = 0;
    for (int d = 0; d < depth; ++d) {
      size_t next = e.param.find_first_of("/.", pos);
      if (next == std::string::npos) return e.param;
      pos = next + 1;
    }
    return e.param.substr(0, pos - 1);
  };
  struct Group {
    uint64_t logical = 0, inline_bytes = 0, tensors = 0;
    std::unordered_set<Digest, DigestHash> blocks;
  };
  std::map<std::string, Group> groups;
  std::unordered_map<Digest, std::set<std::string>, DigestHash> owners;
  for (const auto& t : *tags) {
    ASSIGN_OR_RETURN(const TagContents* c, b.Contents(t.tag));
    for (const auto& e : c->tensors) {
      Group& g = groups[group_of(t.tag, e)];
      g.logical += e.bytes();
      g.tensors++;
      if (e.is_inline()) g.inline_bytes += e.bytes();
      for (size_t i = 0; i < e.num_chunks(); ++i) {
        Digest d = e.chunk(i);
        if (g.blocks.insert(d).second) owners[d].insert(group_of(t.tag, e));
      }
    }
  }
  json rows = json::array();
  for (const auto& [name, g] : groups) {
    uint64_t unique = g.inline_bytes, shared = 0;
    for (const Digest& d : g.blocks) {
      (owners[d].size() > 1 ? shared : unique) += blocks->at(d).length;
    }
    rows.push_back({{"group", name},
                    {"tensors", g.tensors},
                    {"logical_bytes", g.logical},
                    {"stored_bytes", unique + shared},
                    {"unique_bytes", unique},
                    {"shared_bytes", shared}});
  }
  uint64_t referenced = 0;
  for (const auto& [d, u] : *blocks) referenced += u.length;
  json out{{"by", by}, {"groups", std::move(rows)}};
  out["referenced_block_bytes"] = referenced;
  out["blocks"] = blocks->size();
  out["disk_bytes"] = b.store().DiskBytes();
  return out;
}

json VerifyReportJson(const VerifyReport& r) {
  json problems = json::array();
  for (const auto& p : r.problems) {
    problems.push_back({{"tag", p.tag},
                        {"file", p.file},
                        {"param", p.param},
                        {"digest", p.digest},
                        {"what", p.what}});
  }
  return json{
      {"ok", r.ok()},
      {"tags", r.tags},
      {"files", r.files},
      {"tensors", r.tensors},
      {"blocks_checked", r.blocks_checked},
      {"bytes_checked", r.bytes_checked},
      {"problems", std::move(problems)},
      {"damaged_tags", std::vector<std::string>(r.damaged_tags.begin(), r.damaged_tags.end())},
      {"blocks_forgotten", r.blocks_forgotten}};
}

Result<json> VerifyStore(const Store& store, const std::optional<std::string>& tag, bool repair) {
  uint64_t total = 0;
  ASSIGN_OR_RETURN(auto tags, store.ListTags());
  for (const auto& t : tags) {
    if (!tag || t.tag == *tag) total += t.logical_bytes;
  }
  Progress progress(repair ? "verify --repair" : "verify", total);
  VerifyOptions o;
  o.tag = tag;
  o.repair = repair;
  o.progress = [&progress](uint64_t n) { progress.Add(n); };
  ASSIGN_OR_RETURN(VerifyReport r, store.Verify(o));
  progress.Done();
  json out = VerifyReportJson(r);
  out["repair"] = repair;
  return out;
}

Result<json> VerifyTags(Browser& b, const std::vector<std::string>& only) {
  if (only.size() > 1) return Status::InvalidArgument("verify takes one tag or all");
  return VerifyStore(b.store(), only.empty() ? std::nullopt : std::optional(only[0]), false);
}

}  // namespace ckptkv::kvb
