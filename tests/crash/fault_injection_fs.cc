#include "tests/crash/fault_injection_fs.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>

namespace ckptkv::testing {

using rocksdb::DataVerificationInfo;
using rocksdb::FileOptions;
using rocksdb::FSDirectory;
using rocksdb::FSRandomRWFile;
using rocksdb::FSWritableFile;
using rocksdb::IODebugContext;
using rocksdb::IOOptions;
using rocksdb::IOStatus;
using rocksdb::Slice;

namespace {

// A writable file whose written and synced sizes are recorded.
class TrackedWritableFile : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  TrackedWritableFile(std::unique_ptr<FSWritableFile>&& target, FaultInjectionFileSystem* fs,
                      std::shared_ptr<FaultInjectionFileSystem::FileState> state)
      : FSWritableFileOwnerWrapper(std::move(target)), fs_(fs), state_(std::move(state)) {}

  IOStatus Append(const Slice& data, const IOOptions& options, IODebugContext* dbg) override {
    IOStatus s = fs_->CheckOp("append");
    if (s.ok()) s = target()->Append(data, options, dbg);
    if (s.ok()) Grow(Pos() + data.size());
    return s;
  }
  IOStatus Append(const Slice& data, const IOOptions& options, const DataVerificationInfo& info,
                  IODebugContext* dbg) override {
    IOStatus s = fs_->CheckOp("append");
    if (s.ok()) s = target()->Append(data, options, info, dbg);
    if (s.ok()) Grow(Pos() + data.size());
    return s;
  }
  IOStatus PositionedAppend(const Slice& data, uint64_t offset, const IOOptions& options,
                            IODebugContext* dbg) override {
    IOStatus s = fs_->CheckOp("positioned append");
    if (s.ok()) s = target()->PositionedAppend(data, offset, options, dbg);
    if (s.ok()) Grow(offset + data.size());
    return s;
  }
  IOStatus PositionedAppend(const Slice& data, uint64_t offset, const IOOptions& options,
                            const DataVerificationInfo& info, IODebugContext* dbg) override {
    IOStatus s = fs_->CheckOp("positioned append");
    if (s.ok()) s = target()->PositionedAppend(data, offset, options, info, dbg);
    if (s.ok()) Grow(offset + data.size());
    return s;
  }
  IOStatus Truncate(uint64_t size, const IOOptions& options, IODebugContext* dbg) override {
    IOStatus s = fs_->CheckOp("truncate");
    if (s.ok()) s = target()->Truncate(size, options, dbg);
    if (s.ok()) {
      std::lock_guard<std::mutex> lock(fs_->mu());
      state_->pos = size;
      state_->synced = std::min(state_->synced, size);
    }
    return s;
  }
  IOStatus Flush(const IOOptions& options, IODebugContext* dbg) override {
    if (!fs_->IsActive()) return fs_->InactiveError("flush");
    return target()->Flush(options, dbg);
  }
  IOStatus Sync(const IOOptions& options, IODebugContext* dbg) override {
    IOStatus s = fs_->CheckOp("sync");
    if (s.ok()) s = target()->Sync(options, dbg);
    if (s.ok()) MarkSynced();
    return s;
  }
  IOStatus Fsync(const IOOptions& options, IODebugContext* dbg) override {
    IOStatus s = fs_->CheckOp("fsync");
    if (s.ok()) s = target()->Fsync(options, dbg);
    if (s.ok()) MarkSynced();
    return s;
  }
  // Not a durability point: sync_file_range does not flush metadata.
  IOStatus RangeSync(uint64_t offset, uint64_t nbytes, const IOOptions& options,
                     IODebugContext* dbg) override {
    if (!fs_->IsActive()) return fs_->InactiveError("range sync");
    return target()->RangeSync(offset, nbytes, options, dbg);
  }
  IOStatus Allocate(uint64_t offset, uint64_t len, const IOOptions& options,
                    IODebugContext* dbg) override {
    if (!fs_->IsActive()) return fs_->InactiveError("allocate");
    return target()->Allocate(offset, len, options, dbg);
  }
  // Closing writes no data of its own; the descriptor is always released.
  IOStatus Close(const IOOptions& options, IODebugContext* dbg) override {
    IOStatus s = target()->Close(options, dbg);
    if (!fs_->IsActive() && s.ok()) return fs_->InactiveError("close");
    return s;
  }

 private:
  uint64_t Pos() {
    std::lock_guard<std::mutex> lock(fs_->mu());
    return state_->pos;
  }
  void Grow(uint64_t end) {
    std::lock_guard<std::mutex> lock(fs_->mu());
    state_->pos = std::max(state_->pos, end);
  }
  void MarkSynced() {
    std::lock_guard<std::mutex> lock(fs_->mu());
    state_->synced = state_->pos;
    state_->ever_synced = true;
  }

  FaultInjectionFileSystem* fs_;
  std::shared_ptr<FaultInjectionFileSystem::FileState> state_;
};

class FaultDirectory : public rocksdb::FSDirectoryWrapper {
 public:
  FaultDirectory(std::unique_ptr<FSDirectory>&& t, FaultInjectionFileSystem* fs)
      : FSDirectoryWrapper(std::move(t)), fs_(fs) {}
  IOStatus Fsync(const IOOptions& options, IODebugContext* dbg) override {
    IOStatus s = fs_->CheckOp("directory fsync");
    if (!s.ok()) return s;
    return FSDirectoryWrapper::Fsync(options, dbg);
  }
  IOStatus FsyncWithDirOptions(const IOOptions& options, IODebugContext* dbg,
                               const rocksdb::DirFsyncOptions& o) override {
    IOStatus s = fs_->CheckOp("directory fsync");
    if (!s.ok()) return s;
    return FSDirectoryWrapper::FsyncWithDirOptions(options, dbg, o);
  }

 private:
  FaultInjectionFileSystem* fs_;
};

}  // namespace

FaultInjectionFileSystem::FaultInjectionFileSystem(std::shared_ptr<rocksdb::FileSystem> base)
    : FileSystemWrapper(std::move(base)) {}

void FaultInjectionFileSystem::SetActive(bool active) {
  deactivate_at_ = -1;
  active_ = active;
}

void FaultInjectionFileSystem::DeactivateAfter(uint64_t ops) {
  deactivate_at_ = static_cast<int64_t>(ops_.load() + ops + 1);
}

IOStatus FaultInjectionFileSystem::InactiveError(const char* what) const {
  IOStatus s = IOStatus::IOError(std::string("filesystem inactive (") + what + ")");
  if (retryable_) s.SetRetryable(true);
  return s;
}

IOStatus FaultInjectionFileSystem::CheckOp(const char* what) {
  uint64_t n = ops_.fetch_add(1) + 1;
  int64_t at = deactivate_at_.load();
  if (at >= 0 && static_cast<int64_t>(n) >= at) active_ = false;
  if (!active_) return InactiveError(what);
  return IOStatus::OK();
}

std::shared_ptr<FaultInjectionFileSystem::FileState> FaultInjectionFileSystem::Track(
    const std::string& name, uint64_t pos, uint64_t synced, bool ever_synced) {
  auto st = std::make_shared<FileState>();
  st->pos = pos;
  st->synced = synced;
  st->ever_synced = ever_synced;
  std::lock_guard<std::mutex> lock(mu_);
  files_[name] = st;
  return st;
}

std::string FaultInjectionFileSystem::DropUnsyncedData() {
  std::map<std::string, std::shared_ptr<FileState>> files;
  {
    std::lock_guard<std::mutex> lock(mu_);
    files.swap(files_);
  }
  std::ostringstream log;
  IOOptions io;
  for (const auto& [name, st] : files) {
    if (!target()->FileExists(name, io, nullptr).ok()) continue;
    uint64_t size = 0;
    if (!target()->GetFileSize(name, io, &size, nullptr).ok()) continue;
    if (!st->ever_synced) {
      IOStatus s = target()->DeleteFile(name, io, nullptr);
      log << "deleted " << name << " (" << size << " bytes, never synced)"
          << (s.ok() ? "" : " FAILED: " + s.ToString()) << "\n";
    } else if (size > st->synced) {
      // The local file system does not implement FileSystem::Truncate.
      int rc = ::truncate(name.c_str(), static_cast<off_t>(st->synced));
      log << "truncated " << name << " " << size << " -> " << st->synced
          << (rc == 0 ? "" : std::string(" FAILED: ") + std::strerror(errno)) << "\n";
    }
  }
  return log.str();
}

void FaultInjectionFileSystem::ResetState() {
  std::lock_guard<std::mutex> lock(mu_);
  files_.clear();
}

std::map<std::string, FaultInjectionFileSystem::FileState> FaultInjectionFileSystem::Snapshot()
    const {
  std::lock_guard<std::mutex> lock(mu_);
  std::map<std::string, FileState> out;
  for (const auto& [name, st] : files_) out[name] = *st;
  return out;
}

IOStatus FaultInjectionFileSystem::NewWritableFile(const std::string& f, const FileOptions& opts,
                                                   std::unique_ptr<FSWritableFile>* r,
                                                   IODebugContext* dbg) {
  IOStatus s = CheckOp("create");
  if (!s.ok()) return s;
  std::unique_ptr<FSWritableFile> file;
  s = target()->NewWritableFile(f, opts, &file, dbg);
  if (!s.ok()) return s;
  r->reset(new TrackedWritableFile(std::move(file), this, Track(f, 0, 0, false)));
  return s;
}

IOStatus FaultInjectionFileSystem::ReopenWritableFile(const std::string& f, const FileOptions& opts,
                                                      std::unique_ptr<FSWritableFile>* r,
                                                      IODebugContext* dbg) {
  IOStatus s = CheckOp("reopen");
  if (!s.ok()) return s;
  std::unique_ptr<FSWritableFile> file;
  s = target()->ReopenWritableFile(f, opts, &file, dbg);
  if (!s.ok()) return s;
  uint64_t size = 0;
  target()->GetFileSize(f, IOOptions(), &size, nullptr).PermitUncheckedError();
  std::shared_ptr<FileState> st;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = files_.find(f);
    if (it != files_.end()) {
      st = it->second;
      st->pos = size;
    }
  }
  if (!st) st = Track(f, size, size, true);  // existing bytes count as durable
  r->reset(new TrackedWritableFile(std::move(file), this, st));
  return s;
}

IOStatus FaultInjectionFileSystem::ReuseWritableFile(const std::string& f, const std::string& old_f,
                                                     const FileOptions& opts,
                                                     std::unique_ptr<FSWritableFile>* r,
                                                     IODebugContext* dbg) {
  IOStatus s = CheckOp("reuse");
  if (!s.ok()) return s;
  std::unique_ptr<FSWritableFile> file;
  s = target()->ReuseWritableFile(f, old_f, opts, &file, dbg);
  if (!s.ok()) return s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    files_.erase(old_f);
  }
  r->reset(new TrackedWritableFile(std::move(file), this, Track(f, 0, 0, false)));
  return s;
}

IOStatus FaultInjectionFileSystem::NewRandomRWFile(const std::string& f, const FileOptions& opts,
                                                   std::unique_ptr<FSRandomRWFile>* r,
                                                   IODebugContext* dbg) {
  IOStatus s = CheckOp("open read-write");
  if (!s.ok()) return s;
  return target()->NewRandomRWFile(f, opts, r, dbg);
}

IOStatus FaultInjectionFileSystem::NewDirectory(const std::string& name, const IOOptions& io_opts,
                                                std::unique_ptr<FSDirectory>* r,
                                                IODebugContext* dbg) {
  std::unique_ptr<FSDirectory> dir;
  IOStatus s = target()->NewDirectory(name, io_opts, &dir, dbg);
  if (!s.ok()) return s;
  r->reset(new FaultDirectory(std::move(dir), this));
  return s;
}

IOStatus FaultInjectionFileSystem::DeleteFile(const std::string& f, const IOOptions& opts,
                                              IODebugContext* dbg) {
  IOStatus s = CheckOp("delete");
  if (!s.ok()) return s;
  s = target()->DeleteFile(f, opts, dbg);
  if (s.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    files_.erase(f);
  }
  return s;
}

IOStatus FaultInjectionFileSystem::Truncate(const std::string& f, size_t size,
                                            const IOOptions& opts, IODebugContext* dbg) {
  IOStatus s = CheckOp("truncate");
  if (!s.ok()) return s;
  s = target()->Truncate(f, size, opts, dbg);
  if (s.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = files_.find(f);
    if (it != files_.end()) {
      it->second->pos = size;
      it->second->synced = std::min<uint64_t>(it->second->synced, size);
    }
  }
  return s;
}

IOStatus FaultInjectionFileSystem::RenameFile(const std::string& src, const std::string& dst,
                                              const IOOptions& opts, IODebugContext* dbg) {
  IOStatus s = CheckOp("rename");
  if (!s.ok()) return s;
  s = target()->RenameFile(src, dst, opts, dbg);
  if (s.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = files_.find(src);
    if (it != files_.end()) {
      files_[dst] = it->second;
      files_.erase(src);
    } else {
      files_.erase(dst);  // replaced by a durable, untracked file
    }
  }
  return s;
}

IOStatus FaultInjectionFileSystem::LinkFile(const std::string& src, const std::string& dst,
                                            const IOOptions& opts, IODebugContext* dbg) {
  IOStatus s = CheckOp("link");
  if (!s.ok()) return s;
  s = target()->LinkFile(src, dst, opts, dbg);
  if (s.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = files_.find(src);
    if (it != files_.end()) {
      files_[dst] = it->second;  // one inode, two names
    } else {
      files_.erase(dst);
    }
  }
  return s;
}

IOStatus FaultInjectionFileSystem::CreateDir(const std::string& d, const IOOptions& opts,
                                             IODebugContext* dbg) {
  IOStatus s = CheckOp("create dir");
  if (!s.ok()) return s;
  return target()->CreateDir(d, opts, dbg);
}

IOStatus FaultInjectionFileSystem::CreateDirIfMissing(const std::string& d, const IOOptions& opts,
                                                      IODebugContext* dbg) {
  IOStatus s = CheckOp("create dir");
  if (!s.ok()) return s;
  return target()->CreateDirIfMissing(d, opts, dbg);
}

IOStatus FaultInjectionFileSystem::DeleteDir(const std::string& d, const IOOptions& opts,
                                             IODebugContext* dbg) {
  IOStatus s = CheckOp("delete dir");
  if (!s.ok()) return s;
  return target()->DeleteDir(d, opts, dbg);
}

}  // namespace ckptkv::testing
