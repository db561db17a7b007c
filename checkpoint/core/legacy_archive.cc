#include "checkpoint/core/legacy_archive.h"
#include "checkpoint/core/read_file.h"

#include <unistd.h>

#include <algorithm>
#include <set>

namespace ckptkv::checkpoint {
namespace {

using pickle::Kind;
using pickle::Value;

// 0x1950a86a20f9469cfc6c, as LONG1 pickles it (10 little-endian bytes),
// and in decimal as the machine gives it.
constexpr char kMagicBytes[] = "\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";
constexpr const char* kMagicDigits = "119547037146038801333356";
constexpr int64_t kProtocolVersion = 1001;
constexpr uint64_t kSmallPickle = uint64_t{1} << 20;  // magic, version, sys_info
constexpr uint64_t kFirstWindow = uint64_t{64} << 10;

struct Named {
  std::string type;  // the storage class's name; "" when not of module torch
  uint64_t numel = 0;
  uint64_t offset = 0;  // of the first id naming it
};

}  // namespace

uint64_t TorchStorageItemSize(std::string_view name) {
  static const std::pair<const char*, uint64_t> kSizes[] = {
      {"FloatStorage", 4},    {"DoubleStorage", 8},       {"HalfStorage", 2},
      {"BFloat16Storage", 2}, {"LongStorage", 8},         {"IntStorage", 4},
      {"ShortStorage", 2},    {"CharStorage", 1},         {"ByteStorage", 1},
      {"BoolStorage", 1},     {"ComplexFloatStorage", 8}, {"ComplexDoubleStorage", 16},
  };
  for (const auto& [n, size] : kSizes) {
    if (name == n) return size;
  }
  return 0;
}

bool LegacyArchive::LooksLegacy(std::string_view head) {
  if (head.size() < 2 || static_cast<uint8_t>(head[0]) != 0x80) return false;
  const auto proto = static_cast<uint8_t>(head[1]);
  if (proto < 2 || proto > 5) return false;
  size_t at = 2;
  if (head.size() > at && static_cast<uint8_t>(head[at]) == 0x95) at += 9;  // FRAME
  const std::string_view magic(kMagicBytes, sizeof kMagicBytes - 1);
  return head.size() >= at + magic.size() && head.substr(at, magic.size()) == magic;
}

Result<std::unique_ptr<LegacyArchive>> LegacyArchive::Open(const std::string& path,
                                                           uint64_t max_pickle_bytes) {
  ASSIGN_OR_RETURN(OpenFile f, OpenRegularFile(path));
  std::unique_ptr<LegacyArchive> a(new LegacyArchive(path, f.fd, f.size));
  RETURN_IF_ERROR(a->Load(max_pickle_bytes));
  return a;
}

LegacyArchive::~LegacyArchive() { ::close(fd_); }

Status LegacyArchive::Bad(uint64_t at, const std::string& what) const {
  return Status::Corruption("'" + path_ + "': legacy torch.save file at byte " +
                            std::to_string(at) + ": " + what);
}

Status LegacyArchive::ReadAt(uint64_t offset, uint64_t len, uint8_t* dst) const {
  if (offset > size_ || len > size_ - offset) {
    return Bad(offset, "reads " + std::to_string(len) + " bytes past the end of the file (" +
                           std::to_string(size_) + " bytes)");
  }
  bool ended = false;
  RETURN_IF_ERROR(ReadFully(fd_, path_, offset, len, dst, &ended));
  return ended ? Bad(offset, "the file ended early") : Status::OK();
}

Result<std::unique_ptr<pickle::Tree>> LegacyArchive::ReadPickle(uint64_t* pos, uint64_t max_bytes,
                                                                const std::string& what) const {
  const uint64_t rest = size_ - std::min(size_, *pos);
  const uint64_t limit = std::min(rest, max_bytes);
  const std::string where = path_ + " (" + what + ")";
  uint64_t window = std::min(limit, kFirstWindow);
  std::string buf;
  while (true) {
    buf.resize(window);
    RETURN_IF_ERROR(ReadAt(*pos, window, reinterpret_cast<uint8_t*>(buf.data())));
    uint64_t needed = 0;
    uint64_t consumed = 0;
    pickle::ParseOptions options;
    options.base = *pos;
    options.needed = &needed;
    auto tree = pickle::Parse(buf, where, pickle::Limits::ForSize(window), &consumed, options);
    if (tree.ok()) {
      *pos += consumed;
      return tree;
    }
    // More of the file helps only when the pickle ran past the window and
    // what it needs lies within the file (and the limit).
    if (needed == 0 || window >= limit || needed > rest) return tree.status();
    if (needed > limit) {
      return Status::ResourceExhausted(where + ": a pickle of more than " +
                                       std::to_string(max_bytes) + " bytes is not read");
    }
    window = std::min(limit, std::max(needed, window > limit / 2 ? limit : window * 2));
  }
}

Status LegacyArchive::Load(uint64_t max_pickle_bytes) {
  {
    std::string head(std::min<uint64_t>(size_, 32), '\0');
    RETURN_IF_ERROR(ReadAt(0, head.size(), reinterpret_cast<uint8_t*>(head.data())));
    if (!LooksLegacy(head)) {
      return Bad(0, "no pickled magic number 0x1950a86a20f9469cfc6c: not a legacy torch.save file");
    }
  }
  uint64_t pos = 0;
  ASSIGN_OR_RETURN(auto magic, ReadPickle(&pos, kSmallPickle, "the magic number"));
  if (magic->root()->kind != Kind::kBigInt || magic->root()->text != kMagicDigits) {
    return Bad(0, "no pickled magic number 0x1950a86a20f9469cfc6c: not a legacy torch.save file");
  }
  const uint64_t version_at = pos;
  ASSIGN_OR_RETURN(auto version, ReadPickle(&pos, kSmallPickle, "the protocol version"));
  if (version->root()->kind != Kind::kInt || version->root()->i != kProtocolVersion) {
    return Bad(version_at, "a protocol version that is not " + std::to_string(kProtocolVersion));
  }
  const uint64_t info_at = pos;
  ASSIGN_OR_RETURN(auto info, ReadPickle(&pos, kSmallPickle, "sys_info"));
  const Value* sys = info->root();
  if (sys->kind != Kind::kDict) return Bad(info_at, "sys_info is not a dict");
  for (size_t i = 0; i + 1 < sys->items.size(); i += 2) {
    const Value* k = sys->items[i];
    const Value* v = sys->items[i + 1];
    if (k->kind == Kind::kString && k->text == "little_endian" &&
        (v->kind != Kind::kBool || !v->b)) {
      return Status::NotSupported("'" + path_ + "': a legacy torch.save file written on a " +
                                  "big-endian machine (sys_info at byte " +
                                  std::to_string(info_at) + "), which is not read");
    }
  }

  pickle_offset_ = pos;
  ASSIGN_OR_RETURN(tree_, ReadPickle(&pos, max_pickle_bytes, "the saved object"));
  pickle_size_ = pos - pickle_offset_;
  // The storages the ids name, and the one type and size of each.
  std::map<std::string, Named> named;
  for (uint64_t i = 0; i < tree_->nodes(); ++i) {
    const Value* pid = tree_->node(i);
    if (pid->kind != Kind::kPersistentId || pid->items.empty()) continue;
    const Value* id = pid->items[0];
    if (id->kind != Kind::kTuple || id->items.size() != 6) continue;
    const auto& p = id->items;
    if (p[0]->kind != Kind::kString || p[0]->text != "storage" || p[1]->kind != Kind::kGlobal ||
        p[2]->kind != Kind::kString || p[4]->kind != Kind::kInt || p[4]->i < 0) {
      continue;  // not a storage id: its reader refuses it
    }
    Named n;
    n.type = p[1]->text == "torch" ? p[1]->name : "";
    n.numel = static_cast<uint64_t>(p[4]->i);
    n.offset = pid->offset;
    auto [it, fresh] = named.emplace(p[2]->text, n);
    if (!fresh && (it->second.type != n.type || it->second.numel != n.numel)) {
      return Bad(pid->offset, "storage " + p[2]->text + " is named as " + std::to_string(n.numel) +
                                  " of " + pickle::QualifiedName(p[1]) + " and, at byte " +
                                  std::to_string(it->second.offset) + ", as " +
                                  std::to_string(it->second.numel) + " of torch." +
                                  it->second.type);
    }
  }

  const uint64_t list_at = pos;
  ASSIGN_OR_RETURN(auto list_tree, ReadPickle(&pos, max_pickle_bytes, "the storage list"));
  const Value* list = list_tree->root();
  if (list->kind != Kind::kList) return Bad(list_at, "the storage list is not a list");
  std::set<std::string> listed;
  for (const Value* k : list->items) {
    if (k->kind != Kind::kString) return Bad(k->offset, "a storage key that is not a str");
    if (!listed.insert(k->text).second) {
      return Bad(k->offset, "the storage list names " + k->text + " twice");
    }
    auto it = named.find(k->text);
    if (it == named.end()) {
      return Bad(k->offset,
                 "the storage list names " + k->text + ", which no storage id of the pickle names");
    }
  }
  for (const auto& [key, n] : named) {
    if (listed.count(key) == 0) {
      return Bad(n.offset, "storage " + key + " is not in the storage list at byte " +
                               std::to_string(list_at));
    }
  }
  storages_.reserve(list->items.size());
  for (const Value* k : list->items) {
    const Named& n = named.at(k->text);
    LegacyStorage s;
    s.key = k->text;
    s.type = n.type;
    s.itemsize = TorchStorageItemSize(n.type);
    if (s.itemsize == 0) {
      return Status::NotSupported("'" + path_ + "': storage " + s.key + " (named at byte " +
                                  std::to_string(n.offset) + ") is of a storage type that is " +
                                  "not read (the readers know torch's 12 typed storages)");
    }
    if (size_ - pos < 8) {
      return Bad(pos, "the file ends before the element count of storage " + s.key);
    }
    uint8_t count[8];
    RETURN_IF_ERROR(ReadAt(pos, 8, count));
    uint64_t c = 0;
    for (int i = 7; i >= 0; --i) c = (c << 8) | count[i];
    if (c != n.numel) {
      return Bad(pos, "storage " + s.key + " holds " + std::to_string(c) +
                          " elements; its id at byte " + std::to_string(n.offset) + " says " +
                          std::to_string(n.numel));
    }
    s.numel = c;
    s.data_offset = pos + 8;
    if (__builtin_mul_overflow(c, s.itemsize, &s.size) || s.size > size_ - s.data_offset) {
      return Bad(pos, "storage " + s.key + " of " + std::to_string(c) + " elements of " +
                          std::to_string(s.itemsize) + " bytes runs past the end of the file (" +
                          std::to_string(size_) + " bytes)");
    }
    pos = s.data_offset + s.size;
    by_key_.emplace(s.key, storages_.size());
    storages_.push_back(std::move(s));
  }
  return Status::OK();
}

const LegacyStorage* LegacyArchive::Find(const std::string& key) const {
  auto it = by_key_.find(key);
  return it == by_key_.end() ? nullptr : &storages_[it->second];
}

Status LegacyArchive::ReadRange(const LegacyStorage& s, uint64_t offset, uint64_t len,
                                uint8_t* dst) const {
  if (offset > s.size || len > s.size - offset) {
    return Bad(s.data_offset, "a read of [" + std::to_string(offset) + ", +" + std::to_string(len) +
                                  ") of storage " + s.key + " (" + std::to_string(s.size) +
                                  " bytes)");
  }
  return ReadAt(s.data_offset + offset, len, dst);
}

}  // namespace ckptkv::checkpoint
