// Store behaviour: commit atomicity, dedup, incremental cost, delete, gc,
// verify, locking, bad input and corruption handling.
#include <rocksdb/db.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <fstream>
#include <map>
#include <random>

#include "store/block_codec.h"
#include "store/names.h"
#include "store/store.h"
#include "tests/raw_db.h"
#include "tests/store_util.h"
#include "tests/test_util.h"

using namespace ckptkv;
using ckptkv::testing::EmptyTree;
using ckptkv::testing::RawDb;
using ckptkv::testing::TempDir;

namespace {

constexpr uint32_t kChunk = 64 * 1024;

StoreOptions SmallChunks() {
  StoreOptions o;
  o.chunk_size = kChunk;
  o.inline_threshold = 256;
  return o;
}

std::unique_ptr<Store> OpenStore(const std::string& dir, const StoreOptions& o = SmallChunks()) {
  auto r = Store::Open(dir, o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  return std::move(r).value();
}

std::vector<uint8_t> RandomBytes(std::mt19937_64& rng, size_t n) {
  std::vector<uint8_t> v(n);
  for (auto& x : v) x = static_cast<uint8_t>(rng());
  return v;
}

WriteStats Put(Store& s, const std::string& tag, const std::string& file, const std::string& param,
               const std::vector<uint8_t>& bytes) {
  auto r = ckptkv::testing::PutBytes(s, tag, file, param, bytes);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  return r.value();
}

// Saves one file with the given tensors and commits the tag.
TagInfo SaveTag(Store& s, const std::string& tag,
                const std::map<std::string, std::vector<uint8_t>>& tensors,
                const std::string& file = "mp_rank_00_model_states.pt") {
  REQUIRE(s.BeginTag(tag).ok());
  for (const auto& [param, bytes] : tensors) Put(s, tag, file, param, bytes);
  REQUIRE(s.PutFile(tag, file, EmptyTree()).ok());
  auto r = s.CommitTag(tag, CommitOptions());
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  return r.value();
}

std::vector<uint8_t> ReadBack(const Store& s, const std::string& tag, const std::string& file,
                              const std::string& param) {
  auto rec = s.GetTensorRecord(tag, file, param);
  INFO(rec.status().ToString());
  REQUIRE(rec.ok());
  std::vector<uint8_t> out(rec.value()->byte_length());
  Status st = s.ReadTensor(*rec.value().get(), out.data(), out.size(), tag + ":" + param);
  INFO(st.ToString());
  REQUIRE(st.ok());
  return out;
}

}  // namespace

TEST_CASE("names are validated with messages that say what is valid", "[unit][store]") {
  CHECK(ValidateTag("global_step100").ok());
  CHECK(ValidateTag("").IsInvalidArgument());
  CHECK(ValidateTag(std::string("a\0b", 3)).IsInvalidArgument());
  CHECK(ValidateTag("a/b").message().find("path separator") != std::string::npos);
  CHECK(ValidateTag("..").IsInvalidArgument());
  CHECK(ValidateTag("latest").IsInvalidArgument());
  CHECK(ValidateTag(std::string(256, 'x')).message().find("at most 255") != std::string::npos);
  CHECK(ValidateFile("zero/layer.0.weight/fp32.pt").ok());
  CHECK(ValidateFile("../x").IsInvalidArgument());
  CHECK(ValidateFile("a//b").IsInvalidArgument());
  CHECK(ValidateFile("/abs").IsInvalidArgument());
  CHECK(ValidateFile(std::string(2000, 'f')).IsInvalidArgument());
}

TEST_CASE("block codec round-trips and rejects damaged blocks", "[unit][store]") {
  std::mt19937_64 rng(1);
  auto bytes = RandomBytes(rng, 5000);
  std::vector<uint8_t> zeros(5000, 0);
  for (Codec c : {Codec::kRaw, Codec::kZstd}) {
    for (const auto* src : {&bytes, &zeros}) {
      std::string enc = EncodeBlock(c, src->data(), src->size());
      std::vector<uint8_t> out(src->size());
      REQUIRE(DecodeBlock(enc, out.data(), out.size()).ok());
      CHECK(out == *src);
    }
  }
  std::string zenc = EncodeBlock(Codec::kZstd, zeros.data(), zeros.size());
  CHECK(zenc.size() < 200);  // zeros compress
  std::string renc = EncodeBlock(Codec::kZstd, bytes.data(), bytes.size());
  CHECK(static_cast<uint8_t>(renc[0]) == static_cast<uint8_t>(Codec::kRaw));  // random does not
  std::vector<uint8_t> out(5000);
  CHECK(DecodeBlock(zenc.substr(0, zenc.size() - 3), out.data(), out.size()).IsCorruption());
  CHECK(DecodeBlock(renc.substr(0, 100), out.data(), out.size()).IsCorruption());
  CHECK(DecodeBlock("\x07xxxx", out.data(), out.size()).IsCorruption());
  CHECK(DecodeBlock(renc, out.data(), 4999).IsCorruption());
}

TEST_CASE("a committed tag reads back bit-exact; pending tags are invisible", "[unit][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  std::mt19937_64 rng(7);
  // Sizes around the inline threshold and chunk boundaries.
  std::map<std::string, std::vector<uint8_t>> tensors;
  for (size_t n : {size_t{0}, size_t{1}, size_t{256}, size_t{257}, size_t{kChunk - 1},
                   size_t{kChunk}, size_t{kChunk + 1}, size_t{3 * kChunk + 17}}) {
    tensors["p" + std::to_string(n)] = RandomBytes(rng, n);
  }
  REQUIRE(store->BeginTag("t1").ok());
  for (const auto& [param, bytes] : tensors) Put(*store, "t1", "f", param, bytes);
  REQUIRE(store->PutFile("t1", "f", EmptyTree()).ok());
  // Not visible before commit.
  CHECK(store->ListTags()->empty());
  CHECK(store->GetTensorRecord("t1", "f", "p1").status().IsNotFound());
  auto info = store->CommitTag("t1", CommitOptions());
  REQUIRE(info.ok());
  CHECK(info->tensors == tensors.size());
  CHECK(info->files == std::vector<std::string>{"f"});
  uint64_t logical = 0;
  for (const auto& [p, b] : tensors) logical += b.size();
  CHECK(info->logical_bytes == logical);
  for (const auto& [param, bytes] : tensors) CHECK(ReadBack(*store, "t1", "f", param) == bytes);
  CHECK(*store->Latest().value() == "t1");

  // Survives reopening.
  store.reset();
  store = OpenStore(dir.path());
  for (const auto& [param, bytes] : tensors) CHECK(ReadBack(*store, "t1", "f", param) == bytes);
  auto params = store->ListParams("t1", "f");
  REQUIRE(params.ok());
  CHECK(params->size() == tensors.size());
}

TEST_CASE("saves write only new chunks and report what they cost", "[unit][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  std::mt19937_64 rng(11);
  std::map<std::string, std::vector<uint8_t>> state;
  for (int i = 0; i < 6; ++i) state["w" + std::to_string(i)] = RandomBytes(rng, 4 * kChunk);
  TagInfo first = SaveTag(*store, "s1", state);
  CHECK(first.new_bytes == 6 * 4 * kChunk);
  CHECK(first.new_blocks == 24);

  // Unchanged: nothing new.
  TagInfo same = SaveTag(*store, "s2", state);
  CHECK(same.new_bytes == 0);
  CHECK(same.logical_bytes == first.logical_bytes);

  // One byte in one chunk of one tensor changes: exactly one chunk is new.
  state["w3"][kChunk * 2 + 5] ^= 0xff;
  TagInfo one = SaveTag(*store, "s3", state);
  CHECK(one.new_blocks == 1);
  CHECK(one.new_bytes == kChunk);

  // The same bytes under another file (rank) and param name are shared too.
  REQUIRE(store->BeginTag("s4").ok());
  WriteStats ws =
      Put(*store, "s4", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "other", state["w0"]);
  REQUIRE(store->PutFile("s4", "zero_pp_rank_1_mp_rank_00_optim_states.pt", EmptyTree()).ok());
  REQUIRE(store->CommitTag("s4", CommitOptions()).ok());
  CHECK(ws.new_bytes == 0);
  CHECK(ws.chunks == 4);

  // Identical chunks inside one tensor are stored once.
  std::vector<uint8_t> repeated(8 * kChunk, 0x5a);
  REQUIRE(store->BeginTag("s5").ok());
  WriteStats rs = Put(*store, "s5", "f", "rep", repeated);
  CHECK(rs.new_blocks == 1);
  store->AbortTag("s5");
}

TEST_CASE("commit refuses to replace a tag unless asked; overwrite replaces atomically",
          "[unit][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  std::mt19937_64 rng(3);
  auto a = RandomBytes(rng, 3 * kChunk);
  auto b = RandomBytes(rng, 2 * kChunk);
  SaveTag(*store, "t", {{"x", a}, {"only_old", a}});
  Status again = store->BeginTag("t");
  CHECK(again.IsAlreadyExists());
  CHECK(again.message().find("'t'") != std::string::npos);

  REQUIRE(store->BeginTag("t", /*overwrite=*/true).ok());
  Put(*store, "t", "mp_rank_00_model_states.pt", "x", b);
  REQUIRE(store->PutFile("t", "mp_rank_00_model_states.pt", EmptyTree()).ok());
  REQUIRE(store->CommitTag("t", CommitOptions()).ok());
  CHECK(ReadBack(*store, "t", "mp_rank_00_model_states.pt", "x") == b);
  CHECK(
      store->GetTensorRecord("t", "mp_rank_00_model_states.pt", "only_old").status().IsNotFound());
  CHECK(store->ListTags()->size() == 1);
}

TEST_CASE("writes without create are refused and name the tag", "[unit][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  std::vector<uint8_t> bytes(10, 1);
  TensorMeta meta;
  meta.dtype = fb::DType::UInt8;
  meta.shape = {10};
  ByteSource src{10, bytes.data(), nullptr};
  Status put = store->PutTensor("nope", "f", "p", meta, src).status();
  CHECK(put.code() == Status::Code::kFailedPrecondition);
  CHECK(put.message().find("create") != std::string::npos);
  Status commit = store->CommitTag("nope", CommitOptions()).status();
  CHECK(commit.code() == Status::Code::kFailedPrecondition);
  CHECK(commit.message().find("'nope'") != std::string::npos);
  // Shape / length mismatch is bad input.
  REQUIRE(store->BeginTag("t").ok());
  meta.shape = {11};
  CHECK(store->PutTensor("t", "f", "p", meta, src).status().IsInvalidArgument());
  CHECK(store->BeginTag("bad/tag").IsInvalidArgument());
}

TEST_CASE("missing tags, files and params are NotFound and list what exists", "[unit][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SaveTag(*store, "alpha", {{"w", std::vector<uint8_t>(100, 1)}});
  Status t = store->GetTag("beta").status();
  CHECK(t.IsNotFound());
  CHECK(t.message().find("alpha") != std::string::npos);
  Status f = store->GetFileTree("alpha", "nofile").status();
  CHECK(f.IsNotFound());
  CHECK(f.message().find("mp_rank_00_model_states.pt") != std::string::npos);
  Status p = store->GetTensorRecord("alpha", "mp_rank_00_model_states.pt", "v").status();
  CHECK(p.IsNotFound());
  CHECK(p.message().find("'w'") == std::string::npos);  // lists names unquoted
  CHECK(p.message().find('w') != std::string::npos);
}

TEST_CASE("delete and gc reclaim exactly the blocks no tag needs", "[unit][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  std::mt19937_64 rng(5);
  auto shared = RandomBytes(rng, 4 * kChunk);
  auto only1 = RandomBytes(rng, 3 * kChunk);
  auto only2 = RandomBytes(rng, 2 * kChunk);
  SaveTag(*store, "a", {{"s", shared}, {"u", only1}});
  SaveTag(*store, "b", {{"s", shared}, {"u", only2}});
  CHECK(*store->Latest().value() == "b");

  auto dry = store->Gc(/*dry_run=*/true);
  REQUIRE(dry.ok());
  CHECK(dry->blocks_removed == 0);

  REQUIRE(store->DeleteTag("b").ok());
  CHECK(*store->Latest().value() == "a");  // latest moves back
  CHECK(store->GetTag("b").status().IsNotFound());
  CHECK(store->DeleteTag("b").IsNotFound());

  auto preview = store->Gc(true);
  REQUIRE(preview.ok());
  CHECK(preview->blocks_removed == 2);
  CHECK(preview->bytes_removed == 2 * kChunk);
  auto gc = store->Gc(false);
  REQUIRE(gc.ok());
  CHECK(gc->blocks_removed == 2);
  CHECK(gc->bytes_removed == 2 * kChunk);
  CHECK(gc->blocks_live == 7);
  CHECK(ReadBack(*store, "a", "mp_rank_00_model_states.pt", "s") == shared);
  CHECK(ReadBack(*store, "a", "mp_rank_00_model_states.pt", "u") == only1);
  CHECK(store->Verify()->ok());

  REQUIRE(store->DeleteTag("a").ok());
  CHECK(!store->Latest().value().has_value());
  auto gc2 = store->Gc(false);
  REQUIRE(gc2.ok());
  CHECK(gc2->blocks_removed == 7);
  CHECK(gc2->blocks_live == 0);
  // The blob files that held them are gone from disk.
  CHECK(gc2->disk_bytes_after + 7 * kChunk / 2 < gc2->disk_bytes_before);
}

TEST_CASE("gc keeps blocks a pending save relies on", "[unit][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  std::mt19937_64 rng(9);
  auto data = RandomBytes(rng, 3 * kChunk);
  SaveTag(*store, "old", {{"w", data}});
  REQUIRE(store->BeginTag("new").ok());
  Put(*store, "new", "f", "w", data);  // dedups against "old"
  REQUIRE(store->DeleteTag("old").ok());
  auto gc = store->Gc(false);
  REQUIRE(gc.ok());
  CHECK(gc->blocks_removed == 0);
  REQUIRE(store->PutFile("new", "f", EmptyTree()).ok());
  REQUIRE(store->CommitTag("new", CommitOptions()).ok());
  CHECK(ReadBack(*store, "new", "f", "w") == data);
  // An aborted save leaves garbage that gc finds.
  REQUIRE(store->BeginTag("dropped").ok());
  Put(*store, "dropped", "f", "w", RandomBytes(rng, kChunk));
  store->AbortTag("dropped");
  CHECK(store->Gc(false)->blocks_removed == 1);
}

TEST_CASE("a second writer gets a clear lock error", "[unit][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  auto again = Store::Open(dir.path(), SmallChunks());
  REQUIRE(again.status().IsBusy());
  CHECK(again.status().message().find("locked by this process") != std::string::npos);

  // Another process.
  store.reset();
  const pid_t pid = ckptkv::testing::HoldStoreInChild(dir.path(), SmallChunks());
  REQUIRE(pid > 0);
  auto locked = Store::Open(dir.path(), SmallChunks());
  CHECK(locked.status().IsBusy());
  CHECK(locked.status().message().find("process " + std::to_string(pid)) != std::string::npos);
  // Readers are not blocked.
  StoreOptions ro = SmallChunks();
  ro.read_only = true;
  auto reader = Store::Open(dir.path(), ro);
  CHECK(reader.ok());
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  CHECK(Store::Open(dir.path(), SmallChunks()).ok());  // released by the dead process
}

TEST_CASE("a directory that is not a store is refused, not damaged", "[unit][store]") {
  TempDir dir;
  { std::ofstream(dir.Sub("notes.txt")) << "hello"; }
  auto r = Store::Open(dir.path(), SmallChunks());
  REQUIRE(r.status().IsInvalidArgument());
  CHECK(r.status().message().find("not a ckptkv store") != std::string::npos);
  CHECK(!std::filesystem::exists(dir.Sub("OWNER")));

  // A RocksDB database of someone else.
  std::string other = dir.Sub("other");
  {
    rocksdb::Options o;
    o.create_if_missing = true;
    rocksdb::DB* db;
    REQUIRE(rocksdb::DB::Open(o, other, &db).ok());
    delete db;
  }
  auto r2 = Store::Open(other, SmallChunks());
  REQUIRE(r2.status().IsInvalidArgument());
  CHECK(r2.status().message().find("not a ckptkv store") != std::string::npos);

  // Read-only open of a missing store does not create it.
  StoreOptions ro;
  ro.read_only = true;
  CHECK(Store::Open(dir.Sub("missing"), ro).status().IsNotFound());
  CHECK(!std::filesystem::exists(dir.Sub("missing")));
}

TEST_CASE("a store keeps the chunk size it was created with", "[unit][store]") {
  TempDir dir;
  OpenStore(dir.path()).reset();
  StoreOptions other;
  other.chunk_size = 1 << 20;
  auto store = OpenStore(dir.path(), other);
  CHECK(store->chunk_size() == kChunk);
  StoreOptions bad;
  bad.chunk_size = 100;
  CHECK(Store::Open(dir.Sub("tiny"), bad).status().IsInvalidArgument());
}

TEST_CASE("read-only stores refuse writes", "[unit][store]") {
  TempDir dir;
  {
    auto store = OpenStore(dir.path());
    SaveTag(*store, "t", {{"w", std::vector<uint8_t>(1000, 3)}});
  }
  StoreOptions ro = SmallChunks();
  ro.read_only = true;
  auto store = OpenStore(dir.path(), ro);
  CHECK(store->BeginTag("u").code() == Status::Code::kFailedPrecondition);
  CHECK(store->DeleteTag("t").code() == Status::Code::kFailedPrecondition);
  CHECK(ReadBack(*store, "t", "mp_rank_00_model_states.pt", "w") == std::vector<uint8_t>(1000, 3));
}

TEST_CASE("corrupt blocks and records are Corruption errors that name the tensor",
          "[unit][store]") {
  TempDir dir;
  std::mt19937_64 rng(13);
  auto good = RandomBytes(rng, 2 * kChunk);
  auto victim = RandomBytes(rng, 2 * kChunk);
  std::string bad_digest;
  {
    auto store = OpenStore(dir.path());
    SaveTag(*store, "t", {{"good", good}, {"victim", victim}});
    SaveTag(*store, "u", {{"victim", victim}});
    auto rec = store->GetTensorRecord("t", "mp_rank_00_model_states.pt", "victim");
    REQUIRE(rec.ok());
    const auto* d = rec.value()->chunks()->Get(1);
    bad_digest = "B" + Digest{d->lo(), d->hi()}.Key();  // payload key
  }
  {
    RawDb raw(dir.path());
    std::string value = raw.Get("blocks", bad_digest);
    value[kBlockHeaderSize + 100] ^= 0x01;  // flip one bit of the payload
    raw.Put("blocks", bad_digest, value);
  }
  auto store = OpenStore(dir.path());
  CHECK(ReadBack(*store, "t", "mp_rank_00_model_states.pt", "good") == good);
  auto rec = store->GetTensorRecord("t", "mp_rank_00_model_states.pt", "victim");
  REQUIRE(rec.ok());
  std::vector<uint8_t> out(rec.value()->byte_length());
  Status s = store->ReadTensor(*rec.value().get(), out.data(), out.size(), "t/victim");
  CHECK(s.IsCorruption());
  CHECK(s.message().find("does not match its digest") != std::string::npos);

  auto report = store->Verify();
  REQUIRE(report.ok());
  REQUIRE(report->problems.size() == 2);  // both tags need the block
  std::set<std::string> tags;
  for (const auto& p : report->problems) {
    tags.insert(p.tag);
    CHECK(p.param == "victim");
    CHECK(p.file == "mp_rank_00_model_states.pt");
    CHECK(!p.digest.empty());
  }
  CHECK(tags == std::set<std::string>{"t", "u"});
  CHECK(store->Verify(std::string("t"))->problems.size() == 1);

  // Damage a tensor record and a commit record.
  store.reset();
  {
    RawDb raw(dir.path());
    raw.Put("tensors", TensorKey("t", "mp_rank_00_model_states.pt", "good"), "garbage!");
    raw.Put("tags", "u", "not a record");
  }
  store = OpenStore(dir.path());
  Status rs = store->GetTensorRecord("t", "mp_rank_00_model_states.pt", "good").status();
  CHECK(rs.IsCorruption());
  CHECK(rs.message().find("good") != std::string::npos);
  Status ls = store->ListTags().status();
  CHECK(ls.IsCorruption());
  CHECK(ls.message().find("tags/u") != std::string::npos);
  // gc refuses to sweep on a damaged catalog.
  CHECK(store->Gc(false).status().IsCorruption());
}

TEST_CASE("randomized operations agree with a model", "[unit][store]") {
  uint64_t seed = ckptkv::testing::TestSeed("store model test");
  std::mt19937_64 rng(seed);
  TempDir dir;
  auto store = OpenStore(dir.path());
  // A pool of chunk-sized pieces so that tensors share chunks.
  std::vector<std::vector<uint8_t>> pieces;
  pieces.reserve(12);
  for (int i = 0; i < 12; ++i) pieces.push_back(RandomBytes(rng, kChunk));
  std::map<std::string, std::map<std::string, std::vector<uint8_t>>> model;
  int next = 0;
  for (int step = 0; step < 60; ++step) {
    int op = static_cast<int>(rng() % 10);
    if (op < 6 || model.empty()) {
      std::map<std::string, std::vector<uint8_t>> tensors;
      int nt = 1 + static_cast<int>(rng() % 4);
      for (int t = 0; t < nt; ++t) {
        std::vector<uint8_t> bytes;
        int np = static_cast<int>(rng() % 4);
        for (int p = 0; p < np; ++p) {
          const auto& piece = pieces[rng() % pieces.size()];
          bytes.insert(bytes.end(), piece.begin(), piece.end());
        }
        auto tail = RandomBytes(rng, rng() % 3000);
        bytes.insert(bytes.end(), tail.begin(), tail.end());
        tensors["p" + std::to_string(t)] = bytes;
      }
      std::string tag = "tag" + std::to_string(next++);
      SaveTag(*store, tag, tensors);
      model[tag] = tensors;
    } else if (op < 8) {
      auto it = model.begin();
      std::advance(it, rng() % model.size());
      REQUIRE(store->DeleteTag(it->first).ok());
      model.erase(it);
    } else if (op == 8) {
      REQUIRE(store->Gc(false).ok());
    } else {
      store.reset();
      store = OpenStore(dir.path());
    }
    auto tags = store->ListTags();
    REQUIRE(tags.ok());
    REQUIRE(tags->size() == model.size());
  }
  for (const auto& [tag, tensors] : model) {
    for (const auto& [param, bytes] : tensors) {
      CHECK(ReadBack(*store, tag, "mp_rank_00_model_states.pt", param) == bytes);
    }
  }
  auto report = store->Verify();
  REQUIRE(report.ok());
  CHECK(report->ok());
  // Everything gc leaves is referenced: deleting all tags frees all blocks.
  for (const auto& [tag, tensors] : model) REQUIRE(store->DeleteTag(tag).ok());
  REQUIRE(store->Gc(false).ok());
  CHECK(store->Gc(true)->blocks_scanned == 0);
}

TEST_CASE("bytes staged through a fill callback store the same chunks", "[unit][store]") {
  // The path device tensors take: the store asks for one window of chunks
  // at a time instead of reading host memory directly.
  TempDir dir;
  auto store = OpenStore(dir.path());
  std::mt19937_64 rng(21);
  auto bytes = RandomBytes(rng, 37 * kChunk + 123);
  TagInfo direct = SaveTag(*store, "direct", {{"w", bytes}});
  REQUIRE(store->BeginTag("staged").ok());
  TensorMeta meta;
  meta.dtype = fb::DType::UInt8;
  meta.shape = {static_cast<int64_t>(bytes.size())};
  uint64_t max_request = 0, requested = 0;
  ByteSource src;
  src.length = bytes.size();
  src.fill = [&](uint64_t off, uint64_t len, uint8_t* dst) {
    REQUIRE(off + len <= bytes.size());
    std::memcpy(dst, bytes.data() + off, len);
    max_request = std::max(max_request, len);
    requested += len;
    return Status::OK();
  };
  auto stats = store->PutTensor("staged", "mp_rank_00_model_states.pt", "w", meta, src);
  REQUIRE(stats.ok());
  CHECK(stats->new_bytes == 0);  // same chunks as the direct save
  CHECK(requested == bytes.size());
  CHECK(max_request <= kChunk);  // bounded staging
  REQUIRE(store->PutFile("staged", "mp_rank_00_model_states.pt", EmptyTree()).ok());
  REQUIRE(store->CommitTag("staged", CommitOptions()).ok());
  CHECK(ReadBack(*store, "staged", "mp_rank_00_model_states.pt", "w") == bytes);
  auto a = store->GetTensorRecord("direct", "mp_rank_00_model_states.pt", "w");
  auto b = store->GetTensorRecord("staged", "mp_rank_00_model_states.pt", "w");
  CHECK(a.value()->digest()->lo() == b.value()->digest()->lo());
  CHECK(direct.new_bytes == bytes.size());

  // A failing source fails the save and leaves no trace in the tag.
  REQUIRE(store->BeginTag("broken").ok());
  src.fill = [](uint64_t, uint64_t, uint8_t*) { return Status::IOError("device went away"); };
  Status s = store->PutTensor("broken", "f", "w", meta, src).status();
  CHECK(s.code() == Status::Code::kIOError);
  CHECK(s.message().find("device went away") != std::string::npos);
}

TEST_CASE("a block written by an aborted save stays usable for the save that shares it",
          "[unit][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  std::mt19937_64 rng(31);
  auto x = RandomBytes(rng, 2 * kChunk);
  REQUIRE(store->BeginTag("a").ok());
  CHECK(Put(*store, "a", "f", "w", x).new_blocks == 2);
  REQUIRE(store->BeginTag("b").ok());
  CHECK(Put(*store, "b", "f", "w", x).new_blocks == 0);  // shares a's uncommitted blocks
  store->AbortTag("a");
  CHECK(store->Gc(false)->blocks_removed == 0);  // b still needs them
  REQUIRE(store->PutFile("b", "f", EmptyTree()).ok());
  REQUIRE(store->CommitTag("b", CommitOptions()).ok());
  // After a restart the blocks are known through b's commit (indexed by it).
  store.reset();
  store = OpenStore(dir.path());
  CHECK(store->Verify()->ok());
  REQUIRE(store->BeginTag("c").ok());
  CHECK(Put(*store, "c", "f", "w", x).new_blocks == 0);
  store->AbortTag("c");
  CHECK(ReadBack(*store, "b", "f", "w") == x);
}

TEST_CASE("a zstd store compresses what compresses and reads back exactly", "[unit][store]") {
  TempDir dir;
  StoreOptions o = SmallChunks();
  o.codec = Codec::kZstd;
  auto store = OpenStore(dir.path(), o);
  std::mt19937_64 rng(41);
  std::vector<uint8_t> compressible(5 * kChunk);
  for (size_t i = 0; i < compressible.size(); ++i) compressible[i] = static_cast<uint8_t>(i / 7);
  auto random = RandomBytes(rng, 3 * kChunk);
  TagInfo info = SaveTag(*store, "z", {{"c", compressible}, {"r", random}});
  CHECK(info.new_bytes == compressible.size() + random.size());
  // Random chunks are stored raw (5-byte header each); the others shrink.
  CHECK(info.stored_new_bytes < random.size() + 3 * kBlockHeaderSize + compressible.size() / 4);
  CHECK(ReadBack(*store, "z", "mp_rank_00_model_states.pt", "c") == compressible);
  CHECK(ReadBack(*store, "z", "mp_rank_00_model_states.pt", "r") == random);
  CHECK(store->Verify()->ok());
}

TEST_CASE("a record whose chunk list was swapped is Corruption, even with sound blocks",
          "[unit][store]") {
  // Every block it names exists and hashes right; only the record's own
  // digest tells that these are not the tensor's chunks.
  TempDir dir;
  std::mt19937_64 rng(51);
  auto a = RandomBytes(rng, 2 * kChunk);
  auto b = RandomBytes(rng, 2 * kChunk);
  const std::string file = "mp_rank_00_model_states.pt";
  {
    auto store = OpenStore(dir.path());
    SaveTag(*store, "t", {{"a", a}, {"b", b}});
  }
  {
    RawDb raw(dir.path());
    const std::string key_a = TensorKey("t", file, "a");
    std::string rec_a = raw.Get("tensors", key_a);
    std::string rec_b = raw.Get("tensors", TensorKey("t", file, "b"));
    const fb::TensorRecord* ra = VerifiedTensorRecord(rec_a);
    const fb::TensorRecord* rb = VerifiedTensorRecord(rec_b);
    REQUIRE((ra && rb));
    flatbuffers::FlatBufferBuilder fbb;
    std::vector<fb::Digest128> chunks;
    for (const auto* c : *rb->chunks()) chunks.push_back(*c);
    auto shape = fbb.CreateVector(ra->shape()->data(), ra->shape()->size());
    auto chunk_vec = fbb.CreateVectorOfStructs(chunks);
    fb::TensorRecordBuilder tb(fbb);
    tb.add_dtype(ra->dtype());
    tb.add_shape(shape);
    tb.add_byte_length(ra->byte_length());
    tb.add_chunk_size(ra->chunk_size());
    tb.add_chunks(chunk_vec);
    tb.add_digest(ra->digest());  // a's digest over b's chunks
    fbb.Finish(tb.Finish());
    raw.Put("tensors", key_a,
            std::string(reinterpret_cast<const char*>(fbb.GetBufferPointer()), fbb.GetSize()));
  }
  auto store = OpenStore(dir.path());
  Status s = store->GetTensorRecord("t", file, "a").status();
  CHECK(s.IsCorruption());
  CHECK(s.message().find("chunk list does not match the record digest") != std::string::npos);
  auto report = store->Verify();
  REQUIRE(report.ok());
  REQUIRE(report->problems.size() == 1);
  CHECK(report->problems[0].param == "a");
  CHECK(ReadBack(*store, "t", file, "b") == b);
}

TEST_CASE("ranged reads fetch only the chunks that hold the range", "[unit][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  const uint64_t seed = ckptkv::testing::TestSeed("ranged reads");
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> bytes = RandomBytes(rng, 5 * kChunk + 123);
  SaveTag(*store, "t", {{"big", bytes}, {"small", RandomBytes(rng, 100)}});
  auto rec = store->GetTensorRecord("t", "mp_rank_00_model_states.pt", "big");
  REQUIRE(rec.ok());
  for (int trial = 0; trial < 50; ++trial) {
    uint64_t off = rng() % bytes.size();
    uint64_t len = rng() % (bytes.size() - off + 1);
    std::vector<uint8_t> out(len);
    uint64_t before = store->BlockBytesRead();
    Status s = store->ReadTensorRange(*rec.value().get(), off, len, out.data(), "t/big");
    INFO(s.ToString() << " off " << off << " len " << len);
    REQUIRE(s.ok());
    CHECK(std::equal(out.begin(), out.end(), bytes.begin() + static_cast<ptrdiff_t>(off)));
    uint64_t chunks = len == 0 ? 0 : (off + len - 1) / kChunk - off / kChunk + 1;
    uint64_t read = store->BlockBytesRead() - before;
    CHECK(read <= chunks * kChunk);
    CHECK(read + kChunk > chunks * kChunk);  // every needed chunk, the last may be short
  }
  std::vector<uint8_t> out(20);  // was 10 while the last read takes 20 (found by ASan)
  Status bad =
      store->ReadTensorRange(*rec.value().get(), bytes.size() - 5, 10, out.data(), "t/big");
  CHECK(bad.IsInvalidArgument());
  CHECK(bad.message().find("outside") != std::string::npos);
  auto small = store->GetTensorRecord("t", "mp_rank_00_model_states.pt", "small");
  REQUIRE(small.ok());
  REQUIRE(store->ReadTensorRange(*small.value().get(), 10, 20, out.data(), "t/small").ok());
}

TEST_CASE("placements round-trip through tensor records", "[unit][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  REQUIRE(store->BeginTag("t").ok());
  std::vector<uint8_t> bytes(64, 1);
  TensorMeta meta;
  meta.dtype = fb::DType::Float32;
  meta.shape = {16};
  Placement pl;
  pl.flat_group = 1;
  pl.flat_offset = 32;
  pl.flat_numel = 16;
  pl.state = "exp_avg";
  pl.tp_rank = 1;
  pl.tp_degree = 2;
  pl.segments = {{"a.weight", 0, 10, 40}, {"b.bias", 10, 6, 0}};
  meta.placement = pl;
  ByteSource src;
  src.length = bytes.size();
  src.data = bytes.data();
  REQUIRE(store->PutTensor("t", "f", "x", meta, src).ok());
  REQUIRE(store->PutFile("t", "f", EmptyTree()).ok());
  REQUIRE(store->CommitTag("t", CommitOptions()).ok());
  auto rec = store->GetTensorRecord("t", "f", "x");
  REQUIRE(rec.ok());
  const fb::Placement* p = rec.value()->placement();
  REQUIRE(p != nullptr);
  CHECK(p->flat_group() == 1);
  CHECK(p->flat_offset() == 32);
  CHECK(p->state()->str() == "exp_avg");
  CHECK(p->tp_rank() == 1);
  CHECK(p->tp_degree() == 2);
  REQUIRE(p->segments()->size() == 2);
  CHECK(p->segments()->Get(0)->param()->str() == "a.weight");
  CHECK(p->segments()->Get(0)->shard_start() == 40);
  CHECK(p->segments()->Get(1)->numel() == 6);
  CHECK(p->param() == nullptr);
}

TEST_CASE("a linked tensor shares the source's blocks and survives the source's deletion",
          "[unit][store]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  std::mt19937_64 rng(11);
  std::vector<uint8_t> bytes = RandomBytes(rng, 3 * kChunk + 5);
  SaveTag(*store, "a", {{"w", bytes}});
  auto src = store->GetTensorRecord("a", "mp_rank_00_model_states.pt", "w");
  REQUIRE(src.ok());
  REQUIRE(store->BeginTag("b").ok());
  Placement pl;
  pl.param = "w";
  pl.state = "param";
  auto linked = store->LinkTensor("b", "f", "w2", *src.value().get(), pl);
  INFO(linked.status().ToString());
  REQUIRE(linked.ok());
  CHECK(linked->new_bytes == 0);
  CHECK(linked->chunks == 4);
  REQUIRE(store->PutFile("b", "f", EmptyTree()).ok());
  auto info = store->CommitTag("b", CommitOptions());
  REQUIRE(info.ok());
  CHECK(info->new_bytes == 0);
  REQUIRE(store->DeleteTag("a").ok());
  REQUIRE(store->Gc().ok());
  CHECK(ReadBack(*store, "b", "f", "w2") == bytes);
  auto rec = store->GetTensorRecord("b", "f", "w2");
  REQUIRE(rec.ok());
  CHECK(rec.value()->placement()->param()->str() == "w");
  CHECK(store->Verify().value().ok());
}

TEST_CASE("ReadTensors reads many ranges in one batch and names a damaged one", "[unit][store]") {
  TempDir dir;
  const uint64_t seed = ckptkv::testing::TestSeed("batched reads");
  std::mt19937_64 rng(seed);
  const std::string file = "mp_rank_00_model_states.pt";
  std::vector<std::pair<std::string, std::vector<uint8_t>>> tensors;
  for (int i = 0; i < 12; ++i) {
    // Tensors of 0 to 4 chunks plus a ragged end, and inline ones.
    size_t n = i % 4 == 3 ? 100 : (rng() % 4) * kChunk + rng() % kChunk + 1;
    if (i == 10) n = 2 * kChunk + 5;  // the one damaged below: stored as blocks
    tensors.emplace_back("p" + std::to_string(i), RandomBytes(rng, n));
  }
  std::string bad_key;
  {
    auto store = OpenStore(dir.path());
    SaveTag(*store, "t", {tensors.begin(), tensors.end()});
    auto rec = store->GetTensorRecord("t", file, "p10");
    REQUIRE(rec.ok());
    REQUIRE(rec.value()->chunks());
    const auto* d = rec.value()->chunks()->Get(0);
    bad_key = "B" + Digest{d->lo(), d->hi()}.Key();
  }
  StoreOptions o;
  o.read_threads = 3;  // fewer workers than chunks: the batch is shared out
  auto store = Store::Open(dir.path(), o);
  REQUIRE(store.ok());
  std::vector<TensorRecordRef> recs;
  for (const auto& [param, bytes] : tensors) {
    auto r = (*store)->GetTensorRecord("t", file, param);
    REQUIRE(r.ok());
    recs.push_back(std::move(r.value()));
  }
  // Random sub-ranges of every tensor, in one call.
  std::vector<std::vector<uint8_t>> outs(tensors.size());
  std::vector<TensorRead> reads;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const uint64_t size = tensors[i].second.size();
    const uint64_t off = rng() % size;
    const uint64_t len = i % 3 == 0 ? size - off : rng() % (size - off + 1);
    outs[i].resize(len);
    ranges.emplace_back(off, len);
    reads.push_back(TensorRead{recs[i].get(), off, len, outs[i].data(), "t/" + tensors[i].first});
  }
  REQUIRE((*store)->ReadTensors(reads).ok());
  for (size_t i = 0; i < tensors.size(); ++i) {
    INFO(tensors[i].first << " off " << ranges[i].first << " len " << ranges[i].second);
    CHECK(std::equal(outs[i].begin(), outs[i].end(),
                     tensors[i].second.begin() + static_cast<ptrdiff_t>(ranges[i].first)));
  }
  // A range outside its tensor is refused before anything is read.
  std::vector<uint8_t> whole(tensors[0].second.size() + 1);
  const uint64_t read_before = (*store)->BlockBytesRead();
  Status out_of_range = (*store)->ReadTensors(
      {TensorRead{recs[1].get(), 0, recs[1]->byte_length(), outs[1].data(), "t/p1"},
       TensorRead{recs[0].get(), 0, whole.size(), whole.data(), "t/p0"}});
  CHECK(out_of_range.IsInvalidArgument());
  CHECK(out_of_range.message().find("t/p0") != std::string::npos);
  CHECK((*store)->BlockBytesRead() == read_before);
  store->reset();

  // Damage the first block of p10: a batch of every tensor names p10 (the
  // first bad range in order), and the block is forgotten so that the next
  // save of those bytes writes it again.
  {
    RawDb raw(dir.path());
    std::string value = raw.Get("blocks", bad_key);
    value[kBlockHeaderSize + 7] ^= 0x10;
    raw.Put("blocks", bad_key, value);
  }
  auto again = OpenStore(dir.path());
  std::vector<std::vector<uint8_t>> full(tensors.size());
  std::vector<TensorRead> all;
  for (size_t i = 0; i < tensors.size(); ++i) {
    full[i].resize(tensors[i].second.size());
    all.push_back(
        TensorRead{recs[i].get(), 0, full[i].size(), full[i].data(), "t/" + tensors[i].first});
  }
  Status s = again->ReadTensors(all);
  INFO(s.ToString());
  CHECK(s.IsCorruption());
  CHECK(s.message().find("t/p10") != std::string::npos);
  CHECK(s.message().find("does not match its digest") != std::string::npos);
  auto fixed = again->BeginTag("heal");
  REQUIRE(fixed.ok());
  auto put = ckptkv::testing::PutBytes(*again, "heal", file, "p10", tensors[10].second);
  REQUIRE(put.ok());
  CHECK(put->new_blocks == 1);  // the forgotten block is written again
}
