// Frames, field codecs and descriptor passing of the node writer's socket.
#include "store/node_wire.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace ckptkv::node {

ScopedFd::~ScopedFd() {
  if (fd_ >= 0) ::close(fd_);
}

bool IsWriterFile(std::string_view name) {
  return name == kSocketName || name == kStartLockName || name == kLogName;
}

WireWriter& WireWriter::U8(uint8_t v) {
  buf_.push_back(static_cast<char>(v));
  return *this;
}

WireWriter& WireWriter::U32(uint32_t v) {
  for (int i = 0; i < 4; ++i) buf_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  return *this;
}

WireWriter& WireWriter::U64(uint64_t v) {
  for (int i = 0; i < 8; ++i) buf_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  return *this;
}

WireWriter& WireWriter::Str(std::string_view s) {
  U32(static_cast<uint32_t>(s.size()));
  buf_.append(s);
  return *this;
}

WireWriter& WireWriter::Raw(std::string_view s) {
  buf_.append(s);
  return *this;
}

std::string WireWriter::Frame() const {
  std::string out;
  out.reserve(4 + buf_.size());
  const auto n = static_cast<uint32_t>(buf_.size());
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += buf_;
  return out;
}

std::string_view WireReader::Raw(size_t n) {
  if (!ok_ || p_.size() < n) {
    ok_ = false;
    p_ = {};
    return {};
  }
  std::string_view out = p_.substr(0, n);
  p_.remove_prefix(n);
  return out;
}

uint8_t WireReader::U8() {
  std::string_view b = Raw(1);
  return b.empty() ? 0 : static_cast<uint8_t>(b[0]);
}

uint32_t WireReader::U32() {
  std::string_view b = Raw(4);
  if (b.empty()) return 0;
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<uint8_t>(b[i])) << (8 * i);
  return v;
}

uint64_t WireReader::U64() {
  std::string_view b = Raw(8);
  if (b.empty()) return 0;
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(static_cast<uint8_t>(b[i])) << (8 * i);
  return v;
}

std::string WireReader::Str() {
  const uint32_t n = U32();
  return std::string(Raw(n));
}

Digest WireReader::DigestKey() {
  Digest d;
  std::string_view k = Raw(16);
  if (!k.empty() && !Digest::FromKey(k, &d)) ok_ = false;
  return d;
}

Status WireReader::Done(const std::string& what) const {
  if (!ok_) return Status::InvalidArgument(what + ": the message is shorter than its fields");
  if (!p_.empty()) {
    return Status::InvalidArgument(what + ": " + std::to_string(p_.size()) +
                                   " bytes follow the message's fields");
  }
  return Status::OK();
}

Status MakeStatus(uint8_t code, std::string message) {
  if (code > static_cast<uint8_t>(Status::Code::kResourceExhausted)) {
    return Status::InvalidArgument("error of unknown code " + std::to_string(code) + ": " +
                                   message);
  }
  if (code == 0) return Status::IOError("error reply without a code: " + message);
  return Status::FromCode(static_cast<Status::Code>(code), std::move(message));
}

std::string OkFrame(const std::string& payload) {
  return WireWriter(Msg::kOk).Raw(payload).Frame();
}

std::string ErrorFrame(const Status& status) {
  return WireWriter(Msg::kError)
      .U8(static_cast<uint8_t>(status.code()))
      .Str(status.message())
      .Frame();
}

Status ReplyStatus(const Frame& f, const std::string& peer) {
  if (f.type == Msg::kOk) return Status::OK();
  if (f.type != Msg::kError) {
    return Status::IOError(peer + " sent message type " + std::to_string(static_cast<int>(f.type)) +
                           " where a reply was due");
  }
  WireReader r(f.payload);
  const uint8_t code = r.U8();
  std::string message = r.Str();
  RETURN_IF_ERROR(r.Done("error reply of " + peer));
  return MakeStatus(code, std::move(message));
}

Status SendFrame(int sock, const std::string& frame, int fd) {
  size_t off = 0;
  while (off < frame.size()) {
    struct iovec iov;
    iov.iov_base = const_cast<char*>(frame.data() + off);
    iov.iov_len = frame.size() - off;
    struct msghdr msg;
    std::memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    if (fd >= 0 && off == 0) {
      std::memset(control, 0, sizeof control);
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::IOError(std::string("sending to the node writer's socket: ") +
                             std::strerror(errno));
    }
    off += static_cast<size_t>(n);
  }
  return Status::OK();
}

namespace {

// Reads exactly n bytes; the first read also takes a passed descriptor.
Status RecvExact(int sock, char* dst, size_t n, int* fd, const std::string& peer) {
  size_t off = 0;
  while (off < n) {
    struct iovec iov;
    iov.iov_base = dst + off;
    iov.iov_len = n - off;
    struct msghdr msg;
    std::memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t got = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (got < 0) {
      if (errno == EINTR) continue;
      return Status::IOError("reading from " + peer + ": " + std::strerror(errno));
    }
    for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
          c->cmsg_len >= CMSG_LEN(sizeof(int))) {
        const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; ++i) {
          int passed;
          std::memcpy(&passed, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
          if (fd != nullptr && *fd < 0) {
            *fd = passed;
          } else {
            ::close(passed);  // one descriptor per frame at most
          }
        }
      }
    }
    if (got == 0) {
      return Status::IOError(peer + " closed the connection" +
                             (off == 0 ? "" : " in the middle of a message"));
    }
    off += static_cast<size_t>(got);
  }
  return Status::OK();
}

}  // namespace

Result<Frame> RecvFrame(int sock, const std::string& peer) {
  Frame f;
  char len_bytes[4];
  Status s = RecvExact(sock, len_bytes, 4, &f.fd, peer);
  if (s.ok()) {
    uint32_t n = 0;
    for (int i = 0; i < 4; ++i) {
      n |= static_cast<uint32_t>(static_cast<uint8_t>(len_bytes[i])) << (8 * i);
    }
    if (n == 0 || n > kMaxFrame) {
      s = Status::InvalidArgument(peer + " sent a frame of " + std::to_string(n) +
                                  " bytes; valid: 1 to " + std::to_string(kMaxFrame));
    } else {
      // Grown as the bytes arrive: a length alone never allocates.
      std::string body;
      for (size_t got = 0; s.ok() && got < n;) {
        const size_t piece = std::min<size_t>(n - got, 4u << 20);
        body.resize(got + piece);
        s = RecvExact(sock, body.data() + got, piece, &f.fd, peer);
        got += piece;
      }
      if (s.ok()) {
        f.type = static_cast<Msg>(static_cast<uint8_t>(body[0]));
        f.payload = body.substr(1);
      }
    }
  }
  if (!s.ok()) {
    if (f.fd >= 0) ::close(f.fd);
    return s;
  }
  return f;
}

std::string SocketPath(const std::string& dir, int dir_fd) {
  std::string direct = dir + "/" + kSocketName;
  if (direct.size() < sizeof(sockaddr_un::sun_path)) return direct;
  return "/proc/self/fd/" + std::to_string(dir_fd) + "/" + kSocketName;
}

}  // namespace ckptkv::node
