#include "checkpoint/core/zip_writer.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "checkpoint/core/zip_archive.h"

namespace ckptkv::checkpoint {

namespace {

std::string Errno() { return std::strerror(errno); }

std::string ParentOf(const std::string& rel) {
  const size_t slash = rel.rfind('/');
  return slash == std::string::npos ? "" : rel.substr(0, slash);
}

std::string BaseOf(const std::string& rel) {
  const size_t slash = rel.rfind('/');
  return slash == std::string::npos ? rel : rel.substr(slash + 1);
}

void Le(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

constexpr uint64_t kMax32 = 0xFFFFFFFFull;
constexpr uint32_t kLocalSig = 0x04034b50, kCentralSig = 0x02014b50, kEndSig = 0x06054b50,
                   kEnd64Sig = 0x06064b50, kEnd64LocatorSig = 0x07064b50;
constexpr uint16_t kDosDate = 0x0021;  // 1980-01-01: exports are reproducible

struct CrcTables {
  uint32_t t[8][256];
  CrcTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i) {
      for (int k = 1; k < 8; ++k) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFF];
    }
  }
};

}  // namespace

uint32_t Crc32Sliced(const uint8_t* p, size_t n, uint32_t crc) {
  static const CrcTables kT;
  const auto& t = kT.t;
  crc = ~crc;
  while (n >= 8) {
    const uint32_t lo =
        crc ^ (static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
               static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24);
    crc = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^
          t[3][p[4]] ^ t[2][p[5]] ^ t[1][p[6]] ^ t[0][p[7]];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) crc = t[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

// ---------------------------------------------------------------- TempFile

TempFile::~TempFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_ && dirfd_ >= 0 && !temp_name_.empty()) {
    ::unlinkat(dirfd_, temp_name_.c_str(), 0);
  }
}

Status TempFile::Write(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd_, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Status::IOError("writing '" + path_ + "': " + Errno());
    }
    p += w;
    n -= static_cast<size_t>(w);
    offset_ += static_cast<uint64_t>(w);
  }
  return Status::OK();
}

Status TempFile::WriteAt(uint64_t offset, const void* data, size_t n) {
  if (offset > offset_ || n > offset_ - offset) {
    return Status::FailedPrecondition("'" + path_ + "': a write at " + std::to_string(offset) +
                                      " past the bytes written");
  }
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::pwrite(fd_, p, n, static_cast<off_t>(offset));
    if (w < 0) {
      if (errno == EINTR) continue;
      return Status::IOError("writing '" + path_ + "': " + Errno());
    }
    p += w;
    n -= static_cast<size_t>(w);
    offset += static_cast<uint64_t>(w);
  }
  return Status::OK();
}

Status TempFile::SyncAndClose() {
  if (fd_ < 0) return Status::OK();
  if (::fsync(fd_) != 0) return Status::IOError("fsync '" + path_ + "': " + Errno());
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) return Status::IOError("closing '" + path_ + "': " + Errno());
  return Status::OK();
}

// --------------------------------------------------------------- ExportDir

namespace {

// Removes the temporary files (".ckptkv-export-<pid>-...partial") that an
// export killed before it could clean up left in the open directory `dir`:
// regular files whose pid names no running process. A live process's files
// (another export, this one) are left alone.
void RemoveStaleTemps(int dir) {
  const int fd = ::dup(dir);
  if (fd < 0) return;
  DIR* d = ::fdopendir(fd);
  if (d == nullptr) {
    ::close(fd);
    return;
  }
  const std::string prefix = kExportTempPrefix;
  const std::string suffix = ".partial";
  std::vector<std::string> stale;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.size() <= prefix.size() + suffix.size() || name.rfind(prefix, 0) != 0 ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
      continue;
    }
    size_t end = prefix.size();
    while (end < name.size() && end - prefix.size() < 10 &&
           std::isdigit(static_cast<unsigned char>(name[end])) != 0) {
      ++end;
    }
    if (end == prefix.size() || end >= name.size() || name[end] != '-') continue;
    const long pid =
        std::strtol(name.substr(prefix.size(), end - prefix.size()).c_str(), nullptr, 10);
    if (pid <= 0 || pid == ::getpid()) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive, or unknown
    struct stat st {};
    if (::fstatat(dir, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode)) {
      stale.push_back(name);
    }
  }
  ::closedir(d);
  for (const std::string& name : stale) ::unlinkat(dir, name.c_str(), 0);
}

}  // namespace

Result<std::unique_ptr<ExportDir>> ExportDir::Open(const std::string& path) {
  if (path.empty()) return Status::InvalidArgument("the output directory is empty; give --out DIR");
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) return Status::IOError("cannot create '" + path + "': " + ec.message());
  std::unique_ptr<ExportDir> d(new ExportDir());
  d->path_ = path;
  d->fd_ = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (d->fd_ < 0) return Status::IOError("cannot open '" + path + "': " + Errno());
  RemoveStaleTemps(d->fd_);
  return d;
}

ExportDir::~ExportDir() {
  for (auto& [rel, fd] : dirs_) ::close(fd);
  if (fd_ >= 0) ::close(fd_);
}

Status ExportDir::CheckRelative(std::string_view rel) {
  auto bad = [&](const std::string& why) {
    std::string shown;
    for (char c : rel.substr(0, 200)) {
      const auto u = static_cast<unsigned char>(c);
      if (u < 0x20 || u == 0x7f) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "\\x%02x", u);
        shown += buf;
      } else {
        shown.push_back(c);
      }
    }
    return Status::InvalidArgument("refusing to write '" + shown + "': " + why +
                                   "; an exported path must be relative, without empty, '.' or "
                                   "'..' components");
  };
  if (rel.empty()) return bad("the path is empty");
  if (rel.size() > 4096) return bad("the path is longer than 4096 bytes");
  if (rel.front() == '/') return bad("it is absolute");
  for (char c : rel) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) return bad("it holds a NUL or control character");
  }
  size_t at = 0;
  for (;;) {
    const size_t slash = rel.find('/', at);
    const std::string_view part =
        rel.substr(at, slash == std::string_view::npos ? std::string_view::npos : slash - at);
    if (part.empty()) return bad("it has an empty component");
    if (part == "." || part == "..") return bad("it has a '" + std::string(part) + "' component");
    if (part.size() > 255) return bad("a component is longer than 255 bytes");
    if (part.substr(0, std::strlen(kExportTempPrefix)) == kExportTempPrefix) {
      return bad(std::string("a component starts with ") + kExportTempPrefix +
                 ", the prefix of export's temporary files");
    }
    if (slash == std::string_view::npos) break;
    at = slash + 1;
  }
  return Status::OK();
}

Result<int> ExportDir::Parent(const std::string& rel, bool create, bool* missing) {
  *missing = false;
  const std::string parent = ParentOf(rel);
  if (parent.empty()) return fd_;
  if (auto it = dirs_.find(parent); it != dirs_.end()) return it->second;
  int at = fd_;
  std::string so_far;
  size_t pos = 0;
  while (pos <= parent.size()) {
    const size_t slash = parent.find('/', pos);
    const std::string part =
        parent.substr(pos, slash == std::string::npos ? std::string::npos : slash - pos);
    so_far += (so_far.empty() ? "" : "/") + part;
    pos = slash == std::string::npos ? parent.size() + 1 : slash + 1;
    if (auto it = dirs_.find(so_far); it != dirs_.end()) {
      at = it->second;
      continue;
    }
    int fd = ::openat(at, part.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
      if (!create) {
        *missing = true;
        return -1;
      }
      if (::mkdirat(at, part.c_str(), 0755) == 0) {
        created_.push_back(so_far);  // only what this export made is removed on failure
      } else if (errno != EEXIST) {
        return Status::IOError("cannot create '" + path_ + "/" + so_far + "': " + Errno());
      }
      fd = ::openat(at, part.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    }
    if (fd < 0) {
      if (errno == ELOOP || errno == ENOTDIR) {
        return Status::InvalidArgument("refusing to write below '" + path_ + "/" + so_far +
                                       "': it is a symlink or not a directory (export never "
                                       "follows symlinks inside the output directory)");
      }
      return Status::IOError("cannot open '" + path_ + "/" + so_far + "': " + Errno());
    }
    RemoveStaleTemps(fd);
    dirs_[so_far] = fd;
    at = fd;
  }
  return at;
}

Result<bool> ExportDir::Exists(const std::string& rel) {
  RETURN_IF_ERROR(CheckRelative(rel));
  bool missing = false;
  ASSIGN_OR_RETURN(int dir, Parent(rel, false, &missing));
  if (missing) return false;
  struct stat st;
  if (::fstatat(dir, BaseOf(rel).c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) return true;
  if (errno == ENOENT) return false;
  return Status::IOError("cannot stat '" + path_ + "/" + rel + "': " + Errno());
}

Result<std::unique_ptr<TempFile>> ExportDir::Create(const std::string& rel) {
  RETURN_IF_ERROR(CheckRelative(rel));
  bool missing = false;
  ASSIGN_OR_RETURN(int dir, Parent(rel, true, &missing));
  std::unique_ptr<TempFile> f(new TempFile());
  f->rel_ = rel;
  f->name_ = BaseOf(rel);
  std::string base = f->name_.substr(0, 160);
  f->temp_name_ = std::string(kExportTempPrefix) + std::to_string(::getpid()) + "-" +
                  std::to_string(temps_++) + "-" + base + ".partial";
  const std::string parent = ParentOf(rel);
  f->path_ = path_ + "/" + (parent.empty() ? "" : parent + "/") + f->temp_name_;
  f->fd_ = ::openat(dir, f->temp_name_.c_str(),
                    O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (f->fd_ < 0) return Status::IOError("creating '" + f->path_ + "': " + Errno());
  f->dirfd_ = dir;
  return f;
}

Status ExportDir::Commit(TempFile* f, bool overwrite) {
  RETURN_IF_ERROR(f->SyncAndClose());
  const std::string final_path = path_ + "/" + f->rel_;
  if (overwrite) {
    if (::renameat(f->dirfd_, f->temp_name_.c_str(), f->dirfd_, f->name_.c_str()) != 0) {
      return Status::IOError("renaming '" + f->path_ + "' to '" + final_path + "': " + Errno());
    }
  } else {
    // link(2) fails when the name exists, so nothing is replaced.
    if (::linkat(f->dirfd_, f->temp_name_.c_str(), f->dirfd_, f->name_.c_str(), 0) != 0) {
      if (errno == EEXIST) {
        return Status::AlreadyExists("'" + final_path +
                                     "' appeared during the export; nothing was replaced "
                                     "(use overwrite to replace it)");
      }
      return Status::IOError("linking '" + f->path_ + "' to '" + final_path + "': " + Errno());
    }
    ::unlinkat(f->dirfd_, f->temp_name_.c_str(), 0);
  }
  f->committed_ = true;
  if (::fsync(f->dirfd_) != 0) {
    return Status::IOError("fsync of the directory of '" + final_path + "': " + Errno());
  }
  return Status::OK();
}

Status ExportDir::Remove(const std::string& rel) {
  RETURN_IF_ERROR(CheckRelative(rel));
  bool missing = false;
  ASSIGN_OR_RETURN(int dir, Parent(rel, false, &missing));
  if (missing) return Status::OK();
  if (::unlinkat(dir, BaseOf(rel).c_str(), 0) != 0 && errno != ENOENT) {
    return Status::IOError("removing '" + path_ + "/" + rel + "': " + Errno());
  }
  if (::fsync(dir) != 0) return Status::IOError("fsync of '" + path_ + "': " + Errno());
  return Status::OK();
}

void ExportDir::RemoveCreatedDirs() {
  for (auto it = created_.rbegin(); it != created_.rend(); ++it) {
    if (auto d = dirs_.find(*it); d != dirs_.end()) {
      ::close(d->second);
      dirs_.erase(d);
    }
    ::unlinkat(fd_, it->c_str(), AT_REMOVEDIR);  // fails, harmlessly, unless empty
  }
  created_.clear();
}

// --------------------------------------------------------------- ZipWriter

Status ZipWriter::Begin(const std::string& name, uint64_t size) {
  if (open_)
    return Status::FailedPrecondition("zip entry " + entries_.back().name + " is still open");
  if (name.empty() || name.size() > 0xFFFF) {
    return Status::InvalidArgument("zip entry name '" + name.substr(0, 80) + "' is empty or long");
  }
  Entry e;
  e.name = name;
  e.local = out_->size();
  e.size = size;
  const bool zip64 = options_.force_zip64 || size >= kMax32;
  std::string h;
  Le(&h, kLocalSig, 4);
  Le(&h, zip64 ? 45 : 20, 2);  // version needed
  Le(&h, 0, 2);                // flags
  Le(&h, 0, 2);                // stored
  Le(&h, 0, 2);                // time
  Le(&h, kDosDate, 2);
  Le(&h, 0, 4);  // CRC-32, written by End
  Le(&h, zip64 ? kMax32 : size, 4);
  Le(&h, zip64 ? kMax32 : size, 4);
  Le(&h, name.size(), 2);
  std::string extra;
  if (zip64) {
    Le(&extra, 1, 2);
    Le(&extra, 16, 2);
    Le(&extra, size, 8);
    Le(&extra, size, 8);
  }
  // Pad with an extra field so that the data starts 64-byte aligned, as
  // PyTorch's writer does (id "FB").
  const uint64_t before = e.local + 30 + name.size() + extra.size() + 4;
  const uint64_t pad = (64 - before % 64) % 64;
  Le(&extra, 0x4246, 2);
  Le(&extra, pad, 2);
  extra.append(pad, 'Z');
  Le(&h, extra.size(), 2);
  h += name;
  h += extra;
  RETURN_IF_ERROR(out_->Write(h.data(), h.size()));
  entries_.push_back(std::move(e));
  open_ = true;
  written_ = 0;
  return Status::OK();
}

Status ZipWriter::Append(const void* data, size_t n) {
  if (!open_) return Status::FailedPrecondition("no zip entry is open");
  Entry& e = entries_.back();
  if (n > e.size - written_) {
    return Status::FailedPrecondition("zip entry " + e.name + " gets more than its " +
                                      std::to_string(e.size) + " bytes");
  }
  e.crc = Crc32Sliced(static_cast<const uint8_t*>(data), n, e.crc);
  written_ += n;
  return out_->Write(data, n);
}

Status ZipWriter::End() {
  if (!open_) return Status::FailedPrecondition("no zip entry is open");
  Entry& e = entries_.back();
  if (written_ != e.size) {
    return Status::FailedPrecondition("zip entry " + e.name + " got " + std::to_string(written_) +
                                      " of its " + std::to_string(e.size) + " bytes");
  }
  std::string crc;
  Le(&crc, e.crc, 4);
  RETURN_IF_ERROR(out_->WriteAt(e.local + 14, crc.data(), crc.size()));
  open_ = false;
  return Status::OK();
}

Status ZipWriter::Add(const std::string& name, std::string_view bytes) {
  RETURN_IF_ERROR(Begin(name, bytes.size()));
  RETURN_IF_ERROR(Append(bytes.data(), bytes.size()));
  return End();
}

Status ZipWriter::Finish() {
  if (open_)
    return Status::FailedPrecondition("zip entry " + entries_.back().name + " is still open");
  const uint64_t cd_offset = out_->size();
  std::string cd;
  for (const Entry& e : entries_) {
    const bool big_size = options_.force_zip64 || e.size >= kMax32;
    const bool big_local = options_.force_zip64 || e.local >= kMax32;
    std::string extra;
    if (big_size || big_local) {
      Le(&extra, 1, 2);
      Le(&extra, (big_size ? 16 : 0) + (big_local ? 8 : 0), 2);
      if (big_size) {
        Le(&extra, e.size, 8);  // uncompressed, then compressed
        Le(&extra, e.size, 8);
      }
      if (big_local) Le(&extra, e.local, 8);
    }
    const bool zip64 = !extra.empty();
    Le(&cd, kCentralSig, 4);
    Le(&cd, zip64 ? 45 : 20, 2);  // made by
    Le(&cd, zip64 ? 45 : 20, 2);  // needed
    Le(&cd, 0, 2);
    Le(&cd, 0, 2);
    Le(&cd, 0, 2);
    Le(&cd, kDosDate, 2);
    Le(&cd, e.crc, 4);
    Le(&cd, big_size ? kMax32 : e.size, 4);
    Le(&cd, big_size ? kMax32 : e.size, 4);
    Le(&cd, e.name.size(), 2);
    Le(&cd, extra.size(), 2);
    Le(&cd, 0, 2);  // comment
    Le(&cd, 0, 2);  // disk
    Le(&cd, 0, 2);  // internal attributes
    Le(&cd, 0, 4);  // external attributes
    Le(&cd, big_local ? kMax32 : e.local, 4);
    cd += e.name;
    cd += extra;
  }
  RETURN_IF_ERROR(out_->Write(cd.data(), cd.size()));
  const uint64_t count = entries_.size();
  const uint64_t cd_size = cd.size();
  const bool zip64 =
      options_.force_zip64 || count >= 0xFFFF || cd_offset >= kMax32 || cd_size >= kMax32;
  std::string end;
  if (zip64) {
    const uint64_t end64_at = out_->size();
    Le(&end, kEnd64Sig, 4);
    Le(&end, 44, 8);  // size of the rest of this record
    Le(&end, 45, 2);
    Le(&end, 45, 2);
    Le(&end, 0, 4);
    Le(&end, 0, 4);
    Le(&end, count, 8);
    Le(&end, count, 8);
    Le(&end, cd_size, 8);
    Le(&end, cd_offset, 8);
    Le(&end, kEnd64LocatorSig, 4);
    Le(&end, 0, 4);
    Le(&end, end64_at, 8);
    Le(&end, 1, 4);
  }
  Le(&end, kEndSig, 4);
  Le(&end, 0, 2);
  Le(&end, 0, 2);
  Le(&end, zip64 ? 0xFFFF : count, 2);
  Le(&end, zip64 ? 0xFFFF : count, 2);
  Le(&end, zip64 ? kMax32 : cd_size, 4);
  Le(&end, zip64 ? kMax32 : cd_offset, 4);
  Le(&end, 0, 2);  // comment
  return out_->Write(end.data(), end.size());
}

}  // namespace ckptkv::checkpoint
