#include "checkpoint/core/read_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace ckptkv::checkpoint {

Result<OpenFile> OpenRegularFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return Status::NotFound("'" + path + "' does not exist");
    return Status::IOError("cannot open '" + path + "': " + std::strerror(err));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::InvalidArgument("'" + path + "' is not a regular file");
  }
  return OpenFile{fd, static_cast<uint64_t>(st.st_size)};
}

Status ReadFully(int fd, const std::string& path, uint64_t offset, uint64_t len, uint8_t* dst,
                 bool* ended) {
  *ended = false;
  while (len > 0) {
    const ssize_t got = ::pread(fd, dst, len, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      return Status::IOError("read of '" + path + "' failed: " + std::strerror(errno));
    }
    if (got == 0) {
      *ended = true;
      return Status::OK();
    }
    dst += got;
    offset += static_cast<uint64_t>(got);
    len -= static_cast<uint64_t>(got);
  }
  return Status::OK();
}

}  // namespace ckptkv::checkpoint
