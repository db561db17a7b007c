#include "tools/kv_browser/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <set>

#include "checkpoint/core/zip_writer.h"
#include "store/names.h"
#include "store/size_math.h"
#include "tools/json_text.h"
#include "tools/kv_browser/text.h"

namespace fs = std::filesystem;

namespace ckptkv::kvb {

const char* SafetensorsDType(fb::DType dtype) {
  switch (dtype) {
    case fb::DType::Bool:
      return "BOOL";
    case fb::DType::UInt8:
      return "U8";
    case fb::DType::Int8:
      return "I8";
    case fb::DType::Int16:
      return "I16";
    case fb::DType::Int32:
      return "I32";
    case fb::DType::Int64:
      return "I64";
    case fb::DType::Float16:
      return "F16";
    case fb::DType::BFloat16:
      return "BF16";
    case fb::DType::Float32:
      return "F32";
    case fb::DType::Float64:
      return "F64";
    default:
      return nullptr;
  }
}

uint64_t SafetensorsDTypeSize(const std::string& dtype) {
  static const std::pair<const char*, uint64_t> kSizes[] = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"I64", 8}, {"U64", 8},     {"F64", 8}};
  for (const auto& [name, size] : kSizes) {
    if (dtype == name) return size;
  }
  return 0;
}

Status ParseSafetensorsHeader(std::string_view header, uint64_t data_bytes,
                              std::vector<SafetensorsTensor>* tensors) {
  auto bad = [](const std::string& what) {
    return Status::Corruption("safetensors header: " + what);
  };
  tensors->clear();
  if (header.size() > kMaxSafetensorsHeader) {
    return bad("is " + std::to_string(header.size()) + " bytes; at most " +
               std::to_string(kMaxSafetensorsHeader) + " are allowed");
  }
  if (header.empty() || header[0] != '{') return bad("does not start with '{'");
  size_t end = header.find_last_not_of(' ');
  if (header[end] != '}') return bad("does not end with '}' (only spaces may pad it)");
  // Duplicate names are not allowed; nlohmann::json would keep the last.
  std::set<std::string> keys;
  std::string duplicate;
  auto note_keys = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (depth == 1 && event == nlohmann::json::parse_event_t::key &&
        !keys.insert(parsed.get<std::string>()).second && duplicate.empty()) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  nlohmann::json h;
  try {
    h = nlohmann::json::parse(header.substr(0, end + 1), note_keys);
  } catch (const nlohmann::json::exception& e) {
    return bad(std::string("is not valid JSON: ") + e.what());
  }
  if (!h.is_object()) return bad("is not a JSON object");
  if (!duplicate.empty()) return bad("names " + Quote(duplicate) + " twice");
  for (const auto& [name, v] : h.items()) {
    if (name == "__metadata__") {
      if (!v.is_object()) return bad("__metadata__ is not an object");
      for (const auto& [k, m] : v.items()) {
        if (!m.is_string()) return bad("__metadata__ value " + Quote(k) + " is not a string");
      }
      continue;
    }
    const std::string where = "tensor " + Quote(name);
    if (!v.is_object() || v.size() != 3 || !v.contains("dtype") || !v.contains("shape") ||
        !v.contains("data_offsets")) {
      return bad(where + " is not an object of exactly dtype, shape and data_offsets");
    }
    SafetensorsTensor t;
    t.name = name;
    if (!v["dtype"].is_string()) return bad(where + ": dtype is not a string");
    t.dtype = v["dtype"].get<std::string>();
    const uint64_t es = SafetensorsDTypeSize(t.dtype);
    if (es == 0) return bad(where + ": dtype " + Quote(t.dtype) + " is not a safetensors dtype");
    if (!v["shape"].is_array()) return bad(where + ": shape is not an array");
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) return bad(where + ": shape holds a non-integer or negative");
      const uint64_t u = d.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return bad(where + ": a dimension is too large");
      }
      t.shape.push_back(static_cast<int64_t>(u));
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned()) {
      return bad(where + ": data_offsets is not two unsigned integers");
    }
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    auto bytes = CheckedByteLength(t.shape, es);
    if (t.end < t.begin || !bytes || *bytes != t.end - t.begin) {
      return bad(where + ": data_offsets [" + std::to_string(t.begin) + ", " +
                 std::to_string(t.end) + "] do not hold shape " + ShapeString(t.shape) + " of " +
                 t.dtype);
    }
    tensors->push_back(std::move(t));
  }
  // The tensors tile the data buffer: in offset order, each starts where the
  // previous ended, from 0 to its end, so none overlaps or lies outside.
  std::stable_sort(tensors->begin(), tensors->end(),
                   [](const auto& a, const auto& b) { return a.begin < b.begin; });
  uint64_t at = 0;
  for (const auto* t = tensors->data(); t != tensors->data() + tensors->size(); ++t) {
    if (t->begin != at) {
      return bad("tensor " + Quote(t->name) + " starts at " + std::to_string(t->begin) +
                 "; expected " + std::to_string(at) + " (tensors must be contiguous)");
    }
    at = t->end;
  }
  if (at != data_bytes) {
    return bad("tensors cover " + std::to_string(at) + " bytes of the " +
               std::to_string(data_bytes) + "-byte data buffer");
  }
  return Status::OK();
}

namespace {

struct Item {
  std::string name;
  const TensorEntry* entry;
};

// An open file descriptor, closed on scope exit.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

Status ReadAll(int fd, uint8_t* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t r = ::read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return Status::Corruption("re-reading '" + path + "': file is short");
    p += r;
    n -= static_cast<size_t>(r);
  }
  return Status::OK();
}

// `name` if it is UTF-8, else quoted with its bad bytes escaped.
std::string ShownName(const std::string& name) {
  return InvalidUtf8Offset(name) == std::string_view::npos ? name : Quote(name);
}

std::string HeaderFor(const std::vector<Item>& items, const std::string& tag) {
  json h = json::object();
  uint64_t off = 0;
  for (const auto& it : items) {
    h[it.name] = {{"dtype", SafetensorsDType(it.entry->dtype())},
                  {"shape", it.entry->shape()},
                  {"data_offsets", {off, off + it.entry->bytes()}}};
    off += it.entry->bytes();
  }
  // Names are UTF-8 (checked when selected); a stored tag need not be.
  h["__metadata__"] = {{"format", "pt"}, {"ckptkv_tag", ShownName(tag)}};
  std::string s = tools::JsonText(h);
  s.resize((s.size() + 7) / 8 * 8, ' ');  // data starts 8-byte aligned
  return s;
}

// Writes `bytes` (or, with `items`, the tensors' bytes after `bytes`) to
// the temporary file and syncs it (export's own files, checkpoint/core/
// zip_writer.h: nothing outside the directory, removed unless renamed).
Status WriteTemp(Browser* b, checkpoint::TempFile* f, const std::string& bytes,
                 const std::vector<Item>& items, Progress* progress) {
  RETURN_IF_ERROR(f->Write(bytes.data(), bytes.size()));
  std::vector<uint8_t> buf;
  const uint64_t window = 4u << 20;
  for (const auto& it : items) {
    const TensorEntry& e = *it.entry;
    for (uint64_t off = 0; off < e.bytes(); off += window) {
      uint64_t n = std::min(window, e.bytes() - off);
      buf.resize(n);
      RETURN_IF_ERROR(b->Read(e, off, n, buf.data()));
      RETURN_IF_ERROR(f->Write(buf.data(), n));
      if (progress) progress->Add(n);
    }
  }
  return f->SyncAndClose();
}

// Re-reads a written shard: its header must be valid safetensors and
// describe exactly `items`, in order, and every tensor's bytes must match
// the digests of its stored chunks (or of its inline bytes).
Status CheckShard(const std::string& tmp, const std::string& name, const std::vector<Item>& items) {
  Fd f;
  f.fd = ::open(tmp.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (f.fd < 0) return Status::IOError("re-opening '" + tmp + "': " + std::strerror(errno));
  struct stat st;
  if (::fstat(f.fd, &st) != 0)
    return Status::IOError("stat '" + tmp + "': " + std::strerror(errno));
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  uint8_t len[8];
  RETURN_IF_ERROR(ReadAll(f.fd, len, 8, name));
  uint64_t hlen = 0;
  for (int i = 0; i < 8; ++i) hlen |= static_cast<uint64_t>(len[i]) << (8 * i);
  if (hlen > kMaxSafetensorsHeader || hlen > size - 8) {
    return Status::Corruption("'" + name + "': header length " + std::to_string(hlen) +
                              " does not fit the file");
  }
  std::string h(hlen, '\0');
  RETURN_IF_ERROR(ReadAll(f.fd, reinterpret_cast<uint8_t*>(h.data()), hlen, name));
  std::vector<SafetensorsTensor> parsed;
  Status valid = ParseSafetensorsHeader(h, size - 8 - hlen, &parsed);
  if (!valid.ok()) return valid.WithContext("'" + name + "'");
  if (parsed.size() != items.size()) {
    return Status::Corruption("'" + name + "': header lists " + std::to_string(parsed.size()) +
                              " tensors; " + std::to_string(items.size()) + " were written");
  }
  uint64_t off = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const TensorEntry& e = *items[i].entry;
    const SafetensorsTensor& t = parsed[i];
    if (t.name != items[i].name || t.dtype != SafetensorsDType(e.dtype()) || t.shape != e.shape() ||
        t.begin != off || t.end != off + e.bytes()) {
      return Status::Corruption("'" + name + "': header entry " + Quote(t.name) +
                                " differs from tensor " + Quote(items[i].name));
    }
    off = t.end;
  }
  std::vector<uint8_t> buf;
  for (const auto& it : items) {
    const TensorEntry& e = *it.entry;
    if (e.is_inline()) {
      buf.resize(e.bytes());
      RETURN_IF_ERROR(ReadAll(f.fd, buf.data(), buf.size(), name));
      if (Digest::Of(buf.data(), buf.size()) != e.digest()) {
        return Status::Corruption("'" + name + "': tensor " + Quote(it.name) +
                                  " does not match its stored digest");
      }
      continue;
    }
    for (size_t i = 0; i < e.num_chunks(); ++i) {
      buf.resize(e.chunk_length(i));
      RETURN_IF_ERROR(ReadAll(f.fd, buf.data(), buf.size(), name));
      if (Digest::Of(buf.data(), buf.size()) != e.chunk(i)) {
        return Status::Corruption("'" + name + "': tensor " + Quote(it.name) + " chunk " +
                                  std::to_string(i) + " does not match its stored digest");
      }
    }
  }
  return Status::OK();
}

// Re-reads the index: valid JSON whose weight_map is `weight_map`.
Status CheckIndex(const std::string& tmp, const std::string& name, const json& weight_map) {
  Fd f;
  f.fd = ::open(tmp.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (f.fd < 0) return Status::IOError("re-opening '" + tmp + "': " + std::strerror(errno));
  std::string text;
  char buf[65536];
  for (;;) {
    ssize_t r = ::read(f.fd, buf, sizeof buf);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return Status::IOError("re-reading '" + tmp + "': " + std::strerror(errno));
    if (r == 0) break;
    text.append(buf, static_cast<size_t>(r));
  }
  try {
    json j = json::parse(text);
    if (j.at("weight_map") == weight_map) return Status::OK();
  } catch (const nlohmann::json::exception& e) {
    return Status::Corruption("'" + name + "' is not valid JSON: " + e.what());
  }
  return Status::Corruption("'" + name + "': weight_map differs from what was written");
}

// Whether a directory entry is a file an export writes (or would mix with).
bool IsExportFile(const std::string& name) {
  const std::string ext = ".safetensors";
  return name == kSafetensorsIndex ||
         (name.size() >= ext.size() &&
          name.compare(name.size() - ext.size(), ext.size(), ext) == 0);
}

}  // namespace

Result<json> ExportSafetensors(Browser& b, const std::string& tag, const ExportOptions& o) {
  if (o.out_dir.empty()) return Status::InvalidArgument("--out DIR is required");
  if (o.max_shard_bytes == 0) return Status::InvalidArgument("--max-shard-size must be positive");
  ASSIGN_OR_RETURN(const TagContents* c, b.Contents(tag));
  if (!o.file.empty() &&
      std::find(c->info.files.begin(), c->info.files.end(), o.file) == c->info.files.end()) {
    return Status::NotFound("file '" + o.file + "' does not exist in tag '" + tag + "'" +
                            ClosestSuffix(o.file, c->info.files));
  }
  const bool one_file = !o.file.empty() || c->info.files.size() == 1;
  std::vector<Item> items;
  json skipped = json::array();
  std::map<std::string, const TensorEntry*> taken;
  for (const auto& e : c->tensors) {
    if (!o.file.empty() && e.file != o.file) continue;
    std::string name = one_file ? e.param : e.file + "/" + e.param;
    bool keep = o.include.empty();
    for (const auto& g : o.include) keep = keep || GlobMatch(g, name);
    for (const auto& g : o.exclude) keep = keep && !GlobMatch(g, name);
    if (!keep) continue;
    std::string reason;
    if (SafetensorsDType(e.dtype()) == nullptr) {
      reason = std::string("safetensors has no ") + DTypeName(e.dtype()) + " dtype";
    } else if (InvalidUtf8Offset(name) != std::string_view::npos) {
      reason = "the name is not valid UTF-8 (safetensors names are JSON strings)";
    } else if (name == "__metadata__") {
      reason = "the name __metadata__ is reserved by safetensors";
    }
    if (!reason.empty()) {
      skipped.push_back({{"name", name}, {"reason", reason}});
      continue;
    }
    auto [at, fresh] = taken.emplace(name, &e);
    if (!fresh) {
      return Status::InvalidArgument("tensors " + Quote(at->second->where()) + " and " +
                                     Quote(e.where()) + " both export as " + Quote(name) +
                                     "; export one file with --file, or leave one out with "
                                     "--exclude");
    }
    items.push_back({name, &e});
  }
  if (items.empty()) return Status::NotFound("no tensor of tag '" + tag + "' selected for export");

  // Shards in order, each at most max_shard_bytes unless one tensor is larger.
  std::vector<std::vector<Item>> shards(1);
  uint64_t cur = 0, total = 0;
  for (const auto& it : items) {
    if (cur > 0 && cur + it.entry->bytes() > o.max_shard_bytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(it);
    cur += it.entry->bytes();
    total += it.entry->bytes();
  }

  ASSIGN_OR_RETURN(std::unique_ptr<checkpoint::ExportDir> dir,
                   checkpoint::ExportDir::Open(o.out_dir));
  std::error_code ec;

  // Files already there that an export would replace or mix with.
  std::vector<std::string> existing;
  for (const auto& entry : fs::directory_iterator(o.out_dir, ec)) {
    const std::string n = entry.path().filename().string();
    if (IsExportFile(n)) existing.push_back(n);
  }
  if (ec) return Status::IOError("cannot list '" + o.out_dir + "': " + ec.message());
  std::sort(existing.begin(), existing.end());
  if (!existing.empty() && !o.overwrite) {
    std::string list;
    for (size_t i = 0; i < existing.size() && i < 5; ++i) list += (i ? ", " : "") + existing[i];
    if (existing.size() > 5) list += ", ...";
    return Status::AlreadyExists("'" + o.out_dir + "' already holds safetensors files (" + list +
                                 "); choose an empty directory, or use --force to replace them");
  }

  const size_t n = shards.size();
  auto shard_name = [n](size_t i) {
    if (n == 1) return std::string("model.safetensors");
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
    return std::string(buf);
  };
  std::vector<std::unique_ptr<checkpoint::TempFile>> temps;
  Progress progress("export", total);
  json weight_map = json::object();
  json files = json::array();
  std::vector<std::string> finals;
  for (size_t i = 0; i < n; ++i) {
    const std::string name = shard_name(i);
    const std::string header = HeaderFor(shards[i], tag);
    std::string head(8, '\0');
    for (int k = 0; k < 8; ++k) head[k] = static_cast<char>(header.size() >> (8 * k));
    ASSIGN_OR_RETURN(temps.emplace_back(), dir->Create(name));
    RETURN_IF_ERROR(WriteTemp(&b, temps.back().get(), head + header, shards[i], &progress));
    RETURN_IF_ERROR(CheckShard(temps.back()->temp_path(), name, shards[i]));
    finals.push_back(name);
    uint64_t bytes = 0;
    for (const auto& it : shards[i]) {
      weight_map[it.name] = name;
      bytes += it.entry->bytes();
    }
    files.push_back({{"file", name}, {"tensors", shards[i].size()}, {"bytes", bytes}});
  }
  progress.Done();
  json index{{"metadata", {{"total_size", total}, {"ckptkv_tag", ShownName(tag)}}},
             {"weight_map", weight_map}};
  {
    ASSIGN_OR_RETURN(temps.emplace_back(), dir->Create(kSafetensorsIndex));
    RETURN_IF_ERROR(
        WriteTemp(nullptr, temps.back().get(), tools::JsonText(index, 2) + "\n", {}, nullptr));
    RETURN_IF_ERROR(CheckIndex(temps.back()->temp_path(), kSafetensorsIndex, weight_map));
    finals.emplace_back(kSafetensorsIndex);
  }

  // Everything is written and checked: move it into place (the index last),
  // then remove the files of an earlier export that this one does not
  // replace, so that the directory holds this export alone.
  for (auto& f : temps) RETURN_IF_ERROR(dir->Commit(f.get(), o.overwrite));
  temps.clear();
  for (const auto& old : existing) {
    if (std::find(finals.begin(), finals.end(), old) != finals.end()) continue;
    Status removed = dir->Remove(old);
    if (!removed.ok()) return removed.WithContext("removing the earlier export's file");
  }
  return json{{"tag", tag},
              {"out", o.out_dir},
              {"files", std::move(files)},
              {"index", kSafetensorsIndex},
              {"tensors", items.size()},
              {"total_bytes", total},
              {"verified", true},
              {"skipped", std::move(skipped)},
              {"replaced", existing}};
}

}  // namespace ckptkv::kvb
