// The rank side of the node writer (store/node_client.h): finding or
// starting the writer, the ring, the chunk protocol (hash here, ask which
// chunks the store lacks, send only those), commits, and the read views.
#include "store/node_client.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "store/block_codec.h"
#include "store/names.h"
#include "store/node_wire.h"
#include "store/record_check.h"
#include "store/record_codec.h"
#include "store/store_internal.h"

extern char** environ;

namespace ckptkv::node {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

void AnchorForDladdr() {}

bool IsExecutable(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec) && ::access(p.c_str(), X_OK) == 0;
}

Result<std::string> FindWriterProgram(const NodeOptions& o) {
  if (!o.writer_program.empty()) {
    if (!IsExecutable(o.writer_program)) {
      return Status::NotFound("node writer program '" + o.writer_program +
                              "' is not an executable file");
    }
    return o.writer_program;
  }
  if (const char* env = std::getenv("CKPTKV_WRITER"); env != nullptr && *env) {
    if (!IsExecutable(env)) {
      return Status::NotFound(std::string("CKPTKV_WRITER names '") + env +
                              "', which is not an executable file");
    }
    return std::string(env);
  }
  std::vector<fs::path> dirs;
  Dl_info info{};
  if (::dladdr(reinterpret_cast<void*>(&AnchorForDladdr), &info) != 0 && info.dli_fname) {
    std::error_code ec;
    fs::path lib = fs::canonical(info.dli_fname, ec);
    if (!ec) dirs.push_back(lib.parent_path());
  }
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) dirs.push_back(exe.parent_path());
  std::vector<std::string> looked;
  for (const fs::path& d : dirs) {
    for (const fs::path& p : {d / "ckptkvd", d / ".." / "bin" / "ckptkvd", d / "bin" / "ckptkvd"}) {
      if (IsExecutable(p)) return p.lexically_normal().string();
      looked.push_back(p.lexically_normal().string());
    }
  }
  if (const char* path = std::getenv("PATH"); path != nullptr) {
    std::string all(path);
    size_t start = 0;
    while (start <= all.size()) {
      size_t end = all.find(':', start);
      if (end == std::string::npos) end = all.size();
      fs::path p = fs::path(all.substr(start, end - start)) / "ckptkvd";
      if (end > start && IsExecutable(p)) return p.string();
      start = end + 1;
    }
  }
  return Status::NotFound("the node writer program 'ckptkvd' was not found (looked in " +
                          JoinNames(looked, 6) +
                          " and PATH); set CKPTKV_WRITER or NodeOptions::writer_program");
}

// Connects to `path`; the descriptor, or -1 with errno set.
int DialSocket(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    int err = errno;
    ::close(fd);
    errno = err;
    return -1;
  }
  return fd;
}

}  // namespace

Client::Client(std::string dir, StoreOptions options)
    : dir_(std::move(dir)), options_(std::move(options)) {
  peer_ = "the node writer of store '" + dir_ + "'";
}

Client::~Client() {
  if (sock_ >= 0) ::close(sock_);
  if (ring_) ::munmap(ring_, ring_bytes_);
}

Result<std::unique_ptr<Client>> Client::Connect(const std::string& dir,
                                                const StoreOptions& options) {
  const NodeOptions& o = options.node;
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size) {
    return Status::InvalidArgument("node writer: rank " + std::to_string(o.rank) +
                                   " of world size " + std::to_string(o.world_size) +
                                   "; valid: world size >= 1 and 0 <= rank < world size");
  }
  if (o.ring_slots < 1 || o.ring_slots > 64) {
    return Status::InvalidArgument("node writer: ring_slots " + std::to_string(o.ring_slots) +
                                   "; valid: 1 to 64");
  }
  if (!(o.commit_timeout_s >= 0) || o.commit_timeout_s > 1e7) {
    return Status::InvalidArgument("node writer: commit timeout " +
                                   std::to_string(o.commit_timeout_s) +
                                   " s; valid: 0 to 10000000 seconds");
  }
  std::error_code ec;
  if (!fs::exists(dir, ec)) {
    if (!options.create_if_missing) return Status::NotFound("store '" + dir + "' does not exist");
    fs::create_directories(dir, ec);
    if (ec) return Status::IOError("cannot create store directory '" + dir + "': " + ec.message());
  }
  std::unique_ptr<Client> c(new Client(dir, options));
  c->pool_ = std::make_unique<ThreadPool>(options.threads);
  RETURN_IF_ERROR(c->Dial());
  RETURN_IF_ERROR(c->RefreshView());
  return c;
}

Status Client::StartWriter(int dir_fd) {
  (void)dir_fd;
  ASSIGN_OR_RETURN(std::string program, FindWriterProgram(options_.node));
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) {
    return Status::IOError(std::string("pipe: ") + std::strerror(errno));
  }
  ScopedFd read_end(pipefd[0]);
  // Above 3, so that the dup2 onto 3 below is a real one (it clears CLOEXEC).
  ScopedFd write_end(::fcntl(pipefd[1], F_DUPFD_CLOEXEC, 10));
  ::close(pipefd[1]);
  if (write_end.get() < 0) return Status::IOError(std::string("fcntl: ") + std::strerror(errno));
  const std::string log = dir_ + "/" + kLogName;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  posix_spawn_file_actions_adddup2(&fa, write_end.get(), 3);
  char idle[32];
  std::snprintf(idle, sizeof idle, "%g", options_.node.idle_exit_s);
  std::vector<std::string> args = {program, "--db", dir_, "--ready-fd", "3", "--idle-exit", idle};
  std::vector<char*> argv;
  argv.reserve(args.size() + 1);
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, program.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(write_end.release());
  if (rc != 0) {
    return Status::IOError("starting the node writer '" + program + "': " + std::strerror(rc));
  }
  // ckptkvd detaches (its first process exits once the writer runs on its
  // own), then says "ok" on the pipe when it listens, or why it cannot.
  int wstatus = 0;
  while (::waitpid(pid, &wstatus, 0) < 0 && errno == EINTR) {
  }
  std::string said;
  const auto deadline = Clock::now() + std::chrono::seconds(120);
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) break;
    struct pollfd pfd {
      read_end.get(), POLLIN, 0
    };
    if (::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left, 1000))) <= 0) continue;
    char buf[512];
    const ssize_t n = ::read(read_end.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    said.append(buf, static_cast<size_t>(n));
    if (said.size() > 8192) break;
  }
  if (said.rfind("ok", 0) == 0) return Status::OK();
  // "error <code>\n<message>": the writer could not open the store.
  if (said.rfind("error ", 0) == 0) {
    const size_t nl = said.find('\n');
    const int code = std::atoi(said.substr(6, nl == std::string::npos ? 0 : nl - 6).c_str());
    std::string message = nl == std::string::npos ? said : said.substr(nl + 1);
    while (!message.empty() && message.back() == '\n') message.pop_back();
    return MakeStatus(static_cast<uint8_t>(code),
                      "the node writer of store '" + dir_ + "' could not start: " + message);
  }
  return Status::IOError(
      "the node writer '" + program + "' for store '" + dir_ + "' did not start (" +
      (said.empty() ? std::string("it said nothing") : "it said: " + said) + "); its log: " + log);
}

Status Client::Dial() {
  ScopedFd dir_fd(::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.get() < 0) {
    return Status::IOError("opening store directory '" + dir_ + "': " + std::strerror(errno));
  }
  const std::string path = SocketPath(dir_, dir_fd.get());
  const auto deadline = Clock::now() + std::chrono::seconds(180);
  Status last;
  for (int attempt = 0;; ++attempt) {
    if (Clock::now() > deadline) {
      return Status::IOError("cannot reach " + peer_ + ": " + last.ToString());
    }
    ScopedFd sock(DialSocket(path));
    if (sock.get() < 0) {
      const int err = errno;
      if (err != ENOENT && err != ECONNREFUSED) {
        return Status::IOError("connecting to " + peer_ + ": " + std::strerror(err));
      }
      // No writer: start one, under the start lock, unless another rank
      // has just done so.
      ScopedFd lock(
          ::open((dir_ + "/" + kStartLockName).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
      if (lock.get() < 0) {
        return Status::IOError("opening '" + dir_ + "/" + kStartLockName +
                               "': " + std::strerror(errno));
      }
      while (::flock(lock.get(), LOCK_EX) != 0 && errno == EINTR) {
      }
      ScopedFd again(DialSocket(path));
      if (again.get() < 0) {
        Status started = StartWriter(dir_fd.get());
        if (!started.ok()) {
          // Busy: another writer's process still holds the store (one
          // exiting, or a single-process writer): wait for it a while.
          if (!started.IsBusy()) return started;
          last = started;
          std::this_thread::sleep_for(std::chrono::milliseconds(200));
        }
      }
      continue;
    }
    // Hello; a writer that is stopping closes without an answer: retry.
    WireWriter hello(Msg::kHello);
    hello.U32(kProtocolVersion)
        .I32(options_.node.rank)
        .I32(options_.node.world_size)
        .U64(static_cast<uint64_t>(::getpid()));
    Status s = SendFrame(sock.get(), hello.Frame());
    Result<Frame> reply = s.ok() ? RecvFrame(sock.get(), peer_) : Result<Frame>(s);
    if (!reply.ok()) {
      last = reply.status();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    RETURN_IF_ERROR(ReplyStatus(*reply, peer_));
    WireReader r(reply->payload);
    chunk_size_ = r.U32();
    inline_threshold_ = r.U32();
    (void)r.U8();
    writer_pid_ = r.I64();
    RETURN_IF_ERROR(r.Done("hello reply of " + peer_));
    if (chunk_size_ < 4096 || chunk_size_ > kMaxChunkSize || inline_threshold_ > chunk_size_) {
      return Status::IOError(peer_ + " gave chunk size " + std::to_string(chunk_size_) +
                             " and inline threshold " + std::to_string(inline_threshold_));
    }
    peer_ = "the node writer of store '" + dir_ + "' (pid " + std::to_string(writer_pid_) + ")";
    // The ring: sealed so that the writer may map it safely.
    const uint32_t slots = options_.node.ring_slots;
    const size_t bytes = static_cast<size_t>(slots) * chunk_size_;
    ScopedFd mem(::memfd_create("ckptkv-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    if (mem.get() < 0 || ::ftruncate(mem.get(), static_cast<off_t>(bytes)) != 0 ||
        ::fcntl(mem.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
      return Status::IOError(std::string("making the shared-memory ring: ") + std::strerror(errno));
    }
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, mem.get(), 0);
    if (p == MAP_FAILED) {
      return Status::IOError(std::string("mapping the shared-memory ring: ") +
                             std::strerror(errno));
    }
    RETURN_IF_ERROR(SendFrame(sock.get(), WireWriter(Msg::kRing).U32(slots).Frame(), mem.get()));
    Result<Frame> ring_reply = RecvFrame(sock.get(), peer_);
    Status ring_ok = ring_reply.ok() ? ReplyStatus(*ring_reply, peer_) : ring_reply.status();
    if (!ring_ok.ok()) {
      ::munmap(p, bytes);
      return ring_ok;
    }
    if (ring_) ::munmap(ring_, ring_bytes_);
    ring_ = static_cast<uint8_t*>(p);
    ring_bytes_ = bytes;
    slots_ = slots;
    free_slots_.clear();
    for (uint32_t i = slots; i-- > 0;) free_slots_.push_back(i);
    busy_.assign(slots, 0);
    if (sock_ >= 0) ::close(sock_);
    sock_ = sock.release();
    broken_ = false;
    (void)attempt;
    return Status::OK();
  }
}

Status Client::Lost(const Status& s) {
  broken_ = true;
  return Status::IOError(peer_ + " is gone (" + s.message() +
                         "); what this process had not committed is lost; its log: " + dir_ + "/" +
                         kLogName);
}

Result<std::string> Client::Call(const std::string& frame, const std::string& what) {
  if (broken_) return Lost(Status::IOError("an earlier exchange failed"));
  Status s = SendFrame(sock_, frame);
  if (!s.ok()) return Lost(s);
  Result<Frame> reply = RecvFrame(sock_, peer_);
  if (!reply.ok()) return Lost(reply.status());
  RETURN_IF_ERROR(ReplyStatus(*reply, peer_).WithContext(what));
  return std::move(reply->payload);
}

Status Client::Begin(const std::string& tag, const BeginOptions& options) {
  std::lock_guard<std::mutex> lock(mu_);
  if (broken_) RETURN_IF_ERROR(Dial());
  WireWriter w(Msg::kBegin);
  w.Str(tag)
      .U8(options.overwrite ? 1 : 0)
      .U8(options.codec ? 1 : 0)
      .U8(options.codec ? static_cast<uint8_t>(*options.codec) : 0)
      .U8(options.place_after_commit ? 1 : 0);
  return Call(w.Frame(), "create " + Quote(tag)).status();
}

bool Client::IsPending(const std::string& tag) {
  std::lock_guard<std::mutex> lock(mu_);
  Result<std::string> r = Call(WireWriter(Msg::kIsPending).Str(tag).Frame(), "pending query");
  // With the writer gone, the caller's next call (a save, a commit) is
  // the one that says so, rather than "not begun".
  if (!r.ok()) return broken_;
  return r->size() == 1 && (*r)[0] == 1;
}

Status Client::ReapBlock(WriteStats* stats) {
  Result<Frame> reply = RecvFrame(sock_, peer_);
  if (!reply.ok()) return Lost(reply.status());
  WireReader r(reply->payload);
  const uint32_t slot = r.U32();
  const uint8_t code = r.U8();
  std::string message = r.Str();
  const uint64_t stored = r.U64();
  // A reply names a slot in flight (not one answered already).
  if (!r.Done("block reply").ok() || slot >= slots_ || !busy_[slot] ||
      (reply->type != Msg::kOk && reply->type != Msg::kError)) {
    // Not a block reply: the writer refused the message as a whole.
    Status s = ReplyStatus(*reply, peer_);
    return Lost(s.ok() ? Status::IOError("malformed block reply") : s);
  }
  busy_[slot] = 0;
  free_slots_.push_back(slot);
  if (reply->type == Msg::kError) return MakeStatus(code, std::move(message));
  stats->new_blocks += 1;
  stats->stored_new_bytes += stored;
  return Status::OK();
}

Status Client::SendBlocks(const std::string& tag, const uint8_t* const* chunks,
                          const uint64_t* lens, const Digest* digests, size_t n, uint32_t group,
                          WriteStats* stats) {
  // The answers to the blocks still in flight come first: the next reply
  // read must be the query's.
  Status first;
  while (InFlight() > 0) {
    Status s = ReapBlock(stats);
    if (broken_) return s;
    if (first.ok()) first = s;
  }
  RETURN_IF_ERROR(first);
  // Which of them the store lacks.
  WireWriter need(Msg::kNeed);
  need.Str(tag).U32(static_cast<uint32_t>(n));
  for (size_t i = 0; i < n; ++i) need.Raw(digests[i].Key());
  ASSIGN_OR_RETURN(std::string mask, Call(need.Frame(), "block query"));
  if (mask.size() != n) return Lost(Status::IOError("block query answered with a wrong length"));
  for (size_t i = 0; i < n && first.ok(); ++i) {
    if (mask[i] == 0) continue;
    if (free_slots_.empty()) {
      Status s = ReapBlock(stats);
      if (broken_) return s;
      if (first.ok()) first = s;
      if (!first.ok()) break;
    }
    const uint32_t slot = free_slots_.back();
    free_slots_.pop_back();
    busy_[slot] = 1;
    std::memcpy(ring_ + static_cast<size_t>(slot) * chunk_size_, chunks[i], lens[i]);
    WireWriter b(Msg::kBlock);
    b.Str(tag).U32(slot).U32(static_cast<uint32_t>(lens[i])).U32(group).Raw(digests[i].Key());
    Status s = SendFrame(sock_, b.Frame());
    if (!s.ok()) return Lost(s);
    stats->new_bytes += lens[i];
  }
  return first;
}

Result<WriteStats> Client::PutTensor(const std::string& tag, const std::string& file,
                                     const std::string& param, const TensorMeta& meta,
                                     const ByteSource& bytes) {
  const std::string where = TensorName(tag, file, param);
  RETURN_IF_ERROR(CheckPutTensor(where, file, param, meta, bytes));
  WriteStats stats;
  stats.logical_bytes = bytes.length;
  const uint64_t len = bytes.length;
  std::string record;
  std::lock_guard<std::mutex> lock(mu_);
  if (len <= inline_threshold_) {
    ASSIGN_OR_RETURN(record, InlineTensorRecord(meta, bytes, chunk_size_));
  } else {
    const uint64_t cs = chunk_size_;
    const size_t n = (len + cs - 1) / cs;
    std::vector<Digest> digests(n);
    const uint32_t group = GroupElementSize(meta.dtype);
    const size_t window = std::max<size_t>(16, size_t{2} * slots_);
    std::vector<std::string> staging(bytes.data ? 0 : std::min(window, n));
    std::vector<const uint8_t*> ptrs(std::min(window, n));
    std::vector<uint64_t> lens(std::min(window, n));
    Status failed;
    for (size_t base = 0; base < n && failed.ok(); base += window) {
      const size_t m = std::min(window, n - base);
      for (size_t k = 0; k < m; ++k) {
        const size_t i = base + k;
        lens[k] = std::min<uint64_t>(cs, len - i * cs);
        if (bytes.data) {
          ptrs[k] = bytes.data + i * cs;
        } else {
          staging[k].resize(lens[k]);
          failed = bytes.fill(i * cs, lens[k], reinterpret_cast<uint8_t*>(staging[k].data()));
          if (!failed.ok()) break;
          ptrs[k] = reinterpret_cast<const uint8_t*>(staging[k].data());
        }
      }
      if (!failed.ok()) break;
      pool_->ParallelFor(m, [&](size_t k) { digests[base + k] = Digest::Of(ptrs[k], lens[k]); });
      failed = SendBlocks(tag, ptrs.data(), lens.data(), digests.data() + base, m, group, &stats);
      if (broken_) return failed.WithContext(where);
    }
    // Every block in flight is answered before this returns.
    while (InFlight() > 0) {
      Status s = ReapBlock(&stats);
      if (broken_) return s.WithContext(where);
      if (failed.ok()) failed = s;
    }
    RETURN_IF_ERROR(failed.WithContext(where));
    stats.chunks = n;
    record = BuildTensorRecord(meta, len, chunk_size_, digests, nullptr, DigestOfChunks(digests));
  }
  WireWriter w(Msg::kStage);
  w.Str(tag).Str(file).Str(param).Str(record);
  RETURN_IF_ERROR(Call(w.Frame(), where).status());
  return stats;
}

Status Client::PutFile(const std::string& tag, const std::string& file, const std::string& tree) {
  std::lock_guard<std::mutex> lock(mu_);
  return Call(WireWriter(Msg::kPutFile).Str(tag).Str(file).Str(tree).Frame(),
              "saving " + FileName(tag, file))
      .status();
}

Status Client::ClearFile(const std::string& tag, const std::string& file) {
  std::lock_guard<std::mutex> lock(mu_);
  return Call(WireWriter(Msg::kClearFile).Str(tag).Str(file).Frame(), FileName(tag, file)).status();
}

void Client::Abort(const std::string& tag) {
  std::lock_guard<std::mutex> lock(mu_);
  (void)Call(WireWriter(Msg::kAbort).Str(tag).Frame(), "abort");
}

Result<TagInfo> Client::Commit(const std::string& tag, const CommitOptions& options) {
  if (options.restates) {
    return Status::NotSupported("restating tag " + Quote(tag) +
                                " through the node writer; the writer places tags itself");
  }
  Layout layout;
  if (options.layout) layout = *options.layout;
  WireWriter w(Msg::kCommit);
  w.Str(tag)
      .U8(options.overwrite ? 1 : 0)
      .U8(options.set_latest ? 1 : 0)
      .U8(options.layout ? 1 : 0)
      .I32(layout.tp)
      .I32(layout.pp)
      .I32(layout.dp)
      .I32(layout.zero_stage)
      .I64(static_cast<int64_t>(std::llround(options_.node.commit_timeout_s * 1000)));
  std::string payload;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(payload, Call(w.Frame(), "commit of tag " + Quote(tag)));
  }
  WireReader r(payload);
  const std::string bytes = r.Str();
  RETURN_IF_ERROR(r.Done("commit reply of " + peer_));
  const fb::CommitRecord* rec = VerifiedCommitRecord(bytes);
  if (rec == nullptr) return Status::IOError(peer_ + " answered the commit with a bad record");
  TagInfo info = ToTagInfo(*rec);
  // The commit is durable; a view that cannot open now is reopened later.
  (void)RefreshView();
  return info;
}

Status Client::DeleteTag(const std::string& tag) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    RETURN_IF_ERROR(Call(WireWriter(Msg::kDeleteTag).Str(tag).Frame(), "delete").status());
  }
  return RefreshView();
}

Result<std::shared_ptr<Store>> Client::View() {
  {
    std::lock_guard<std::mutex> lock(view_mu_);
    if (view_) return view_;
  }
  RETURN_IF_ERROR(RefreshView());
  std::lock_guard<std::mutex> lock(view_mu_);
  return view_;
}

uint64_t Client::BlockBytesRead() {
  std::lock_guard<std::mutex> lock(view_mu_);
  return bytes_read_before_ + (view_ ? view_->BlockBytesRead() : 0);
}

Status Client::RefreshView() {
  StoreOptions o = options_;
  o.node = NodeOptions();
  o.read_only = true;
  o.create_if_missing = false;
  ASSIGN_OR_RETURN(std::unique_ptr<Store> fresh, Store::Open(dir_, o));
  std::lock_guard<std::mutex> lock(view_mu_);
  if (view_) bytes_read_before_ += view_->BlockBytesRead();
  view_ = std::move(fresh);
  return Status::OK();
}

}  // namespace ckptkv::node

namespace ckptkv {

namespace {

// An integer from the environment: nullopt when unset or empty.
Result<std::optional<int64_t>> EnvInt(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::optional<int64_t>();
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v, &end, 10);
  if (errno != 0 || end == v || *end != '\0' || x < 0 || x > (1 << 20)) {
    return Status::InvalidArgument(std::string("environment variable ") + name + "='" + v +
                                   "' is not a non-negative integer");
  }
  return std::optional<int64_t>(x);
}

}  // namespace

Result<NodeOptions> NodeOptionsFromEnv() {
  NodeOptions o;
  // The ranks of this node as the launchers say them: torchrun
  // (LOCAL_WORLD_SIZE), DeepSpeed's launcher (LOCAL_SIZE), Open MPI; then
  // the job's own, which are the node's only on a single node.
  static constexpr const char* kVars[][2] = {
      {"LOCAL_RANK", "LOCAL_WORLD_SIZE"},
      {"LOCAL_RANK", "LOCAL_SIZE"},
      {"OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"},
      {"RANK", "WORLD_SIZE"}};
  const char* rank_var = nullptr;
  const char* world_var = nullptr;
  std::optional<int64_t> world;
  for (const auto& vars : kVars) {
    ASSIGN_OR_RETURN(world, EnvInt(vars[1]));
    if (world) {
      rank_var = vars[0];
      world_var = vars[1];
      break;
    }
  }
  std::optional<int64_t> rank;
  if (world) {
    ASSIGN_OR_RETURN(rank, EnvInt(rank_var));
  }
  if (world && *world > 1) {
    if (!rank || *rank >= *world) {
      return Status::InvalidArgument(std::string(world_var) + "=" + std::to_string(*world) +
                                     " but " + rank_var + " is " +
                                     (rank ? std::to_string(*rank) : std::string("unset")) +
                                     "; valid: 0 to " + std::to_string(*world - 1));
    }
    o.enabled = true;
    o.world_size = static_cast<int32_t>(*world);
    o.rank = static_cast<int32_t>(*rank);
  }
  if (const char* t = std::getenv("CKPTKV_COMMIT_TIMEOUT"); t != nullptr && *t) {
    char* end = nullptr;
    const double s = std::strtod(t, &end);
    if (end == t || *end != '\0' || !(s >= 0) || s > 1e7) {
      return Status::InvalidArgument(std::string("CKPTKV_COMMIT_TIMEOUT='") + t +
                                     "' is not a number of seconds from 0 to 10000000");
    }
    o.commit_timeout_s = s;
  }
  return o;
}

}  // namespace ckptkv
