// The node writer's wire: framed messages over a Unix stream socket, their
// field encoding, file-descriptor passing, and the files a store directory
// holds for its writer. Private to store/ (node_client.cc, node_writer.cc).
//
// A frame is u32 length (little-endian, of what follows), u8 type, then the
// payload. Both ends treat what they read as untrusted: every length and
// count is checked against the frame before use, and a frame is at most
// kMaxFrame bytes.
#ifndef CKPTKV_STORE_NODE_WIRE_H_
#define CKPTKV_STORE_NODE_WIRE_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "store/digest.h"
#include "store/status.h"

namespace ckptkv::node {

inline constexpr uint32_t kProtocolVersion = 1;
// A state tree of a very large model is the largest message.
inline constexpr uint32_t kMaxFrame = 1u << 30;

// Files of a store directory that belong to its node writer (not to the
// database): the socket, the lock that serializes starting and stopping
// the writer, and the writer's log.
inline constexpr const char* kSocketName = "ckptkvd.sock";
inline constexpr const char* kStartLockName = "ckptkvd.lock";
inline constexpr const char* kLogName = "ckptkvd.log";
bool IsWriterFile(std::string_view name);

enum class Msg : uint8_t {
  // client -> writer
  kHello = 1,  // u32 version, i32 rank, i32 world_size, u64 pid
  kRing,       // u32 slots (the memfd rides along as SCM_RIGHTS)
  kBegin,      // str tag, u8 overwrite, u8 has_codec, u8 codec, u8 place
  kNeed,       // str tag, u32 n, n x 16-byte digest keys
  kBlock,      // str tag, u32 slot, u32 len, u32 group, 16-byte digest key
  kStage,      // str tag, str file, str param, str record, u64 logical, u64 chunks
  kPutFile,    // str tag, str file, str tree
  kClearFile,  // str tag, str file
  kAbort,      // str tag
  kCommit,     // str tag, u8 overwrite, u8 set_latest, u8 has_layout, 4 x i32, i64 timeout_ms
  kIsPending,  // str tag
  kDeleteTag,  // str tag
  // writer -> client
  kOk = 64,  // (reply-specific payload)
  kError,    // u8 code, str message
};

// Appends fields to a message payload.
class WireWriter {
 public:
  explicit WireWriter(Msg type) { buf_.push_back(static_cast<char>(type)); }
  WireWriter& U8(uint8_t v);
  WireWriter& U32(uint32_t v);
  WireWriter& U64(uint64_t v);
  WireWriter& I32(int32_t v) { return U32(static_cast<uint32_t>(v)); }
  WireWriter& I64(int64_t v) { return U64(static_cast<uint64_t>(v)); }
  WireWriter& Str(std::string_view s);  // u32 length + bytes
  WireWriter& Raw(std::string_view s);  // bytes as they are
  // The frame: u32 length, then type and payload.
  std::string Frame() const;

 private:
  std::string buf_;
};

// Reads fields of a received payload; the first short read sets an error
// and every later read returns zero values.
class WireReader {
 public:
  explicit WireReader(std::string_view payload) : p_(payload) {}
  uint8_t U8();
  uint32_t U32();
  uint64_t U64();
  int32_t I32() { return static_cast<int32_t>(U32()); }
  int64_t I64() { return static_cast<int64_t>(U64()); }
  std::string Str();
  std::string_view Raw(size_t n);
  Digest DigestKey();
  bool ok() const { return ok_; }
  size_t left() const { return p_.size(); }
  // InvalidArgument naming `what` when a read ran short or bytes are left.
  Status Done(const std::string& what) const;

 private:
  std::string_view p_;
  bool ok_ = true;
};

// Owns a descriptor: closed when it goes (unless released).
class ScopedFd {
 public:
  explicit ScopedFd(int fd = -1) : fd_(fd) {}
  ~ScopedFd();
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  int get() const { return fd_; }
  int release() {
    const int f = fd_;
    fd_ = -1;
    return f;
  }

 private:
  int fd_;
};

struct Frame {
  Msg type = Msg::kOk;
  std::string payload;
  int fd = -1;  // a descriptor passed with the frame, or -1
};

// Writes the whole frame (and `fd` as SCM_RIGHTS when >= 0). IOError when
// the peer is gone.
Status SendFrame(int sock, const std::string& frame, int fd = -1);
// Reads one frame; IOError with `peer` in the message on EOF or error,
// InvalidArgument for a frame above kMaxFrame or of length 0.
Result<Frame> RecvFrame(int sock, const std::string& peer);

// A reply: kOk with `payload`, or kError carrying `status`.
std::string OkFrame(const std::string& payload = {});
std::string ErrorFrame(const Status& status);
// The Status a reply frame carries (OK for kOk).
Status ReplyStatus(const Frame& f, const std::string& peer);
Status MakeStatus(uint8_t code, std::string message);

// The socket path of store `dir` as bind/connect can take it: the path
// itself when it fits sockaddr_un, otherwise through /proc/self/fd of
// `dir_fd` (an open descriptor of the directory, kept by the caller).
std::string SocketPath(const std::string& dir, int dir_fd);

}  // namespace ckptkv::node

#endif  // CKPTKV_STORE_NODE_WIRE_H_
