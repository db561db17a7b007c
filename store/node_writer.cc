// The node writer (store/node_writer.h): one thread per client connection,
// the jobs (one per pending tag: which ranks joined it, which committed),
// and the writer's lifetime. Blocks are written with the store's own write
// path (Store::Impl::WriteClaimed) and a tag is committed with its own
// CommitTag: one synced WriteBatch.
//
// Locks, outermost first: jobs_mu_ (the job table, commit waits), a job's
// use_mu (shared by every request that uses its pending tag, exclusive for
// commit and abort, so a pending tag never goes away under a request),
// a job's mu (its claimed blocks), then the store's own locks.
#include "store/node_writer.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "store/names.h"
#include "store/node_wire.h"
#include "store/record_check.h"
#include "store/record_codec.h"
#include "store/store_internal.h"

namespace ckptkv::node {

namespace {

using Clock = std::chrono::steady_clock;

void Log(const std::string& line) {
  char stamp[32];
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  std::strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &tm);
  std::fprintf(stderr, "[%s] ckptkvd %d: %s\n", stamp, static_cast<int>(::getpid()), line.c_str());
  std::fflush(stderr);
}

std::string RankList(const std::vector<int>& ranks) {
  std::string out;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(ranks[i]);
  }
  return out;
}

int64_t SteadyMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now().time_since_epoch())
      .count();
}

// A client's shared-memory ring, mapped read-only.
struct Ring {
  const uint8_t* base = nullptr;
  size_t bytes = 0;
  uint32_t slots = 0;
  ~Ring() {
    if (base) ::munmap(const_cast<uint8_t*>(base), bytes);
  }
};

}  // namespace

struct Conn {
  uint64_t id = 0;
  int fd = -1;
  int64_t pid = 0;
  int32_t rank = -1;
  int32_t world = 0;
  bool hello = false;
  std::unique_ptr<Ring> ring;
  std::string Name() const {
    return "rank " + std::to_string(rank) + " (pid " + std::to_string(pid) + ")";
  }
};

struct Job {
  std::string tag;
  int32_t world = 0;
  std::map<int32_t, uint64_t> joined;  // rank -> connection id
  std::map<int32_t, int64_t> pids;     // rank -> pid, for messages
  std::set<int32_t> committed;
  CommitOptions options;  // merged from the ranks' commits
  bool place = false;
  // Set under jobs_mu_ with use_mu held exclusively.
  std::atomic<bool> finished{false};
  bool committing = false;  // the last rank's commit is running
  Status failed;            // why it was aborted, once finished
  std::optional<TagInfo> info;
  std::shared_mutex use_mu;
  std::mutex mu;
  std::unordered_map<Digest, uint64_t, DigestHash> claimed;  // asked for, not yet written
};

class Writer {
 public:
  Writer(Store& store, WriterOptions options)
      : store_(store), impl_(*store.impl_), options_(std::move(options)) {}
  Status Serve();

 private:
  void RunConn(const std::shared_ptr<Conn>& conn);
  // The reply to one request (a whole frame).
  std::string Handle(Conn& conn, const Frame& f);
  Result<std::string> Hello(Conn& conn, WireReader& r);
  Result<std::string> SetRing(Conn& conn, WireReader& r, int fd);
  Result<std::string> Begin(Conn& conn, WireReader& r);
  Result<std::string> Need(Conn& conn, WireReader& r);
  Result<std::string> Block(Conn& conn, WireReader& r);
  Result<std::string> Stage(Conn& conn, WireReader& r);
  Result<std::string> Commit(Conn& conn, WireReader& r);
  // The live job of `tag` that `conn`'s rank joined.
  Result<std::shared_ptr<Job>> JoinedJob(const Conn& conn, const std::string& tag);
  PendingTag* PendingOf(const std::string& tag);
  // Ends the job with `why` and forgets its pending tag. jobs_mu_ held.
  void AbortLocked(const std::shared_ptr<Job>& job, const Status& why);
  // Commits the job (its last rank has committed). No lock held.
  void CommitJob(const std::shared_ptr<Job>& job);
  Status CheckStagedBlocks(const std::string& tag);
  void Disconnected(const Conn& conn);
  bool Idle();

  Store& store_;
  Store::Impl& impl_;
  WriterOptions options_;
  std::mutex jobs_mu_;
  std::condition_variable jobs_cv_;
  std::map<std::string, std::shared_ptr<Job>> jobs_;
  std::set<uint64_t> live_conns_;  // connections said hello and not gone; under jobs_mu_
  std::atomic<uint64_t> next_conn_{1};
  std::atomic<int> live_{0};
  std::atomic<int64_t> last_activity_ms_{0};
  std::mutex threads_mu_;
  std::vector<std::thread> threads_;
};

Result<std::shared_ptr<Job>> Writer::JoinedJob(const Conn& conn, const std::string& tag) {
  std::lock_guard<std::mutex> lock(jobs_mu_);
  auto it = jobs_.find(tag);
  if (it == jobs_.end()) {
    return Status::FailedPrecondition("tag " + Quote(tag) + " is not being saved; call create(" +
                                      Quote(tag) + ") first");
  }
  const std::shared_ptr<Job>& job = it->second;
  auto j = job->joined.find(conn.rank);
  if (j == job->joined.end() || j->second != conn.id) {
    if (job->finished && !job->failed.ok()) return job->failed;
    return Status::FailedPrecondition(conn.Name() + " has not joined tag " + Quote(tag) +
                                      "; call create(" + Quote(tag) + ") first");
  }
  if (job->finished) {
    if (!job->failed.ok()) return job->failed;
    return Status::FailedPrecondition("tag " + Quote(tag) + " is already committed");
  }
  return job;
}

PendingTag* Writer::PendingOf(const std::string& tag) {
  std::lock_guard<std::mutex> lock(impl_.mu_);
  auto it = impl_.pending_.find(tag);
  return it == impl_.pending_.end() ? nullptr : &it->second;
}

void Writer::AbortLocked(const std::shared_ptr<Job>& job, const Status& why) {
  if (job->finished) return;
  {
    std::unique_lock<std::shared_mutex> use(job->use_mu);
    job->failed = why;
    job->finished = true;
    store_.AbortTag(job->tag);
    std::lock_guard<std::mutex> l(job->mu);
    job->claimed.clear();
  }
  Log("aborted tag " + Quote(job->tag) + ": " + why.message());
  jobs_cv_.notify_all();
}

Result<std::string> Writer::Hello(Conn& conn, WireReader& r) {
  const uint32_t version = r.U32();
  const int32_t rank = r.I32();
  const int32_t world = r.I32();
  const uint64_t pid = r.U64();
  RETURN_IF_ERROR(r.Done("hello"));
  if (conn.hello) return Status::InvalidArgument("a second hello on one connection");
  if (version != kProtocolVersion) {
    return Status::NotSupported("client speaks protocol " + std::to_string(version) +
                                "; this writer speaks " + std::to_string(kProtocolVersion) +
                                " (a ckptkvd of another version holds the store)");
  }
  if (world < 1 || world > 65536 || rank < 0 || rank >= world) {
    return Status::InvalidArgument("rank " + std::to_string(rank) + " of world size " +
                                   std::to_string(world) +
                                   "; valid: world size 1 to 65536, rank 0 to world size - 1");
  }
  if (static_cast<int64_t>(pid) != conn.pid) {
    return Status::InvalidArgument("hello names pid " + std::to_string(pid) +
                                   " but the socket's peer is pid " + std::to_string(conn.pid));
  }
  conn.rank = rank;
  conn.world = world;
  conn.hello = true;
  {
    std::lock_guard<std::mutex> lock(jobs_mu_);
    live_conns_.insert(conn.id);
  }
  return WireWriter(Msg::kOk)
      .U32(impl_.chunk_size_)
      .U32(impl_.inline_threshold_)
      .U8(static_cast<uint8_t>(impl_.codec_))
      .U64(static_cast<uint64_t>(::getpid()))
      .Frame();
}

Result<std::string> Writer::SetRing(Conn& conn, WireReader& r, int fd) {
  const uint32_t slots = r.U32();
  RETURN_IF_ERROR(r.Done("ring"));
  if (fd < 0) return Status::InvalidArgument("ring message without its memory descriptor");
  if (slots < 1 || slots > 64) {
    return Status::InvalidArgument("ring of " + std::to_string(slots) + " slots; valid: 1 to 64");
  }
  // Sealed against shrinking: a ring that shrank under a read would kill
  // the writer with SIGBUS.
  const int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
    return Status::InvalidArgument("ring memory is not sealed against shrinking (F_SEAL_SHRINK)");
  }
  const size_t bytes = static_cast<size_t>(slots) * impl_.chunk_size_;
  struct stat st;
  if (::fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < bytes) {
    return Status::InvalidArgument("ring memory is smaller than " + std::to_string(slots) +
                                   " slots of " + std::to_string(impl_.chunk_size_) + " bytes");
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    return Status::IOError(std::string("mapping the ring of ") + conn.Name() + ": " +
                           std::strerror(errno));
  }
  auto ring = std::make_unique<Ring>();
  ring->base = static_cast<const uint8_t*>(p);
  ring->bytes = bytes;
  ring->slots = slots;
  conn.ring = std::move(ring);
  return OkFrame();
}

Result<std::string> Writer::Begin(Conn& conn, WireReader& r) {
  const std::string tag = r.Str();
  BeginOptions o;
  o.overwrite = r.U8() != 0;
  const bool has_codec = r.U8() != 0;
  const uint8_t codec = r.U8();
  o.place_after_commit = r.U8() != 0;
  RETURN_IF_ERROR(r.Done("create"));
  if (has_codec) o.codec = static_cast<Codec>(codec);
  std::lock_guard<std::mutex> lock(jobs_mu_);
  auto it = jobs_.find(tag);
  if (it != jobs_.end() && !it->second->finished) {
    Job& job = *it->second;
    if (job.world != conn.world) {
      return Status::FailedPrecondition("tag " + Quote(tag) +
                                        " is being saved by a job of world size " +
                                        std::to_string(job.world) + "; " + conn.Name() +
                                        " says world size " + std::to_string(conn.world));
    }
    auto j = job.joined.find(conn.rank);
    if (j != job.joined.end()) {
      if (j->second == conn.id) return OkFrame();  // create again: already joined
      return Status::FailedPrecondition(
          "rank " + std::to_string(conn.rank) + " of tag " + Quote(tag) + " is already pid " +
          std::to_string(job.pids[conn.rank]) + "; every process needs its own rank");
    }
    job.joined[conn.rank] = conn.id;
    job.pids[conn.rank] = conn.pid;
    job.place = job.place || o.place_after_commit;
    return OkFrame();
  }
  if (it != jobs_.end() && !it->second->failed.ok() && !it->second->joined.count(conn.rank)) {
    // A rank late to a tag that was aborted while others of its job are
    // still connected gets that abort: its job is the one that failed. A
    // rank of the aborted attempt (retrying) or of a new job starts anew.
    for (const auto& [rank, id] : it->second->joined) {
      if (live_conns_.count(id)) return it->second->failed;
    }
  }
  // The first rank: the pending tag (BeginTag refuses a committed tag
  // unless overwrite is set).
  RETURN_IF_ERROR(store_.BeginTag(tag, o));
  auto job = std::make_shared<Job>();
  job->tag = tag;
  job->world = conn.world;
  job->joined[conn.rank] = conn.id;
  job->pids[conn.rank] = conn.pid;
  job->place = o.place_after_commit;
  jobs_[tag] = job;
  return OkFrame();
}

Result<std::string> Writer::Need(Conn& conn, WireReader& r) {
  const std::string tag = r.Str();
  const uint32_t n = r.U32();
  if (n > 4096 || r.left() != static_cast<size_t>(n) * 16) {
    return Status::InvalidArgument("block query of " + std::to_string(n) +
                                   " digests does not match its message; valid: up to 4096");
  }
  std::vector<Digest> digests(n);
  for (Digest& d : digests) d = r.DigestKey();
  RETURN_IF_ERROR(r.Done("block query"));
  ASSIGN_OR_RETURN(std::shared_ptr<Job> job, JoinedJob(conn, tag));
  std::shared_lock<std::shared_mutex> use(job->use_mu);
  if (job->finished) return job->failed;
  PendingTag* pending = PendingOf(tag);
  if (pending == nullptr)
    return Status::FailedPrecondition("tag " + Quote(tag) + " is not pending");
  std::string need(n, '\0');
  Status pinned;
  {
    std::shared_lock<std::shared_mutex> gc_guard(impl_.gc_mu_);
    for (uint32_t i = 0; i < n && pinned.ok(); ++i) {
      Result<bool> present = impl_.PinBlock(pending, digests[i], Store::Impl::PinMode::kClaim);
      if (!present.ok()) pinned = present.status();
      if (present.ok() && !*present) need[i] = 1;
    }
  }
  std::lock_guard<std::mutex> l(job->mu);
  for (uint32_t i = 0; i < n; ++i) {
    if (need[i] == 0) {
      // A block this connection claimed and did not send (a save that
      // failed half-way and is tried again) is asked for again.
      auto c = job->claimed.find(digests[i]);
      if (pinned.ok() && c != job->claimed.end() && c->second == conn.id) need[i] = 1;
      continue;
    }
    if (pinned.ok()) {
      job->claimed[digests[i]] = conn.id;
    } else {
      impl_.UnpinBlock(pending, digests[i]);  // nothing claimed on an error
    }
  }
  if (!pinned.ok()) return pinned;
  return WireWriter(Msg::kOk).Raw(need).Frame();
}

Result<std::string> Writer::Block(Conn& conn, WireReader& r) {
  const std::string tag = r.Str();
  const uint32_t slot = r.U32();
  const uint32_t len = r.U32();
  const uint32_t group = r.U32();
  const Digest d = r.DigestKey();
  // Every reply names the slot, so that the client can reuse it: kOk with
  // the stored size, or kError with the code and message.
  auto reply = [&](const Status& s, uint64_t stored) {
    return WireWriter(s.ok() ? Msg::kOk : Msg::kError)
        .U32(slot)
        .U8(static_cast<uint8_t>(s.code()))
        .Str(s.message())
        .U64(stored)
        .Frame();
  };
  if (Status parsed = r.Done("block"); !parsed.ok()) return reply(parsed, 0);
  if (!conn.ring || slot >= conn.ring->slots) {
    return reply(
        Status::InvalidArgument("block in slot " + std::to_string(slot) + " of a ring of " +
                                std::to_string(conn.ring ? conn.ring->slots : 0) + " slots"),
        0);
  }
  if (len == 0 || len > impl_.chunk_size_ ||
      (group != 0 && group != 2 && group != 4 && group != 8)) {
    return reply(
        Status::InvalidArgument("block of " + std::to_string(len) + " bytes, group " +
                                std::to_string(group) + "; valid: 1 to " +
                                std::to_string(impl_.chunk_size_) + " bytes, group 0, 2, 4 or 8"),
        0);
  }
  Result<std::shared_ptr<Job>> found = JoinedJob(conn, tag);
  if (!found.ok()) return reply(found.status(), 0);
  std::shared_ptr<Job> job = *found;
  std::shared_lock<std::shared_mutex> use(job->use_mu);
  if (job->finished) return reply(job->failed, 0);
  {
    std::lock_guard<std::mutex> l(job->mu);
    auto c = job->claimed.find(d);
    if (c == job->claimed.end() || c->second != conn.id) {
      return reply(Status::FailedPrecondition("block " + d.Hex() + " was not asked for by " +
                                              conn.Name() + " (or was sent already)"),
                   0);
    }
  }
  PendingTag* pending = PendingOf(tag);
  if (pending == nullptr) {
    return reply(Status::FailedPrecondition("tag " + Quote(tag) + " is not pending"), 0);
  }
  // Copied out of the ring first: the client cannot change the bytes
  // between the digest check and the write.
  thread_local std::vector<uint8_t> copy;
  copy.assign(conn.ring->base + static_cast<size_t>(slot) * impl_.chunk_size_,
              conn.ring->base + static_cast<size_t>(slot) * impl_.chunk_size_ + len);
  Status st;
  WriteStats stats;
  if (Digest::Of(copy.data(), len) != d) {
    st = Status::InvalidArgument("block in slot " + std::to_string(slot) +
                                 " does not have digest " + d.Hex());
  } else {
    Codec codec;
    {
      std::lock_guard<std::mutex> l(impl_.mu_);
      codec = pending->codec.value_or(impl_.codec_);
    }
    std::shared_lock<std::shared_mutex> gc_guard(impl_.gc_mu_);
    st = impl_.WriteClaimed(pending, codec, group, copy.data(), len, d, &stats);
  }
  {
    std::lock_guard<std::mutex> l(job->mu);
    job->claimed.erase(d);
  }
  if (!st.ok()) {
    impl_.UnpinBlock(pending, d);
    return reply(st, 0);
  }
  {
    std::lock_guard<std::mutex> l(impl_.mu_);
    pending->stats.new_blocks += stats.new_blocks;
    pending->stats.new_bytes += stats.new_bytes;
    pending->stats.stored_new_bytes += stats.stored_new_bytes;
  }
  if (copy.capacity() > (4u << 20)) std::vector<uint8_t>().swap(copy);
  return reply(Status::OK(), stats.stored_new_bytes);
}

Result<std::string> Writer::Stage(Conn& conn, WireReader& r) {
  const std::string tag = r.Str();
  const std::string file = r.Str();
  const std::string param = r.Str();
  const std::string record = r.Str();
  RETURN_IF_ERROR(r.Done("tensor record"));
  RETURN_IF_ERROR(ValidateFile(file));
  RETURN_IF_ERROR(ValidateParam(param));
  const std::string where = TensorName(tag, file, param);
  const fb::TensorRecord* rec = VerifiedTensorRecord(record);
  if (rec == nullptr) return Status::InvalidArgument(where + ": the tensor record is not valid");
  Status checked = CheckTensorRecord(*rec, where);
  if (!checked.ok()) return Status::InvalidArgument(checked.message());
  if (!rec->inline_data() && rec->chunk_size() != impl_.chunk_size_) {
    return Status::InvalidArgument(where + ": record of chunk size " +
                                   std::to_string(rec->chunk_size()) + "; the store's is " +
                                   std::to_string(impl_.chunk_size_));
  }
  ASSIGN_OR_RETURN(std::shared_ptr<Job> job, JoinedJob(conn, tag));
  std::shared_lock<std::shared_mutex> use(job->use_mu);
  if (job->finished) return job->failed;
  std::lock_guard<std::mutex> l(impl_.mu_);
  auto it = impl_.pending_.find(tag);
  if (it == impl_.pending_.end()) {
    return Status::FailedPrecondition("tag " + Quote(tag) + " is not pending");
  }
  PendingTag& pending = it->second;
  uint64_t chunks = 0;
  if (rec->chunks()) {
    for (const auto* c : *rec->chunks()) {
      const Digest d = FromFb(*c);
      if (!pending.pinned.count(d)) {
        return Status::FailedPrecondition(where + ": block " + d.Hex() +
                                          " was neither found nor sent for this tag");
      }
      ++chunks;
    }
  }
  pending.files[file].tensors[param] = record;
  pending.stats.logical_bytes += rec->byte_length();
  pending.stats.chunks += chunks;
  return OkFrame();
}

Status Writer::CheckStagedBlocks(const std::string& tag) {
  std::lock_guard<std::mutex> l(impl_.mu_);
  auto it = impl_.pending_.find(tag);
  if (it == impl_.pending_.end()) {
    return Status::FailedPrecondition("tag " + Quote(tag) + " is not pending");
  }
  for (const auto& [file, pf] : it->second.files) {
    for (const auto& [param, bytes] : pf.tensors) {
      const fb::TensorRecord* rec = VerifiedTensorRecord(bytes);
      if (rec == nullptr || !rec->chunks()) continue;
      for (const auto* c : *rec->chunks()) {
        const Digest d = FromFb(*c);
        if (!it->second.pinned.count(d)) {
          return Status::IOError(TensorName(tag, file, param) + ": block " + d.Hex() +
                                 " was never written (the rank that was sending it failed)");
        }
      }
    }
  }
  return Status::OK();
}

void Writer::CommitJob(const std::shared_ptr<Job>& job) {
  Result<TagInfo> info = Status::OK();
  {
    std::unique_lock<std::shared_mutex> use(job->use_mu);
    Status st;
    {
      std::lock_guard<std::mutex> l(job->mu);
      if (!job->claimed.empty()) {
        st = Status::IOError("tag " + Quote(job->tag) + ": " + std::to_string(job->claimed.size()) +
                             " blocks asked for were never sent (first " +
                             job->claimed.begin()->first.Hex() + ")");
      }
    }
    if (st.ok()) st = CheckStagedBlocks(job->tag);
    info = st.ok() ? store_.CommitTag(job->tag, job->options) : Result<TagInfo>(st);
    if (!info.ok()) store_.AbortTag(job->tag);
  }
  if (info.ok() && job->place && options_.place_after_commit) {
    Status placed = options_.place_after_commit(store_, job->tag);
    if (!placed.ok()) {
      Log("committed tag " + Quote(job->tag) + "; placing it failed: " + placed.ToString());
    } else if (Result<TagInfo> again = store_.GetTag(job->tag); again.ok()) {
      info = std::move(again);
    }
  }
  std::lock_guard<std::mutex> lock(jobs_mu_);
  if (info.ok()) {
    job->info = *info;
    Log("committed tag " + Quote(job->tag) + " of " + std::to_string(job->world) +
        " ranks: " + std::to_string(info->files.size()) + " files, " +
        std::to_string(info->new_bytes) + " new bytes");
  } else {
    job->failed = info.status().WithContext("commit of tag " + Quote(job->tag) + " failed");
    Log(job->failed.message());
  }
  job->finished = true;
  job->committing = false;
  jobs_cv_.notify_all();
}

Result<std::string> Writer::Commit(Conn& conn, WireReader& r) {
  const std::string tag = r.Str();
  const bool overwrite = r.U8() != 0;
  const bool set_latest = r.U8() != 0;
  const bool has_layout = r.U8() != 0;
  Layout layout;
  layout.tp = r.I32();
  layout.pp = r.I32();
  layout.dp = r.I32();
  layout.zero_stage = r.I32();
  const int64_t timeout_ms = r.I64();
  RETURN_IF_ERROR(r.Done("commit"));
  if (timeout_ms < 0 || timeout_ms > 10'000'000'000LL) {
    return Status::InvalidArgument("commit timeout of " + std::to_string(timeout_ms) +
                                   " ms; valid: 0 to 10000000 s");
  }
  std::shared_ptr<Job> job;
  bool last = false;
  {
    std::lock_guard<std::mutex> lock(jobs_mu_);
    auto it = jobs_.find(tag);
    if (it == jobs_.end()) {
      return Status::FailedPrecondition("commit of tag " + Quote(tag) +
                                        " without create; call create(" + Quote(tag) +
                                        ") and save its files first");
    }
    job = it->second;
    auto j = job->joined.find(conn.rank);
    if (j == job->joined.end() || j->second != conn.id) {
      if (job->finished && !job->failed.ok()) return job->failed;
      return Status::FailedPrecondition("commit of tag " + Quote(tag) + " by " + conn.Name() +
                                        ", which has not joined it; call create(" + Quote(tag) +
                                        ") first");
    }
    if (!job->finished) {
      job->committed.insert(conn.rank);
      job->options.overwrite = job->options.overwrite || overwrite;
      job->options.set_latest = job->options.set_latest && set_latest;
      if (job->committed.size() == 1) job->options.set_latest = set_latest;
      if (has_layout) job->options.layout = layout;
      last = static_cast<int32_t>(job->committed.size()) == job->world;
      if (last) job->committing = true;
    }
  }
  if (last) CommitJob(job);
  std::unique_lock<std::mutex> lock(jobs_mu_);
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!job->finished) {
    if (job->committing) {  // the last rank's commit runs: no deadline now
      jobs_cv_.wait(lock);
      continue;
    }
    if (jobs_cv_.wait_until(lock, deadline) == std::cv_status::timeout && !job->finished &&
        !job->committing) {
      std::vector<int> waited, absent;
      for (int32_t k = 0; k < job->world; ++k) {
        if (job->committed.count(k)) continue;
        (job->joined.count(k) ? waited : absent).push_back(k);
      }
      std::string who;
      if (!waited.empty()) who = "rank(s) " + RankList(waited) + " joined but did not commit";
      if (!absent.empty()) {
        who += (who.empty() ? "" : "; ") + std::string("rank(s) ") + RankList(absent) +
               " never joined";
      }
      AbortLocked(job, Status::FailedPrecondition(
                           "tag " + Quote(tag) + " aborted: " + conn.Name() + " waited " +
                           std::to_string(timeout_ms / 1000.0).substr(0, 6) +
                           " s for the other ranks' commits; " + who + " (of world size " +
                           std::to_string(job->world) + "); nothing of the tag is visible"));
    }
  }
  if (!job->failed.ok()) return job->failed;
  return WireWriter(Msg::kOk).Str(BuildCommitRecord(*job->info)).Frame();
}

std::string Writer::Handle(Conn& conn, const Frame& f) {
  // A descriptor that came with the frame is closed after it, whatever it
  // was (the ring is mapped by then; a mapping outlives its descriptor).
  const ScopedFd passed(f.fd);
  WireReader r(f.payload);
  Result<std::string> reply = Status::OK();
  if (f.type != Msg::kHello && !conn.hello) {
    reply = Status::InvalidArgument("the first message must be hello");
  } else {
    switch (f.type) {
      case Msg::kHello:
        reply = Hello(conn, r);
        break;
      case Msg::kRing:
        reply = SetRing(conn, r, f.fd);
        break;
      case Msg::kBegin:
        reply = Begin(conn, r);
        break;
      case Msg::kNeed:
        reply = Need(conn, r);
        break;
      case Msg::kBlock:
        reply = Block(conn, r);
        break;
      case Msg::kStage:
        reply = Stage(conn, r);
        break;
      case Msg::kPutFile:
      case Msg::kClearFile: {
        const std::string tag = r.Str();
        const std::string file = r.Str();
        std::string tree = f.type == Msg::kPutFile ? r.Str() : std::string();
        Status s = r.Done("file");
        Result<std::shared_ptr<Job>> job = s.ok() ? JoinedJob(conn, tag) : s;
        if (!job.ok()) {
          reply = job.status();
          break;
        }
        std::shared_lock<std::shared_mutex> use((*job)->use_mu);
        if ((*job)->finished) {
          reply = (*job)->failed;
        } else {
          s = f.type == Msg::kPutFile ? store_.PutFile(tag, file, std::move(tree))
                                      : store_.ClearFile(tag, file);
          reply = s.ok() ? Result<std::string>(OkFrame()) : Result<std::string>(s);
        }
        break;
      }
      case Msg::kAbort: {
        const std::string tag = r.Str();
        Status s = r.Done("abort");
        if (!s.ok()) {
          reply = s;
          break;
        }
        std::lock_guard<std::mutex> lock(jobs_mu_);
        auto it = jobs_.find(tag);
        if (it != jobs_.end() && it->second->joined.count(conn.rank) &&
            it->second->joined[conn.rank] == conn.id && !it->second->committing) {
          AbortLocked(it->second,
                      Status::FailedPrecondition("tag " + Quote(tag) + " was aborted by " +
                                                 conn.Name() + "; nothing of it is visible"));
        }
        reply = OkFrame();
        break;
      }
      case Msg::kCommit:
        reply = Commit(conn, r);
        break;
      case Msg::kIsPending: {
        const std::string tag = r.Str();
        Status s = r.Done("pending query");
        if (!s.ok()) {
          reply = s;
          break;
        }
        reply = WireWriter(Msg::kOk).U8(JoinedJob(conn, tag).ok() ? 1 : 0).Frame();
        break;
      }
      case Msg::kDeleteTag: {
        const std::string tag = r.Str();
        Status s = r.Done("delete");
        if (s.ok()) {
          std::lock_guard<std::mutex> lock(jobs_mu_);
          auto it = jobs_.find(tag);
          if (it != jobs_.end() && !it->second->finished) {
            s = Status::FailedPrecondition("tag " + Quote(tag) +
                                           " is being saved; delete it after its commit");
          }
        }
        if (s.ok()) s = store_.DeleteTag(tag);
        reply = s.ok() ? Result<std::string>(OkFrame()) : Result<std::string>(s);
        break;
      }
      default:
        reply = Status::InvalidArgument("unknown message type " +
                                        std::to_string(static_cast<int>(f.type)));
    }
  }
  return reply.ok() ? std::move(reply).value() : ErrorFrame(reply.status());
}

void Writer::Disconnected(const Conn& conn) {
  std::lock_guard<std::mutex> lock(jobs_mu_);
  live_conns_.erase(conn.id);
  for (auto& [tag, job] : jobs_) {
    if (job->finished) continue;
    auto j = job->joined.find(conn.rank);
    if (j == job->joined.end() || j->second != conn.id) continue;
    if (job->committed.count(conn.rank)) continue;  // its part is complete
    AbortLocked(job, Status::IOError("tag " + Quote(tag) + " aborted: " + conn.Name() +
                                     " disconnected (exited or died) before its commit; "
                                     "nothing of the tag is visible"));
  }
}

void Writer::RunConn(const std::shared_ptr<Conn>& conn) {
  const std::string peer = "client pid " + std::to_string(conn->pid);
  for (;;) {
    Result<Frame> f = RecvFrame(conn->fd, peer);
    if (!f.ok()) {
      if (f.status().IsInvalidArgument()) {
        (void)SendFrame(conn->fd, ErrorFrame(f.status()));
      }
      break;
    }
    last_activity_ms_ = SteadyMs();
    std::string reply = Handle(*conn, *f);
    if (!SendFrame(conn->fd, reply).ok()) break;
  }
  if (conn->hello) Disconnected(*conn);
  ::close(conn->fd);
  conn->ring.reset();
  last_activity_ms_ = SteadyMs();
  live_ -= 1;
}

bool Writer::Idle() {
  if (live_ > 0) return false;
  std::lock_guard<std::mutex> lock(jobs_mu_);
  for (const auto& [tag, job] : jobs_) {
    if (!job->finished) return false;
  }
  return SteadyMs() - last_activity_ms_ >= static_cast<int64_t>(options_.idle_exit_s * 1000);
}

Status Writer::Serve() {
  const std::string& dir = impl_.dir_;
  auto ready = [&](const Status& s) {
    if (options_.on_ready) options_.on_ready(s);
    return s;
  };
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) {
    return ready(Status::IOError("opening '" + dir + "': " + std::strerror(errno)));
  }
  const ScopedFd dir_closer(dir_fd);
  const std::string path = SocketPath(dir, dir_fd);
  // This process holds the store's lock: a socket already there was left
  // by a writer that died.
  ::unlink(path.c_str());
  const int listen_fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd < 0) return ready(Status::IOError(std::string("socket: ") + std::strerror(errno)));
  const ScopedFd listen_closer(listen_fd);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  const mode_t old_mask = ::umask(077);
  const int bound = ::bind(listen_fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::umask(old_mask);
  if (bound != 0 || ::listen(listen_fd, 128) != 0) {
    return ready(
        Status::IOError("listening at '" + dir + "/" + kSocketName + "': " + std::strerror(errno)));
  }
  Log("serving store '" + dir + "'");
  last_activity_ms_ = SteadyMs();
  (void)ready(Status::OK());
  const std::string lock_path = dir + "/" + kStartLockName;
  int exit_lock = -1;
  for (;;) {
    struct pollfd pfd {
      listen_fd, POLLIN, 0
    };
    const int n = ::poll(&pfd, 1, 100);
    if (n == 0 && Idle()) {
      // Stop under the start lock: a client that finds no socket then
      // waits for that lock before it starts a writer, so it starts one
      // only after this one has let go of the store.
      const int lock_fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
      if (lock_fd >= 0) ::flock(lock_fd, LOCK_EX);
      struct pollfd again {
        listen_fd, POLLIN, 0
      };
      if (::poll(&again, 1, 0) == 0 && Idle()) {
        ::unlink(path.c_str());
        exit_lock = lock_fd;  // held until the store is closed
        break;
      }
      if (lock_fd >= 0) ::close(lock_fd);
      continue;
    }
    if (n <= 0) continue;
    const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    ucred cred{};
    socklen_t cl = sizeof cred;
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) != 0 || cred.uid != ::geteuid()) {
      (void)SendFrame(fd, ErrorFrame(Status::FailedPrecondition(
                              "the node writer serves processes of its own user only")));
      ::close(fd);
      continue;
    }
    auto conn = std::make_shared<Conn>();
    conn->id = next_conn_++;
    conn->fd = fd;
    conn->pid = cred.pid;
    live_ += 1;
    last_activity_ms_ = SteadyMs();
    std::lock_guard<std::mutex> l(threads_mu_);
    threads_.emplace_back([this, conn] { RunConn(conn); });
  }
  {
    std::lock_guard<std::mutex> l(threads_mu_);
    for (std::thread& t : threads_) t.join();
  }
  Log("no clients left; exiting");
  if (options_.on_exit) options_.on_exit();  // the store is closed: store_ is gone
  if (exit_lock >= 0) ::close(exit_lock);    // releases the start lock
  return Status::OK();
}

Status ServeNode(Store& store, const WriterOptions& options) {
  if (store.read_only() || store.through_node_writer()) {
    return Status::InvalidArgument("the node writer needs the store opened for writing here");
  }
  Writer writer(store, options);
  return writer.Serve();
}

}  // namespace ckptkv::node
