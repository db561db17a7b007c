#include "tools/kv_browser/browser_core.h"

#include <algorithm>
#include <filesystem>
#include <set>

#include "store/size_math.h"
#include "tools/kv_browser/text.h"

namespace fs = std::filesystem;

namespace ckptkv::kvb {

std::vector<int64_t> TensorEntry::shape() const {
  std::vector<int64_t> out;
  if (rec().shape()) out.assign(rec().shape()->begin(), rec().shape()->end());
  return out;
}

uint64_t TensorEntry::numel() const {
  // The store's record checks guarantee it fits; 0 if it ever did not.
  if (!rec().shape()) return 1;
  return static_cast<uint64_t>(CheckedNumel(*rec().shape()).value_or(0));
}

size_t TensorEntry::num_chunks() const {
  return rec().chunks() && !is_inline() ? rec().chunks()->size() : 0;
}

Digest TensorEntry::chunk(size_t i) const {
  const fb::Digest128* d = rec().chunks()->Get(static_cast<flatbuffers::uoffset_t>(i));
  return Digest{d->lo(), d->hi()};
}

uint64_t TensorEntry::chunk_length(size_t i) const {
  return std::min<uint64_t>(rec().chunk_size(), bytes() - chunk_offset(i));
}

Digest TensorEntry::digest() const {
  return rec().digest() ? Digest{rec().digest()->lo(), rec().digest()->hi()} : Digest{};
}

Result<std::unique_ptr<Browser>> Browser::Open(const std::string& dir, Mode mode) {
  std::error_code ec;
  if (dir.empty()) return Status::InvalidArgument("--db is empty; give the store directory");
  if (!fs::exists(dir, ec)) return Status::NotFound("store '" + dir + "' does not exist");
  if (!fs::is_directory(dir, ec)) {
    return Status::InvalidArgument("'" + dir + "' is not a directory, so not a ckptkv store");
  }
  if (fs::is_empty(dir, ec)) {
    return Status::NotFound("'" + dir + "' is an empty directory, not a ckptkv store");
  }
  std::unique_ptr<Browser> b(new Browser(dir, mode));
  RETURN_IF_ERROR(b->OpenStore());
  return b;
}

std::unique_ptr<Browser> Browser::Adopt(std::unique_ptr<Store> store, Mode mode) {
  std::unique_ptr<Browser> b(new Browser(store->dir(), mode));
  b->store_ = std::move(store);
  return b;
}

Status Browser::OpenStore() {
  store_.reset();
  StoreOptions o;
  o.create_if_missing = false;
  o.read_only = mode_ == Mode::kReadOnly;
  o.threads = 2;
  auto s = Store::Open(dir_, o);
  if (!s.ok()) {
    if (s.status().IsBusy()) {
      return Status::Busy(s.status().message() +
                          "; the store is changed only when no other process holds it");
    }
    return s.status();
  }
  store_ = std::move(s).value();
  return Status::OK();
}

void Browser::ClearCaches() {
  tags_.reset();
  contents_.clear();
  blocks_.reset();
}

Status Browser::Refresh() {
  ClearCaches();
  return OpenStore();
}

Result<const std::vector<TagInfo>*> Browser::Tags() {
  if (!tags_) {
    ASSIGN_OR_RETURN(auto tags, store_->ListTags());
    tags_ = std::move(tags);
  }
  return &*tags_;
}

Result<std::string> Browser::Latest() {
  ASSIGN_OR_RETURN(auto latest, store_->Latest());
  return latest.value_or("");
}

Result<std::string> Browser::ResolveTag(const std::string& name) {
  ASSIGN_OR_RETURN(const auto* tags, Tags());
  if (name == "latest") {
    ASSIGN_OR_RETURN(std::string latest, Latest());
    if (latest.empty()) return Status::NotFound("store '" + dir_ + "' has no latest tag");
    return latest;
  }
  std::vector<std::string> names;
  for (const auto& t : *tags) {
    if (t.tag == name) return name;
    names.push_back(t.tag);
  }
  if (names.empty()) return Status::NotFound("store '" + dir_ + "' has no committed tags");
  return Status::NotFound("tag '" + name + "' does not exist in store '" + dir_ + "'" +
                          ClosestSuffix(name, names));
}

Result<const TagContents*> Browser::Contents(const std::string& tag) {
  auto it = contents_.find(tag);
  if (it != contents_.end()) return it->second.get();
  auto c = std::make_unique<TagContents>();
  // The commit record as listed: a stored tag name is not validated again
  // (one that is not UTF-8, written around the API, must still browse).
  ASSIGN_OR_RETURN(const auto* tags, Tags());
  auto listed =
      std::find_if(tags->begin(), tags->end(), [&](const TagInfo& t) { return t.tag == tag; });
  if (listed != tags->end()) {
    c->info = *listed;
  } else {
    ASSIGN_OR_RETURN(c->info, store_->GetTag(tag));
  }
  for (const auto& file : c->info.files) {
    ASSIGN_OR_RETURN(auto params, store_->ListParams(tag, file));
    for (const auto& p : params) {
      ASSIGN_OR_RETURN(auto rec, store_->GetTensorRecord(tag, file, p));
      c->tensors.push_back(TensorEntry{file, p, std::move(rec)});
    }
  }
  const TagContents* out = c.get();
  contents_[tag] = std::move(c);
  return out;
}

Result<const TensorEntry*> Browser::FindParam(const std::string& tag, const std::string& file,
                                              const std::string& param) {
  ASSIGN_OR_RETURN(const TagContents* c, Contents(tag));
  if (!file.empty() &&
      std::find(c->info.files.begin(), c->info.files.end(), file) == c->info.files.end()) {
    return Status::NotFound("file '" + file + "' does not exist in tag '" + tag + "'" +
                            ClosestSuffix(file, c->info.files));
  }
  std::vector<const TensorEntry*> hits;
  std::set<std::string> names;
  for (const auto& e : c->tensors) {
    if (!file.empty() && e.file != file) continue;
    if (e.param == param) hits.push_back(&e);
    names.insert(e.param);
  }
  if (hits.size() == 1) return hits[0];
  if (hits.size() > 1) {
    std::string files;
    for (const auto* h : hits) files += (files.empty() ? "" : ", ") + h->file;
    return Status::InvalidArgument("parameter '" + param + "' is in several files of tag '" + tag +
                                   "' (" + files + "); choose one with --file");
  }
  return Status::NotFound("parameter '" + param + "' does not exist in tag '" + tag + "'" +
                          (file.empty() ? "" : " file '" + file + "'") +
                          ClosestSuffix(param, {names.begin(), names.end()}));
}

Result<const BlockMap*> Browser::Blocks() {
  if (blocks_) return &*blocks_;
  ASSIGN_OR_RETURN(const auto* tags, Tags());
  BlockMap map;
  for (uint32_t ti = 0; ti < tags->size(); ++ti) {
    ASSIGN_OR_RETURN(const TagContents* c, Contents((*tags)[ti].tag));
    for (const auto& e : c->tensors) {
      for (size_t i = 0; i < e.num_chunks(); ++i) {
        BlockUse& u = map[e.chunk(i)];
        u.length = e.chunk_length(i);
        if (u.tags.empty() || u.tags.back() != ti) u.tags.push_back(ti);
      }
    }
  }
  blocks_ = std::move(map);
  return &*blocks_;
}

Result<TagSpace> Browser::SpaceOf(const std::string& tag) {
  ASSIGN_OR_RETURN(const BlockMap* blocks, Blocks());
  ASSIGN_OR_RETURN(const TagContents* c, Contents(tag));
  TagSpace s;
  std::unordered_map<Digest, bool, DigestHash> seen;
  for (const auto& e : c->tensors) {
    if (e.is_inline()) {
      s.unique_bytes += e.bytes();
      continue;
    }
    for (size_t i = 0; i < e.num_chunks(); ++i) {
      Digest d = e.chunk(i);
      if (!seen.emplace(d, true).second) continue;
      const BlockUse& u = blocks->at(d);
      s.blocks++;
      (u.tags.size() > 1 ? s.shared_bytes : s.unique_bytes) += u.length;
    }
  }
  return s;
}

std::vector<std::string> Browser::TagsOf(const Digest& d) {
  std::vector<std::string> out;
  auto blocks = Blocks();
  auto tags = Tags();
  if (!blocks.ok() || !tags.ok()) return out;
  auto it = (*blocks)->find(d);
  if (it == (*blocks)->end()) return out;
  for (uint32_t t : it->second.tags) out.push_back((**tags)[t].tag);
  return out;
}

Status Browser::Read(const TensorEntry& e, uint64_t offset, uint64_t len, uint8_t* dst) {
  return store_->ReadTensorRange(e.rec(), offset, len, dst, e.where());
}

}  // namespace ckptkv::kvb
