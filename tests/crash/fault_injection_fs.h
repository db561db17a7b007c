// FaultInjectionFileSystem: a RocksDB FileSystem that can simulate a power
// loss.
//
// It remembers, for every file written through it, how many bytes were
// written and how many of them were made durable by the last Sync / Fsync
// (RangeSync and Flush do not count). A test "crashes" a database by
//   1. SetActive(false): every later write, sync, create, rename, delete or
//      truncate fails with IOError("filesystem inactive"), so the dying
//      database cannot persist anything more (closing it is allowed and
//      its errors are expected);
//   2. destroying the database object;
//   3. DropUnsyncedData(): every tracked file is cut back to its last synced
//      size, and files that were never synced are deleted;
//   4. SetActive(true) and reopening.
// Files are tracked by name; a rename moves the record to the new name.
// Files that existed before they were first written through this object
// count as durable. Directory entries are taken as durable once their file
// is synced (RocksDB fsyncs the directory after creating files it needs).
//
// DeactivateAfter(n) turns the file system inactive by itself once n more
// mutating operations have happened, which crashes the database at an
// arbitrary point inside a write, flush or commit.
#ifndef CKPTKV_TESTS_CRASH_FAULT_INJECTION_FS_H_
#define CKPTKV_TESTS_CRASH_FAULT_INJECTION_FS_H_

#include <rocksdb/file_system.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace ckptkv::testing {

class FaultInjectionFileSystem : public rocksdb::FileSystemWrapper {
 public:
  // What is known about one file written through this file system.
  struct FileState {
    uint64_t pos = 0;          // bytes written so far (logical size)
    uint64_t synced = 0;       // bytes made durable by the last Sync/Fsync
    bool ever_synced = false;  // false: the file is dropped as a whole
  };

  explicit FaultInjectionFileSystem(
      std::shared_ptr<rocksdb::FileSystem> base = rocksdb::FileSystem::Default());

  const char* Name() const override { return "FaultInjectionFileSystem"; }

  // Inactive: every mutating call fails. Also cancels DeactivateAfter.
  void SetActive(bool active);
  bool IsActive() const { return active_.load(); }
  // Becomes inactive once `ops` more mutating operations were attempted
  // (the operation that reaches the limit fails). 0 = immediately.
  void DeactivateAfter(uint64_t ops);
  // Mutating operations attempted so far (to pick crash points).
  uint64_t ops() const { return ops_.load(); }
  // Marks the errors of an inactive file system retryable (a transient
  // fault RocksDB may recover from by itself) instead of plain IOErrors.
  void SetRetryable(bool retryable) { retryable_ = retryable; }

  // Cuts every tracked file back to what was synced, deletes files that were
  // never synced, and forgets them all. Call with the database closed.
  // Returns a description of what it did (for test logs).
  std::string DropUnsyncedData();
  // Forgets every tracked file without touching it (all count as durable).
  void ResetState();

  // Names of the tracked files and their states (for diagnostics).
  std::map<std::string, FileState> Snapshot() const;

  // Used by the file wrappers. Counts one mutating operation and returns
  // the error to fail it with, or OK.
  rocksdb::IOStatus CheckOp(const char* what);
  std::mutex& mu() { return mu_; }
  rocksdb::IOStatus InactiveError(const char* what) const;

  // --- FileSystem -------------------------------------------------------
  rocksdb::IOStatus NewWritableFile(const std::string& f, const rocksdb::FileOptions& opts,
                                    std::unique_ptr<rocksdb::FSWritableFile>* r,
                                    rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus ReopenWritableFile(const std::string& f, const rocksdb::FileOptions& opts,
                                       std::unique_ptr<rocksdb::FSWritableFile>* r,
                                       rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus ReuseWritableFile(const std::string& f, const std::string& old_f,
                                      const rocksdb::FileOptions& opts,
                                      std::unique_ptr<rocksdb::FSWritableFile>* r,
                                      rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus NewRandomRWFile(const std::string& f, const rocksdb::FileOptions& opts,
                                    std::unique_ptr<rocksdb::FSRandomRWFile>* r,
                                    rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus NewDirectory(const std::string& name, const rocksdb::IOOptions& io_opts,
                                 std::unique_ptr<rocksdb::FSDirectory>* r,
                                 rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus DeleteFile(const std::string& f, const rocksdb::IOOptions& opts,
                               rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus Truncate(const std::string& f, size_t size, const rocksdb::IOOptions& opts,
                             rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus RenameFile(const std::string& src, const std::string& dst,
                               const rocksdb::IOOptions& opts,
                               rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus LinkFile(const std::string& src, const std::string& dst,
                             const rocksdb::IOOptions& opts, rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus CreateDir(const std::string& d, const rocksdb::IOOptions& opts,
                              rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus CreateDirIfMissing(const std::string& d, const rocksdb::IOOptions& opts,
                                       rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus DeleteDir(const std::string& d, const rocksdb::IOOptions& opts,
                              rocksdb::IODebugContext* dbg) override;

 private:
  std::shared_ptr<FileState> Track(const std::string& name, uint64_t pos, uint64_t synced,
                                   bool ever_synced);

  mutable std::mutex mu_;  // guards files_ and every FileState
  std::map<std::string, std::shared_ptr<FileState>> files_;
  std::atomic<bool> active_{true};
  std::atomic<bool> retryable_{false};
  std::atomic<uint64_t> ops_{0};
  std::atomic<int64_t> deactivate_at_{-1};  // ops_ value that deactivates; -1 = never
};

}  // namespace ckptkv::testing

#endif  // CKPTKV_TESTS_CRASH_FAULT_INJECTION_FS_H_
