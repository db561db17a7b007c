// FileLock: the write lock of a store directory.
//
// Holds an exclusive flock() on the store directory itself, so that no file
// inside it (deleting OWNER or RocksDB's LOCK) can bypass the lock; only a
// different directory at the same path would, and that is a different
// store. The owner's pid and command line go into <dir>/OWNER, so that a
// second writer gets "store is locked by process 1234 (ckptkv demo)"
// instead of RocksDB's lock error.
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
