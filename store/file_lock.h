// FileLock: the write lock of a store directory.
//
// Holds an exclusive flock() on <dir>/OWNER and writes the owner's pid and
// command line into it, so that a second writer gets "store is locked by
// process 1234 (ckptkv demo)" instead of RocksDB's lock error.
#ifndef CKPTKV_STORE_FILE_LOCK_H_
#define CKPTKV_STORE_FILE_LOCK_H_

#include <memory>
#include <string>

#include "store/status.h"

namespace ckptkv {

class FileLock {
 public:
  // Busy if another process (or another Store in this one) holds the lock.
  static Result<std::unique_ptr<FileLock>> Acquire(const std::string& dir);
  ~FileLock();
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  explicit FileLock(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace ckptkv

#endif  // CKPTKV_STORE_FILE_LOCK_H_
