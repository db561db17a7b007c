#include "tools/kv_browser/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>

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

Status WriteAll(int fd, const uint8_t* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Status::IOError("writing '" + path + "': " + std::strerror(errno));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::OK();
}

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

std::string HeaderFor(const std::vector<Item>& items, const std::string& tag) {
  json h = json::object();
  uint64_t off = 0;
  for (const auto& it : items) {
    h[it.name] = {{"dtype", SafetensorsDType(it.entry->dtype())},
                  {"shape", it.entry->shape()},
                  {"data_offsets", {off, off + it.entry->bytes()}}};
    off += it.entry->bytes();
  }
  h["__metadata__"] = {{"format", "pt"}, {"ckptkv_tag", tag}};
  std::string s = h.dump();
  s.resize((s.size() + 7) / 8 * 8, ' ');  // data starts 8-byte aligned
  return s;
}

// Writes one shard to a temporary name in the directory, then renames it.
Status WriteShard(Browser& b, int dirfd, const std::string& name, const std::string& header,
                  const std::vector<Item>& items, bool overwrite, Progress* progress) {
  struct stat st;
  if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && !overwrite) {
    return Status::AlreadyExists("'" + name +
                                 "' already exists in the output directory; use --force "
                                 "to replace it");
  }
  const std::string tmp = "." + name + ".partial";
  ::unlinkat(dirfd, tmp.c_str(), 0);
  Fd f;
  f.fd = ::openat(dirfd, tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (f.fd < 0) return Status::IOError("creating '" + tmp + "': " + std::strerror(errno));
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(header.size() >> (8 * i));
  RETURN_IF_ERROR(WriteAll(f.fd, len, 8, name));
  RETURN_IF_ERROR(
      WriteAll(f.fd, reinterpret_cast<const uint8_t*>(header.data()), header.size(), name));
  std::vector<uint8_t> buf;
  const uint64_t window = 4u << 20;
  for (const auto& it : items) {
    const TensorEntry& e = *it.entry;
    for (uint64_t off = 0; off < e.bytes(); off += window) {
      uint64_t n = std::min(window, e.bytes() - off);
      buf.resize(n);
      RETURN_IF_ERROR(b.Read(e, off, n, buf.data()));
      RETURN_IF_ERROR(WriteAll(f.fd, buf.data(), n, name));
      progress->Add(n);
    }
  }
  if (::fsync(f.fd) != 0) return Status::IOError("fsync '" + tmp + "': " + std::strerror(errno));
  if (::renameat(dirfd, tmp.c_str(), dirfd, name.c_str()) != 0) {
    return Status::IOError("renaming '" + tmp + "': " + std::strerror(errno));
  }
  return Status::OK();
}

// Re-reads a written shard and checks every tensor against the digests of
// its stored chunks.
Status CheckShard(int dirfd, const std::string& name, const std::string& header,
                  const std::vector<Item>& items) {
  Fd f;
  f.fd = ::openat(dirfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (f.fd < 0) return Status::IOError("re-opening '" + name + "': " + std::strerror(errno));
  uint8_t len[8];
  RETURN_IF_ERROR(ReadAll(f.fd, len, 8, name));
  uint64_t hlen = 0;
  for (int i = 0; i < 8; ++i) hlen |= static_cast<uint64_t>(len[i]) << (8 * i);
  if (hlen != header.size()) return Status::Corruption("'" + name + "': header length differs");
  std::string h(hlen, '\0');
  RETURN_IF_ERROR(ReadAll(f.fd, reinterpret_cast<uint8_t*>(h.data()), hlen, name));
  if (h != header)
    return Status::Corruption("'" + name + "': header differs from what was written");
  std::vector<uint8_t> buf;
  for (const auto& it : items) {
    const TensorEntry& e = *it.entry;
    if (e.is_inline()) {
      buf.resize(e.bytes());
      RETURN_IF_ERROR(ReadAll(f.fd, buf.data(), buf.size(), name));
      if (Digest::Of(buf.data(), buf.size()) != e.digest()) {
        return Status::Corruption("'" + name + "': tensor '" + it.name +
                                  "' does not match its stored digest");
      }
      continue;
    }
    for (size_t i = 0; i < e.num_chunks(); ++i) {
      buf.resize(e.chunk_length(i));
      RETURN_IF_ERROR(ReadAll(f.fd, buf.data(), buf.size(), name));
      if (Digest::Of(buf.data(), buf.size()) != e.chunk(i)) {
        return Status::Corruption("'" + name + "': tensor '" + it.name + "' chunk " +
                                  std::to_string(i) + " does not match its stored digest");
      }
    }
  }
  return Status::OK();
}

}  // namespace

Result<json> ExportSafetensors(Browser& b, const std::string& tag, const ExportOptions& o) {
  if (o.out_dir.empty()) return Status::InvalidArgument("--out DIR is required");
  ASSIGN_OR_RETURN(const TagContents* c, b.Contents(tag));
  if (!o.file.empty() &&
      std::find(c->info.files.begin(), c->info.files.end(), o.file) == c->info.files.end()) {
    return Status::NotFound("file '" + o.file + "' does not exist in tag '" + tag + "'" +
                            ClosestSuffix(o.file, c->info.files));
  }
  const bool one_file = !o.file.empty() || c->info.files.size() == 1;
  std::vector<Item> items;
  json skipped = json::array();
  for (const auto& e : c->tensors) {
    if (!o.file.empty() && e.file != o.file) continue;
    std::string name = one_file ? e.param : e.file + "/" + e.param;
    bool keep = o.include.empty();
    for (const auto& g : o.include) keep = keep || GlobMatch(g, name);
    for (const auto& g : o.exclude) keep = keep && !GlobMatch(g, name);
    if (!keep) continue;
    if (SafetensorsDType(e.dtype()) == nullptr) {
      skipped.push_back(
          {{"name", name},
           {"reason", std::string("safetensors has no ") + DTypeName(e.dtype()) + " dtype"}});
      continue;
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

  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  if (ec) return Status::IOError("cannot create '" + o.out_dir + "': " + ec.message());
  Fd dir;
  dir.fd = ::open(o.out_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir.fd < 0)
    return Status::IOError("cannot open '" + o.out_dir + "': " + std::strerror(errno));

  const size_t n = shards.size();
  auto shard_name = [n](size_t i) {
    if (n == 1) return std::string("model.safetensors");
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
    return std::string(buf);
  };
  Progress progress("export", total);
  json weight_map = json::object();
  json files = json::array();
  for (size_t i = 0; i < n; ++i) {
    const std::string name = shard_name(i);
    const std::string header = HeaderFor(shards[i], tag);
    RETURN_IF_ERROR(WriteShard(b, dir.fd, name, header, shards[i], o.overwrite, &progress));
    RETURN_IF_ERROR(CheckShard(dir.fd, name, header, shards[i]));
    uint64_t bytes = 0;
    for (const auto& it : shards[i]) {
      weight_map[it.name] = name;
      bytes += it.entry->bytes();
    }
    files.push_back({{"file", name}, {"tensors", shards[i].size()}, {"bytes", bytes}});
  }
  progress.Done();
  json index{{"metadata", {{"total_size", total}, {"ckptkv_tag", tag}}},
             {"weight_map", weight_map}};
  const std::string index_name = "model.safetensors.index.json";
  std::string text = index.dump(2) + "\n";
  struct stat st;
  if (::fstatat(dir.fd, index_name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && !o.overwrite) {
    return Status::AlreadyExists("'" + index_name + "' already exists; use --force");
  }
  ::unlinkat(dir.fd, index_name.c_str(), 0);
  Fd f;
  f.fd = ::openat(dir.fd, index_name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                  0644);
  if (f.fd < 0) return Status::IOError("creating '" + index_name + "': " + std::strerror(errno));
  RETURN_IF_ERROR(
      WriteAll(f.fd, reinterpret_cast<const uint8_t*>(text.data()), text.size(), index_name));
  return json{{"tag", tag},
              {"out", o.out_dir},
              {"files", std::move(files)},
              {"index", index_name},
              {"tensors", items.size()},
              {"total_bytes", total},
              {"verified", true},
              {"skipped", std::move(skipped)}};
}

}  // namespace ckptkv::kvb
