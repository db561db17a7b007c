// A regular file opened read-only, and exact reads of its byte ranges: the
// one way the torch.save readers (zip_archive.h, legacy_archive.h) open
// and read a file.
#ifndef CKPTKV_CHECKPOINT_CORE_READ_FILE_H_
#define CKPTKV_CHECKPOINT_CORE_READ_FILE_H_

#include <cstdint>
#include <string>

#include "store/status.h"

namespace ckptkv::checkpoint {

struct OpenFile {
  int fd = -1;
  uint64_t size = 0;  // at open
};

// NotFound when `path` is absent, InvalidArgument when it is not a regular
// file, IOError otherwise. The caller closes the descriptor.
Result<OpenFile> OpenRegularFile(const std::string& path);

// Reads exactly `len` bytes at `offset` into `dst`, retrying short reads
// and EINTR. IOError naming `path` when a read fails; `*ended` is set (and
// OK returned) when the file ends first.
Status ReadFully(int fd, const std::string& path, uint64_t offset, uint64_t len, uint8_t* dst,
                 bool* ended);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_CORE_READ_FILE_H_
