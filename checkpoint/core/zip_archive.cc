#include "checkpoint/core/zip_archive.h"
#include "checkpoint/core/read_file.h"

#include <unistd.h>

#include <array>

namespace ckptkv::checkpoint {
namespace {

constexpr uint32_t kEndSig = 0x06054b50;
constexpr uint32_t kEnd64Sig = 0x06064b50;
constexpr uint32_t kEnd64LocatorSig = 0x07064b50;
constexpr uint32_t kCentralSig = 0x02014b50;
constexpr uint32_t kLocalSig = 0x04034b50;

uint64_t Le(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::array<uint32_t, 256> CrcTable() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    t[i] = c;
  }
  return t;
}

}  // namespace

uint32_t Crc32(const uint8_t* data, size_t n, uint32_t crc) {
  static const std::array<uint32_t, 256> kTable = CrcTable();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = kTable[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

Result<std::unique_ptr<ZipArchive>> ZipArchive::Open(const std::string& path,
                                                     uint64_t max_entries) {
  ASSIGN_OR_RETURN(OpenFile f, OpenRegularFile(path));
  std::unique_ptr<ZipArchive> z(new ZipArchive(path, f.fd, f.size));
  RETURN_IF_ERROR(z->Load(max_entries));
  return z;
}

ZipArchive::~ZipArchive() { ::close(fd_); }

Status ZipArchive::Bad(uint64_t at, const std::string& what) const {
  return Status::Corruption("'" + path_ + "': zip at byte " + std::to_string(at) + ": " + what);
}

Status ZipArchive::ReadAt(uint64_t offset, uint64_t len, uint8_t* dst) const {
  if (offset > size_ || len > size_ - offset) {
    return Bad(offset, "reads " + std::to_string(len) + " bytes past the end of the file (" +
                           std::to_string(size_) + " bytes)");
  }
  bool ended = false;
  RETURN_IF_ERROR(ReadFully(fd_, path_, offset, len, dst, &ended));
  return ended ? Bad(offset, "the file ended early") : Status::OK();
}

Status ZipArchive::Load(uint64_t max_entries) {
  if (size_ < 22) return Bad(0, "too short for a zip file (" + std::to_string(size_) + " bytes)");
  // The end record: 22 bytes plus a comment of at most 65535.
  const uint64_t tail_len = std::min<uint64_t>(size_, 22 + 65535);
  std::vector<uint8_t> tail(tail_len);
  RETURN_IF_ERROR(ReadAt(size_ - tail_len, tail_len, tail.data()));
  int64_t end = -1;
  for (int64_t i = static_cast<int64_t>(tail_len) - 22; i >= 0; --i) {
    const uint8_t* p = tail.data() + i;
    if (Le(p, 4) == kEndSig && static_cast<uint64_t>(i) + 22 + Le(p + 20, 2) == tail_len) {
      end = i;
      break;
    }
  }
  if (end < 0) return Bad(size_, "no end-of-central-directory record: not a zip file");
  const uint8_t* e = tail.data() + end;
  const uint64_t end_at = size_ - tail_len + static_cast<uint64_t>(end);
  uint64_t count = Le(e + 10, 2);
  uint64_t cd_size = Le(e + 12, 4);
  uint64_t cd_offset = Le(e + 16, 4);
  if (Le(e + 4, 2) != 0 || Le(e + 6, 2) != 0) return Bad(end_at, "a multi-disk archive");
  if (count == 0xFFFF || cd_size == 0xFFFFFFFF || cd_offset == 0xFFFFFFFF) {
    if (end_at < 20) return Bad(end_at, "ZIP64 values without a ZIP64 locator");
    uint8_t loc[20];
    RETURN_IF_ERROR(ReadAt(end_at - 20, 20, loc));
    if (Le(loc, 4) != kEnd64LocatorSig) return Bad(end_at - 20, "ZIP64 locator missing");
    const uint64_t end64_at = Le(loc + 8, 8);
    uint8_t e64[56];
    RETURN_IF_ERROR(ReadAt(end64_at, 56, e64));
    if (Le(e64, 4) != kEnd64Sig) return Bad(end64_at, "ZIP64 end record missing");
    count = Le(e64 + 32, 8);
    cd_size = Le(e64 + 40, 8);
    cd_offset = Le(e64 + 48, 8);
  }
  if (count > max_entries) {
    return Bad(end_at, std::to_string(count) + " entries; at most " + std::to_string(max_entries) +
                           " are read");
  }
  if (cd_offset > size_ || cd_size > size_ - cd_offset) {
    return Bad(end_at, "the central directory [" + std::to_string(cd_offset) + ", +" +
                           std::to_string(cd_size) + ") is outside the file");
  }
  // Every entry takes at least 46 bytes of the directory.
  if (count > cd_size / 46 + 1) return Bad(end_at, "more entries than the directory can hold");
  std::vector<uint8_t> cd(cd_size);
  RETURN_IF_ERROR(ReadAt(cd_offset, cd_size, cd.data()));
  uint64_t pos = 0;
  entries_.reserve(count);
  for (uint64_t n = 0; n < count; ++n) {
    const uint64_t at = cd_offset + pos;
    if (cd_size - pos < 46) return Bad(at, "a directory entry is cut short");
    const uint8_t* c = cd.data() + pos;
    if (Le(c, 4) != kCentralSig) return Bad(at, "a directory entry without its signature");
    ZipEntry z;
    const uint64_t flags = Le(c + 8, 2);
    z.method = static_cast<uint16_t>(Le(c + 10, 2));
    z.crc32 = static_cast<uint32_t>(Le(c + 16, 4));
    uint64_t comp = Le(c + 20, 4);
    uint64_t uncomp = Le(c + 24, 4);
    const uint64_t name_len = Le(c + 28, 2);
    const uint64_t extra_len = Le(c + 30, 2);
    const uint64_t comment_len = Le(c + 32, 2);
    uint64_t local = Le(c + 42, 4);
    if (cd_size - pos - 46 < name_len + extra_len + comment_len) {
      return Bad(at, "a directory entry's name or fields run past the directory");
    }
    if (flags & 1) return Bad(at, "an encrypted entry");
    z.name.assign(reinterpret_cast<const char*>(c + 46), name_len);
    // ZIP64 extra field: the values saturated in the fixed fields, in order.
    const uint8_t* x = c + 46 + name_len;
    for (uint64_t off = 0; off + 4 <= extra_len;) {
      const uint64_t id = Le(x + off, 2);
      const uint64_t len = Le(x + off + 2, 2);
      if (off + 4 + len > extra_len) return Bad(at, "an extra field runs past its entry");
      if (id == 1) {
        const uint8_t* v = x + off + 4;
        uint64_t used = 0;
        auto next = [&](uint64_t* field) -> Status {
          if (*field != 0xFFFFFFFF) return Status::OK();
          if (used + 8 > len) return Bad(at, "a ZIP64 extra field is too short");
          *field = Le(v + used, 8);
          used += 8;
          return Status::OK();
        };
        RETURN_IF_ERROR(next(&uncomp));
        RETURN_IF_ERROR(next(&comp));
        RETURN_IF_ERROR(next(&local));
      }
      off += 4 + len;
    }
    z.size = uncomp;
    if (z.method == 0 && comp != uncomp) {
      return Bad(at, "stored entry " + z.name + " has sizes " + std::to_string(comp) + " and " +
                         std::to_string(uncomp));
    }
    uint8_t lh[30];
    RETURN_IF_ERROR(ReadAt(local, 30, lh));
    if (Le(lh, 4) != kLocalSig) return Bad(local, "entry " + z.name + " has no local header");
    z.data_offset = local + 30 + Le(lh + 26, 2) + Le(lh + 28, 2);
    if (z.data_offset > size_ || comp > size_ - z.data_offset) {
      return Bad(local, "entry " + z.name + " (" + std::to_string(comp) +
                            " bytes) runs past the end of the file");
    }
    if (!by_name_.emplace(z.name, entries_.size()).second) {
      return Bad(at, "entry " + z.name + " appears twice");
    }
    entries_.push_back(std::move(z));
    pos += 46 + name_len + extra_len + comment_len;
  }
  return Status::OK();
}

const ZipEntry* ZipArchive::Find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &entries_[it->second];
}

std::string ZipArchive::Prefix() const {
  if (entries_.empty()) return "";
  const std::string& n = entries_.front().name;
  const size_t slash = n.find('/');
  return slash == std::string::npos ? "" : n.substr(0, slash);
}

Status ZipArchive::ReadRange(const ZipEntry& e, uint64_t offset, uint64_t len, uint8_t* dst) const {
  if (e.method != 0) {
    return Status::NotSupported("'" + path_ + "': entry " + e.name + " is compressed (method " +
                                std::to_string(e.method) + "); torch.save stores entries");
  }
  if (offset > e.size || len > e.size - offset) {
    return Bad(e.data_offset, "a read of [" + std::to_string(offset) + ", +" + std::to_string(len) +
                                  ") of entry " + e.name + " (" + std::to_string(e.size) +
                                  " bytes)");
  }
  return ReadAt(e.data_offset + offset, len, dst);
}

Result<std::string> ZipArchive::Read(const ZipEntry& e, uint64_t max_bytes) const {
  if (e.size > max_bytes) {
    return Status::ResourceExhausted("'" + path_ + "': entry " + e.name + " holds " +
                                     std::to_string(e.size) + " bytes; at most " +
                                     std::to_string(max_bytes) + " are read whole");
  }
  std::string out(e.size, '\0');
  RETURN_IF_ERROR(ReadRange(e, 0, e.size, reinterpret_cast<uint8_t*>(out.data())));
  if (Crc32(reinterpret_cast<const uint8_t*>(out.data()), out.size()) != e.crc32) {
    return Bad(e.data_offset, "entry " + e.name + " fails its CRC-32");
  }
  return out;
}

}  // namespace ckptkv::checkpoint
