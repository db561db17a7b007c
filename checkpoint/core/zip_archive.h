// The zip container of torch.save files (torch >= 1.6's default format):
// `<archive>/data.pkl`, `<archive>/data/<key>` storages, `<archive>/version`
// and whatever newer writers add (byteorder, .data/serialization_id).
//
// Read with pread from an open file, never mapped or read whole: a storage
// entry is read (or streamed) on its own. Only stored (uncompressed)
// entries are read, as torch writes them; a compressed entry is NotSupported
// naming it. ZIP64 end records and extra fields are understood. Every
// offset and size from the directory is checked against the file's size
// (overflow included) before use; a damaged directory is Corruption naming
// the file and the byte offset.
#ifndef CKPTKV_CHECKPOINT_CORE_ZIP_ARCHIVE_H_
#define CKPTKV_CHECKPOINT_CORE_ZIP_ARCHIVE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "store/status.h"

namespace ckptkv::checkpoint {

struct ZipEntry {
  std::string name;
  uint64_t data_offset = 0;  // of the entry's bytes in the file
  uint64_t size = 0;         // stored = uncompressed size
  uint16_t method = 0;       // 0 stored; anything else is refused on read
  uint32_t crc32 = 0;
};

class ZipArchive {
 public:
  // Opens `path` and reads its central directory (at most `max_entries`
  // entries). Corruption when it is not a zip file or its directory does
  // not fit the file.
  static Result<std::unique_ptr<ZipArchive>> Open(const std::string& path,
                                                  uint64_t max_entries = 1u << 20);
  ~ZipArchive();
  ZipArchive(const ZipArchive&) = delete;
  ZipArchive& operator=(const ZipArchive&) = delete;

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  // Entries in directory order.
  const std::vector<ZipEntry>& entries() const { return entries_; }
  // nullptr when absent.
  const ZipEntry* Find(const std::string& name) const;
  // The archive's top folder: the part of the first entry's name before
  // '/' (torch names it after the file: "archive" or the file's stem).
  std::string Prefix() const;

  // The whole entry, refused when larger than `max_bytes`; its CRC-32 is
  // checked.
  Result<std::string> Read(const ZipEntry& e, uint64_t max_bytes) const;
  // Bytes [offset, offset + len) of a stored entry into dst.
  Status ReadRange(const ZipEntry& e, uint64_t offset, uint64_t len, uint8_t* dst) const;

 private:
  ZipArchive(std::string path, int fd, uint64_t size)
      : path_(std::move(path)), fd_(fd), size_(size) {}
  Status ReadAt(uint64_t offset, uint64_t len, uint8_t* dst) const;
  Status Load(uint64_t max_entries);
  Status Bad(uint64_t at, const std::string& what) const;

  std::string path_;
  int fd_;
  uint64_t size_;
  std::vector<ZipEntry> entries_;
  std::map<std::string, size_t> by_name_;
};

// CRC-32 (the zip polynomial), continued from `crc`.
uint32_t Crc32(const uint8_t* data, size_t n, uint32_t crc = 0);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_CORE_ZIP_ARCHIVE_H_
