// Writing files into an export directory safely, and the zip container of
// torch.save files.
//
// ExportDir confines every file to one directory: relative paths are
// checked (no absolute path, no empty, "." or ".." component, no NUL), the
// directories below it are created and opened one component at a time
// with O_NOFOLLOW, so a symlink planted inside is never followed, and each
// file is written under a temporary name beside its final one
// (".ckptkv-export-<pid>-<name>.partial"), synced, and only renamed into
// place by Commit. A TempFile not committed is removed when it is
// destroyed, so a failed export leaves no partial file under a final name;
// the temporary files of an export that was killed (their pid names no
// running process) are removed by the next export into the directories
// they are in.
//
// ZipWriter writes a zip archive as torch.save does (PyTorch's stream
// writer): stored entries only, each entry's data 64-byte aligned (an
// extra field pads the local header), CRC-32, ZIP64 records when an entry,
// an offset or the entry count needs them. An entry's bytes can be streamed
// with a known size; its CRC is written into the local header afterwards.
#ifndef CKPTKV_CHECKPOINT_CORE_ZIP_WRITER_H_
#define CKPTKV_CHECKPOINT_CORE_ZIP_WRITER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "store/status.h"

namespace ckptkv::checkpoint {

inline constexpr const char* kExportTempPrefix = ".ckptkv-export-";

class ExportDir;

// A file being written under a temporary name.
class TempFile {
 public:
  ~TempFile();  // removes the file unless committed
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  const std::string& rel() const { return rel_; }         // final path below the directory
  const std::string& temp_path() const { return path_; }  // full path of the temporary file
  uint64_t size() const { return offset_; }               // bytes written so far
  Status Write(const void* data, size_t n);
  Status WriteAt(uint64_t offset, const void* data, size_t n);  // within what is written
  // fsync, then close; the file can then be re-read at temp_path().
  Status SyncAndClose();

 private:
  friend class ExportDir;
  TempFile() = default;
  int fd_ = -1;
  int dirfd_ = -1;  // owned by the ExportDir
  std::string rel_, name_, temp_name_, path_;
  uint64_t offset_ = 0;
  bool committed_ = false;
};

class ExportDir {
 public:
  // Creates `path` (and its parents) when missing and opens it. The
  // directory itself may be reached through symlinks the caller named;
  // nothing below it is.
  static Result<std::unique_ptr<ExportDir>> Open(const std::string& path);
  ~ExportDir();
  ExportDir(const ExportDir&) = delete;
  ExportDir& operator=(const ExportDir&) = delete;

  const std::string& path() const { return path_; }

  // InvalidArgument unless `rel` is a relative '/'-separated path without
  // empty, "." or ".." components, NUL or control characters, at most 4096
  // bytes, and no component starting with ".ckptkv-export-".
  static Status CheckRelative(std::string_view rel);

  // Whether something exists at `rel` (not following a final symlink);
  // false when a directory on the way is missing. InvalidArgument when a
  // component on the way is a symlink or not a directory.
  Result<bool> Exists(const std::string& rel);
  // A new temporary file for `rel`, its directories created as needed.
  Result<std::unique_ptr<TempFile>> Create(const std::string& rel);
  // Renames the synced, closed file into place: replacing what is there
  // when `overwrite`, else AlreadyExists; then syncs its directory.
  Status Commit(TempFile* f, bool overwrite);
  // Removes the file (or symlink) at `rel`, then syncs its directory.
  Status Remove(const std::string& rel);
  // Removes the directories Create made that are still empty (after a
  // failed export), deepest first.
  void RemoveCreatedDirs();

 private:
  ExportDir() = default;
  // The open directory of rel's parent (cached), creating it when `create`.
  Result<int> Parent(const std::string& rel, bool create, bool* missing);

  std::string path_;
  int fd_ = -1;
  std::map<std::string, int> dirs_;  // parent path below the root -> fd
  std::vector<std::string> created_;
  uint64_t temps_ = 0;
};

// CRC-32 of the zip polynomial, continued from `crc` (the same values as
// zip_archive.h's Crc32), eight bytes a step: several times faster on
// tensors' bytes.
uint32_t Crc32Sliced(const uint8_t* data, size_t n, uint32_t crc = 0);

struct ZipWriterOptions {
  bool force_zip64 = false;  // ZIP64 records even when nothing needs them (tests)
};

class ZipWriter {
 public:
  explicit ZipWriter(TempFile* out, ZipWriterOptions options = {}) : out_(out), options_(options) {}

  // A whole entry.
  Status Add(const std::string& name, std::string_view bytes);
  // An entry of `size` bytes given by Append calls, closed by End.
  Status Begin(const std::string& name, uint64_t size);
  Status Append(const void* data, size_t n);
  Status End();
  // The central directory and end records. The file is complete after it.
  Status Finish();

 private:
  struct Entry {
    std::string name;
    uint64_t local = 0, size = 0;
    uint32_t crc = 0;
  };
  TempFile* out_;
  ZipWriterOptions options_;
  std::vector<Entry> entries_;
  bool open_ = false;
  uint64_t written_ = 0;  // of the open entry
};

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_CORE_ZIP_WRITER_H_
