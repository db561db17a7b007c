// The legacy container of torch.save files (torch < 1.6, or
// `_use_new_zipfile_serialization=False`): five pickles one after another,
// then the storages' bytes:
//
//   pickle  the magic number 0x1950a86a20f9469cfc6c
//   pickle  the protocol version, 1001
//   pickle  sys_info: {"protocol_version", "little_endian", "type_sizes"}
//   pickle  the saved object; its persistent ids are
//           ('storage', torch.<T>Storage, root_key, location, numel, view)
//           with view None or (view_key, offset, size), in elements
//   pickle  the list of root keys whose bytes follow, in that order
//   then per key: an 8-byte little-endian element count and count *
//   itemsize raw bytes.
//
// Read with pread, never mapped or read whole: each pickle is read through
// a window that grows only while the pickle runs past it (so a pickle at
// most twice its size is in memory), and a storage's bytes are read (or
// streamed) on their own. The main pickle is parsed by the symbolic machine
// (pickle_machine.h) only to find the storages it names and how large each
// record is; what its values mean is its reader's business. Every count and
// size is checked against the file's size (overflow included) before use:
// a storage whose count differs from its id's numel, a record past the end
// of the file, a list naming a key no id names (or a key named twice), an
// id whose key the list lacks, a key named as two types or sizes are each a
// Corruption naming the file and the byte offset.
#ifndef CKPTKV_CHECKPOINT_CORE_LEGACY_ARCHIVE_H_
#define CKPTKV_CHECKPOINT_CORE_LEGACY_ARCHIVE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint/core/pickle_machine.h"
#include "store/status.h"

namespace ckptkv::checkpoint {

// The bytes of element of torch.<name> (a typed storage class such as
// "FloatStorage"); 0 for a name that is not one the readers know.
uint64_t TorchStorageItemSize(std::string_view name);

struct LegacyStorage {
  std::string key;           // the root key, as the ids and the list name it
  std::string type;          // "FloatStorage" (of module torch)
  uint64_t numel = 0;        // elements (the record's count = the ids' numel)
  uint64_t itemsize = 0;     // bytes per element
  uint64_t data_offset = 0;  // of its bytes in the file
  uint64_t size = 0;         // numel * itemsize bytes
};

class LegacyArchive {
 public:
  // True when `head` (the first bytes of a file) starts with the pickled
  // magic number of the legacy format.
  static bool LooksLegacy(std::string_view head);

  // Opens `path` and reads its pickles and storage records (the main pickle
  // at most `max_pickle_bytes`). Corruption when it is not a legacy
  // torch.save file or its records do not fit the file; NotSupported for a
  // big-endian file or a storage type of unknown size.
  static Result<std::unique_ptr<LegacyArchive>> Open(const std::string& path,
                                                     uint64_t max_pickle_bytes = uint64_t{1} << 30);
  ~LegacyArchive();
  LegacyArchive(const LegacyArchive&) = delete;
  LegacyArchive& operator=(const LegacyArchive&) = delete;

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  // The main pickle's tree; its values' offsets are bytes of the file.
  const pickle::Tree& tree() const { return *tree_; }
  // Where the main pickle lies in the file.
  uint64_t pickle_offset() const { return pickle_offset_; }
  uint64_t pickle_size() const { return pickle_size_; }
  // The storages in file order (the list's order).
  const std::vector<LegacyStorage>& storages() const { return storages_; }
  // nullptr when the file holds no storage `key`.
  const LegacyStorage* Find(const std::string& key) const;

  // Bytes [offset, offset + len) of a storage into dst.
  Status ReadRange(const LegacyStorage& s, uint64_t offset, uint64_t len, uint8_t* dst) const;

 private:
  LegacyArchive(std::string path, int fd, uint64_t size)
      : path_(std::move(path)), fd_(fd), size_(size) {}
  Status ReadAt(uint64_t offset, uint64_t len, uint8_t* dst) const;
  Status Load(uint64_t max_pickle_bytes);
  // The pickle starting at `*pos` (at most `max_bytes`), parsed; `*pos`
  // moves past its STOP.
  Result<std::unique_ptr<pickle::Tree>> ReadPickle(uint64_t* pos, uint64_t max_bytes,
                                                   const std::string& what) const;
  Status Bad(uint64_t at, const std::string& what) const;

  std::string path_;
  int fd_;
  uint64_t size_;
  std::unique_ptr<pickle::Tree> tree_;
  uint64_t pickle_offset_ = 0;
  uint64_t pickle_size_ = 0;
  std::vector<LegacyStorage> storages_;
  std::map<std::string, size_t> by_key_;
};

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_CORE_LEGACY_ARCHIVE_H_
