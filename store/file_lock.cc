#include "store/file_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace ckptkv {
namespace {

std::string SelfCommandLine() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (char& c : raw) {
    if (c == '\0') c = ' ';
  }
  while (!raw.empty() && raw.back() == ' ') raw.pop_back();
  return raw.substr(0, 200);
}

}  // namespace

Result<std::unique_ptr<FileLock>> FileLock::Acquire(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    return Status::IOError("cannot open store directory '" + dir + "': " + std::strerror(errno));
  }
  const std::string path = dir + "/OWNER";
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    ::close(fd);
    if (err != EWOULDBLOCK) {
      return Status::IOError("cannot lock '" + dir + "': " + std::strerror(err));
    }
    std::ifstream in(path);
    std::string owner((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::istringstream ss(owner);
    long pid = 0;
    std::string cmd;
    ss >> pid;
    std::getline(ss, cmd);
    if (!cmd.empty() && cmd.front() == ' ') cmd.erase(0, 1);
    std::string who;
    if (pid == static_cast<long>(::getpid())) {
      who = "this process (it is already open here)";
    } else if (pid > 0) {
      who = "process " + std::to_string(pid) + (cmd.empty() ? "" : " (" + cmd + ")");
    } else {
      who = "another process";
    }
    return Status::Busy("store '" + dir + "' is locked by " + who +
                        "; close it there, or open it read-only");
  }
  // The lock is held; the owner note is only for messages.
  int owner_fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (owner_fd >= 0) {
    std::string me = std::to_string(::getpid()) + " " + SelfCommandLine() + "\n";
    (void)!::write(owner_fd, me.data(), me.size());
    ::close(owner_fd);
  }
  return std::unique_ptr<FileLock>(new FileLock(fd));
}

FileLock::~FileLock() {
  ::flock(fd_, LOCK_UN);
  ::close(fd_);
}

}  // namespace ckptkv
