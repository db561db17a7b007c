// The node writer (store/node_writer.h) served from a thread of this
// process, with ranks as Stores opened through it (store/node_client.h)
// and as raw sockets that send what no client would: the commit protocol
// (every rank commits, or nobody does), dedup across ranks, and a writer
// that answers hostile frames with errors and keeps serving.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "store/digest.h"
#include "store/node_wire.h"
#include "store/node_writer.h"
#include "store/record_codec.h"
#include "store/store.h"
#include "tests/store_util.h"
#include "tests/test_util.h"

using namespace ckptkv;
using ckptkv::testing::EmptyTree;
using ckptkv::testing::PutBytes;
using ckptkv::testing::TempDir;

namespace {

constexpr uint32_t kChunk = 64 * 1024;

// A writer serving `dir` from a thread until its clients have gone.
class ServedStore {
 public:
  explicit ServedStore(const std::string& dir) {
    StoreOptions o;
    o.chunk_size = kChunk;
    o.inline_threshold = 256;
    auto s = Store::Open(dir, o);
    REQUIRE(s.ok());
    store_ = std::move(s).value();
    node::WriterOptions wo;
    wo.idle_exit_s = 0.2;
    wo.on_ready = [this](const Status& st) {
      std::lock_guard<std::mutex> l(mu_);
      ready_ = true;
      ready_status_ = st;
      cv_.notify_all();
    };
    thread_ = std::thread([this, wo] { served_ = node::ServeNode(*store_, wo); });
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [this] { return ready_; });
    REQUIRE(ready_status_.ok());
  }
  ~ServedStore() { Join(); }
  // Waits for the writer to stop (every client must have closed).
  Status Join() {
    if (thread_.joinable()) thread_.join();
    store_.reset();
    return served_;
  }

 private:
  std::unique_ptr<Store> store_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool ready_ = false;
  Status ready_status_;
  Status served_;
};

StoreOptions Rank(int rank, int world, double timeout_s = 30) {
  StoreOptions o;
  o.node.enabled = true;
  o.node.rank = rank;
  o.node.world_size = world;
  o.node.commit_timeout_s = timeout_s;
  o.node.ring_slots = 2;  // fewer slots than chunks: the ring wraps
  return o;
}

std::unique_ptr<Store> Join(const std::string& dir, int rank, int world, double timeout_s = 30) {
  auto s = Store::Open(dir, Rank(rank, world, timeout_s));
  INFO(s.status().ToString());
  REQUIRE(s.ok());
  REQUIRE((*s)->through_node_writer());
  return std::move(s).value();
}

std::vector<uint8_t> Bytes(uint64_t seed, size_t n) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& x : v) x = static_cast<uint8_t>(rng());
  return v;
}

// One rank's part of a tag: a shared tensor (the same on every rank) and
// its own; then the commit, whose result (or error) lands in *out.
void SaveRank(Store& s, const std::string& tag, int rank, Result<TagInfo>* out) {
  Status st = s.BeginTag(tag, false);
  const std::string file = "rank" + std::to_string(rank) + ".pt";
  if (st.ok()) st = PutBytes(s, tag, file, "shared", Bytes(1, 5 * kChunk + 7)).status();
  if (st.ok()) st = PutBytes(s, tag, file, "own", Bytes(100 + rank, 3 * kChunk)).status();
  if (st.ok()) st = PutBytes(s, tag, file, "small", Bytes(200 + rank, 100)).status();
  // More chunks than one query window (16) holds: the answers to a window's
  // blocks in flight come before the next window's query is answered.
  if (st.ok()) st = PutBytes(s, tag, file, "long", Bytes(300 + rank, 40 * kChunk + 1)).status();
  if (st.ok()) st = s.PutFile(tag, file, EmptyTree());
  *out = st.ok() ? s.CommitTag(tag, CommitOptions()) : Result<TagInfo>(st);
}

// A raw connection that has said hello as `rank` of `world`.
class RawClient {
 public:
  RawClient(const std::string& dir, int rank, int world) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    const std::string path = dir + "/" + node::kSocketName;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    REQUIRE(::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    if (rank >= 0) {
      node::WireWriter w(node::Msg::kHello);
      w.U32(node::kProtocolVersion).I32(rank).I32(world).U64(::getpid());
      REQUIRE(Call(w.Frame()).ok());
    }
  }
  ~RawClient() { ::close(fd_); }
  Status Call(const std::string& frame, int fd = -1) {
    Status s = node::SendFrame(fd_, frame, fd);
    if (!s.ok()) return s;
    auto f = node::RecvFrame(fd_, "writer");
    if (!f.ok()) return f.status();
    last_ = *f;
    return node::ReplyStatus(*f, "writer");
  }
  // A block's reply names its slot before the status.
  Status BlockCall(const std::string& frame) {
    Status s = node::SendFrame(fd_, frame);
    if (!s.ok()) return s;
    auto f = node::RecvFrame(fd_, "writer");
    if (!f.ok()) return f.status();
    node::WireReader r(f->payload);
    (void)r.U32();
    const uint8_t code = r.U8();
    std::string message = r.Str();
    (void)r.U64();
    if (!r.Done("block reply").ok()) return Status::IOError("malformed block reply");
    return f->type == node::Msg::kOk ? Status::OK() : node::MakeStatus(code, message);
  }
  const node::Frame& last() const { return last_; }

 private:
  int fd_ = -1;
  node::Frame last_;
};

}  // namespace

TEST_CASE("four ranks commit one tag together, the shared bytes stored once", "[node]") {
  TempDir dir;
  ServedStore served(dir.path());
  constexpr int kWorld = 4;
  std::vector<std::unique_ptr<Store>> ranks;
  ranks.reserve(kWorld);
  for (int r = 0; r < kWorld; ++r) ranks.push_back(Join(dir.path(), r, kWorld));
  std::vector<Result<TagInfo>> results(kWorld, Status::OK());
  std::vector<std::thread> threads;
  threads.reserve(kWorld);
  for (int r = 0; r < kWorld; ++r) {
    threads.emplace_back([&, r] { SaveRank(*ranks[r], "t1", r, &results[r]); });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < kWorld; ++r) {
    INFO("rank " << r << ": " << results[r].status().ToString());
    REQUIRE(results[r].ok());
    CHECK(results[r]->sequence == results[0]->sequence);
  }
  const TagInfo& info = *results[0];
  CHECK(info.files.size() == kWorld);
  CHECK(info.tensors == 4 * kWorld);
  // shared: 6 chunks once; own: 3 chunks per rank; long: 41 per rank.
  CHECK(info.new_blocks == 6 + (3 + 41) * kWorld);
  CHECK(info.new_bytes == (5 * kChunk + 7) + (3 * kChunk + 40 * kChunk + 1) * kWorld);
  CHECK(info.logical_bytes == kWorld * (5 * kChunk + 7 + 3 * kChunk + 100 + 40 * kChunk + 1));
  // Every rank reads every rank's file through its own view.
  for (int r = 0; r < kWorld; ++r) {
    for (int k = 0; k < kWorld; ++k) {
      const std::string file = "rank" + std::to_string(k) + ".pt";
      auto rec = ranks[r]->GetTensorRecord("t1", file, "own");
      REQUIRE(rec.ok());
      std::vector<uint8_t> got(3 * kChunk);
      REQUIRE(ranks[r]->ReadTensor(*rec.value().get(), got.data(), got.size(), "own").ok());
      CHECK(got == Bytes(100 + k, 3 * kChunk));
    }
  }
  auto latest = ranks[2]->Latest();
  REQUIRE(latest.ok());
  CHECK(latest->value_or("") == "t1");
  auto report = ranks[1]->Verify();
  REQUIRE(report.ok());
  CHECK(report->ok());
  // A second tag of the same bytes costs nothing new.
  threads.clear();
  for (int r = 0; r < kWorld; ++r) {
    threads.emplace_back([&, r] { SaveRank(*ranks[r], "t2", r, &results[r]); });
  }
  for (auto& t : threads) t.join();
  REQUIRE(results[3].ok());
  CHECK(results[3]->new_bytes == 0);
  // Not through the writer: gc, and the link of records.
  CHECK(ranks[0]->Gc().status().code() == Status::Code::kNotSupported);
  ranks.clear();
  REQUIRE(served.Join().ok());
}

TEST_CASE("a rank that closes before its commit aborts the tag for every rank", "[node]") {
  TempDir dir;
  ServedStore served(dir.path());
  auto r0 = Join(dir.path(), 0, 2);
  auto r1 = Join(dir.path(), 1, 2);
  REQUIRE(r1->BeginTag("t", false).ok());
  REQUIRE(PutBytes(*r1, "t", "rank1.pt", "x", Bytes(5, 2 * kChunk)).ok());
  Result<TagInfo> committed = Status::OK();
  std::thread t0([&] { SaveRank(*r0, "t", 0, &committed); });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  r1.reset();  // the process of rank 1 exits without committing
  t0.join();
  REQUIRE_FALSE(committed.ok());
  INFO(committed.status().ToString());
  CHECK(committed.status().message().find("rank 1") != std::string::npos);
  CHECK(committed.status().message().find("nothing of the tag is visible") != std::string::npos);
  CHECK(r0->GetTag("t").status().IsNotFound());
  // A rank of another job may start the tag afresh once that job is gone.
  auto again0 = Join(dir.path(), 0, 1);
  Result<TagInfo> alone = Status::OK();
  SaveRank(*again0, "t", 0, &alone);
  INFO(alone.status().ToString());
  CHECK(alone.ok());
  r0.reset();
  again0.reset();
  REQUIRE(served.Join().ok());
}

TEST_CASE("a rank that never commits times the others out, naming it", "[node]") {
  TempDir dir;
  ServedStore served(dir.path());
  auto r0 = Join(dir.path(), 0, 3, /*timeout_s=*/0.5);
  auto r1 = Join(dir.path(), 1, 3);
  REQUIRE(r1->BeginTag("t", false).ok());
  Result<TagInfo> committed = Status::OK();
  SaveRank(*r0, "t", 0, &committed);
  REQUIRE_FALSE(committed.ok());
  INFO(committed.status().ToString());
  CHECK(committed.status().message().find("rank(s) 1 joined but did not commit") !=
        std::string::npos);
  CHECK(committed.status().message().find("rank(s) 2 never joined") != std::string::npos);
  // Rank 1's next call learns of the abort; rank 2, late, too.
  Status late = PutBytes(*r1, "t", "rank1.pt", "x", Bytes(5, 100)).status();
  CHECK(late.message().find("aborted") != std::string::npos);
  auto r2 = Join(dir.path(), 2, 3);
  CHECK(r2->BeginTag("t", false).message().find("aborted") != std::string::npos);
  r0.reset();
  r1.reset();
  r2.reset();
  REQUIRE(served.Join().ok());
}

TEST_CASE("the writer answers hostile frames with errors and keeps serving", "[node][hostile]") {
  TempDir dir;
  ServedStore served(dir.path());
  {
    RawClient raw(dir.path(), -1, 0);
    // Anything before hello, and a hello that lies about its pid or rank.
    CHECK(raw.Call(node::WireWriter(node::Msg::kBegin).Str("t").Frame()).IsInvalidArgument());
    node::WireWriter liar(node::Msg::kHello);
    liar.U32(node::kProtocolVersion).I32(0).I32(1).U64(::getpid() + 1);
    CHECK(raw.Call(liar.Frame()).message().find("pid") != std::string::npos);
    node::WireWriter bad_rank(node::Msg::kHello);
    bad_rank.U32(node::kProtocolVersion).I32(5).I32(2).U64(::getpid());
    CHECK(raw.Call(bad_rank.Frame()).IsInvalidArgument());
    node::WireWriter version(node::Msg::kHello);
    version.U32(99).I32(0).I32(1).U64(::getpid());
    CHECK(raw.Call(version.Frame()).code() == Status::Code::kNotSupported);
  }
  {
    RawClient raw(dir.path(), 0, 1);
    CHECK(raw.Call(node::WireWriter(node::Msg::kBegin).Str("t").U8(0).U8(0).U8(0).U8(0).Frame())
              .ok());
    // Truncated and oversized fields, unknown types.
    CHECK(raw.Call(node::WireWriter(node::Msg::kBegin).Str("t").Frame()).IsInvalidArgument());
    CHECK(raw.Call(node::WireWriter(node::Msg::kNeed).Str("t").U32(1000000).Frame())
              .IsInvalidArgument());
    CHECK(raw.Call(node::WireWriter(static_cast<node::Msg>(60)).Frame()).IsInvalidArgument());
    // A block in a ring never given; a ring that could shrink under the writer.
    const Digest d = Digest::Of("abc", 3);
    node::WireWriter block(node::Msg::kBlock);
    block.Str("t").U32(0).U32(3).U32(0).Raw(d.Key());
    Status blocked = raw.BlockCall(block.Frame());
    CHECK(blocked.message().find("ring") != std::string::npos);
    const int unsealed = ::memfd_create("unsealed", MFD_CLOEXEC);
    REQUIRE(::ftruncate(unsealed, 2 * kChunk) == 0);
    CHECK(raw.Call(node::WireWriter(node::Msg::kRing).U32(2).Frame(), unsealed)
              .message()
              .find("sealed") != std::string::npos);
    ::close(unsealed);
    const int ring = ::memfd_create("ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    REQUIRE(::ftruncate(ring, 2 * kChunk) == 0);
    REQUIRE(::fcntl(ring, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) == 0);
    REQUIRE(raw.Call(node::WireWriter(node::Msg::kRing).U32(2).Frame(), ring).ok());
    // A slot outside the ring, a block longer than a chunk, a group that no
    // dtype has.
    node::WireWriter far(node::Msg::kBlock);
    far.Str("t").U32(2).U32(3).U32(0).Raw(d.Key());
    CHECK(raw.BlockCall(far.Frame()).message().find("of a ring of 2 slots") != std::string::npos);
    node::WireWriter longer(node::Msg::kBlock);
    longer.Str("t").U32(0).U32(kChunk + 1).U32(0).Raw(d.Key());
    CHECK(raw.BlockCall(longer.Frame()).message().find("valid: 1 to") != std::string::npos);
    node::WireWriter grouped(node::Msg::kBlock);
    grouped.Str("t").U32(0).U32(3).U32(3).Raw(d.Key());
    CHECK(raw.BlockCall(grouped.Frame()).message().find("group 0, 2, 4 or 8") != std::string::npos);
    // A block never asked for; a record naming a block never sent.
    CHECK(raw.BlockCall(block.Frame()).message().find("not asked for") != std::string::npos);
    TensorMeta meta;
    meta.dtype = fb::DType::UInt8;
    meta.shape = {kChunk};
    const std::string rec =
        BuildTensorRecord(meta, kChunk, kChunk, {d}, nullptr, DigestOfChunks({d}));
    Status staged = raw.Call(
        node::WireWriter(node::Msg::kStage).Str("t").Str("f.pt").Str("x").Str(rec).Frame());
    CHECK(staged.message().find("neither found nor sent") != std::string::npos);
    // A block whose bytes do not have the digest it claims.
    std::string need = node::WireWriter(node::Msg::kNeed).Str("t").U32(1).Raw(d.Key()).Frame();
    REQUIRE(raw.Call(need).ok());
    REQUIRE(raw.last().payload == std::string(1, '\1'));
    void* p = ::mmap(nullptr, 2 * kChunk, PROT_READ | PROT_WRITE, MAP_SHARED, ring, 0);
    REQUIRE(p != MAP_FAILED);
    std::memcpy(p, "abd", 3);
    CHECK(raw.BlockCall(block.Frame()).message().find("does not have digest") != std::string::npos);
    // A block asked for and not sent (a save that failed half-way) is asked
    // for again when the save is retried, not taken as present.
    const Digest e = Digest::Of("xyz", 3);
    std::string need_e = node::WireWriter(node::Msg::kNeed).Str("t").U32(1).Raw(e.Key()).Frame();
    REQUIRE(raw.Call(need_e).ok());
    CHECK(raw.last().payload == std::string(1, '\1'));
    REQUIRE(raw.Call(need_e).ok());
    CHECK(raw.last().payload == std::string(1, '\1'));
    // A record that fails its checks.
    CHECK(raw.Call(node::WireWriter(node::Msg::kStage)
                       .Str("t")
                       .Str("f.pt")
                       .Str("x")
                       .Str("not a record")
                       .Frame())
              .IsInvalidArgument());
    ::munmap(p, 2 * kChunk);
    ::close(ring);
  }
  // The writer still serves a well-behaved rank.
  auto r0 = Join(dir.path(), 0, 1);
  Result<TagInfo> committed = Status::OK();
  SaveRank(*r0, "ok", 0, &committed);
  INFO(committed.status().ToString());
  CHECK(committed.ok());
  auto report = r0->Verify();
  REQUIRE(report.ok());
  CHECK(report->ok());
  r0.reset();
  REQUIRE(served.Join().ok());
}

TEST_CASE("node options from the environment", "[node]") {
  ::setenv("LOCAL_WORLD_SIZE", "4", 1);
  ::setenv("LOCAL_RANK", "2", 1);
  auto o = NodeOptionsFromEnv();
  REQUIRE(o.ok());
  CHECK(o->enabled);
  CHECK(o->rank == 2);
  CHECK(o->world_size == 4);
  ::setenv("LOCAL_RANK", "4", 1);
  CHECK(NodeOptionsFromEnv().status().message().find("valid: 0 to 3") != std::string::npos);
  ::setenv("LOCAL_RANK", "x", 1);
  CHECK(NodeOptionsFromEnv().status().IsInvalidArgument());
  ::unsetenv("LOCAL_WORLD_SIZE");
  // DeepSpeed's launcher says LOCAL_SIZE.
  ::setenv("LOCAL_SIZE", "8", 1);
  ::setenv("LOCAL_RANK", "7", 1);
  auto ds = NodeOptionsFromEnv();
  REQUIRE(ds.ok());
  CHECK((ds->enabled && ds->rank == 7 && ds->world_size == 8));
  ::unsetenv("LOCAL_SIZE");
  ::unsetenv("LOCAL_RANK");
  auto none = NodeOptionsFromEnv();
  REQUIRE(none.ok());
  CHECK(none->enabled == (std::getenv("WORLD_SIZE") && std::atoi(std::getenv("WORLD_SIZE")) > 1));
}
