// Store-level crash tests on a file system that loses what was not synced.
//
// Every test commits tags, leaves a tag half written, "crashes" the store
// (the file system turns read-only, the Store is destroyed, unsynced bytes
// are dropped), reopens it and checks: every tag whose commit returned OK is
// there and reads back bit-exact, Verify() is clean, no uncommitted tag is
// visible, every block index entry has its block (and every payload its
// presence record), and a new save of the lost tag's tensors, which would
// dedup against blocks that did not survive, loads.
#include <catch2/catch.hpp>

#include <rocksdb/db.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <rocksdb/options.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <iterator>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "schema/records.h"
#include "store/store.h"
#include "tests/crash/fault_injection_fs.h"
#include "tests/crash/crash_util.h"

namespace ckptkv {
namespace {

using crash_testing::TempDir;
using testing::FaultInjectionFileSystem;

// --- Expected contents ----------------------------------------------------

struct ExpTensor {
  std::vector<int64_t> shape;
  std::shared_ptr<const std::vector<uint8_t>> bytes;  // float32 data
};
using ExpFile = std::map<std::string, ExpTensor>;  // param -> tensor
using ExpTag = std::map<std::string, ExpFile>;     // file -> tensors

bool Verbose() { return crash_testing::EnvInt("CKPTKV_CRASH_VERBOSE", 0) != 0; }

const char* ModeName(BlockDurability m) { return m == BlockDurability::kFlush ? "flush" : "wal"; }

std::string MinimalStateTree() {
  flatbuffers::FlatBufferBuilder b;
  b.Finish(fb::CreateStateTree(b, fb::CreateNode(b, fb::NodeKind::None)));
  return std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
}

// Generates tensors: fresh random ones, repeats of a shared pool (full
// dedup) and pool tensors with one chunk changed (partial dedup).
class Generator {
 public:
  Generator(uint64_t seed, uint32_t chunk_size) : rng_(seed), chunk_size_(chunk_size) {
    for (int i = 0; i < 6; ++i) pool_.push_back(Fresh());
  }

  ExpTensor Fresh() {
    static const int64_t kNumel[] = {0, 1, 3, 100, 1000, 1024, 5000, 16384, 40000, 100000, 250000};
    int64_t numel = kNumel[Uniform(0, std::size(kNumel) - 1)];
    if (Uniform(0, 3) == 0) numel += Uniform(0, 5000);
    auto bytes = std::make_shared<std::vector<uint8_t>>(numel * 4);
    for (auto& c : *bytes) c = static_cast<uint8_t>(rng_());
    ExpTensor t;
    if (numel > 0 && numel % 4 == 0 && Uniform(0, 1)) {
      t.shape = {4, numel / 4};
    } else {
      t.shape = {numel};
    }
    t.bytes = bytes;
    return t;
  }

  ExpTensor Next() {
    switch (Uniform(0, 3)) {
      case 0:
      case 1:
        return Fresh();
      case 2:
        return pool_[Uniform(0, pool_.size() - 1)];
      default: {
        ExpTensor t = pool_[Uniform(0, pool_.size() - 1)];
        if (t.bytes->empty()) return t;
        auto bytes = std::make_shared<std::vector<uint8_t>>(*t.bytes);
        size_t at = Uniform(0, bytes->size() - 1);
        (*bytes)[at] ^= static_cast<uint8_t>(1 + Uniform(0, 254));
        t.bytes = bytes;
        return t;
      }
    }
  }

  ExpTag NextTag(int max_files = 3, int max_tensors = 6) {
    ExpTag tag;
    int files = static_cast<int>(Uniform(1, max_files));
    for (int f = 0; f < files; ++f) {
      ExpFile& file = tag["rank_" + std::to_string(f) + "/model_states.pt"];
      int n = static_cast<int>(Uniform(1, max_tensors));
      for (int p = 0; p < n; ++p) file["layers." + std::to_string(p) + ".weight"] = Next();
    }
    return tag;
  }

  uint64_t Uniform(uint64_t lo, uint64_t hi) {
    return std::uniform_int_distribution<uint64_t>(lo, hi)(rng_);
  }

 private:
  std::mt19937_64 rng_;
  uint32_t chunk_size_;
  std::vector<ExpTensor> pool_;
};

// --- Store helpers ----------------------------------------------------------

Status PutTag(Store& store, const std::string& tag, const ExpTag& exp, bool commit,
              const std::string& tree) {
  RETURN_IF_ERROR(store.BeginTag(tag));
  for (const auto& [file, tensors] : exp) {
    for (const auto& [param, t] : tensors) {
      TensorMeta meta;
      meta.dtype = fb::DType::Float32;
      meta.shape = t.shape;
      ByteSource src;
      src.length = t.bytes->size();
      src.data = t.bytes->data();
      RETURN_IF_ERROR(store.PutTensor(tag, file, param, meta, src).status());
    }
    RETURN_IF_ERROR(store.PutFile(tag, file, tree));
  }
  if (!commit) return Status::OK();
  return store.CommitTag(tag, CommitOptions()).status();
}

// Compares a committed tag with what was saved; returns "" when equal.
std::string CheckTag(const Store& store, const std::string& tag, const ExpTag& exp) {
  std::ostringstream err;
  auto files = store.ListFiles(tag);
  if (!files.ok()) return "ListFiles(" + tag + "): " + files.status().ToString();
  std::vector<std::string> want_files;
  for (const auto& [f, _] : exp) want_files.push_back(f);
  std::vector<std::string> got_files = files.value();
  std::sort(got_files.begin(), got_files.end());
  if (got_files != want_files) err << tag << ": file list differs\n";
  for (const auto& [file, tensors] : exp) {
    auto params = store.ListParams(tag, file);
    if (!params.ok()) {
      err << tag << "/" << file << ": ListParams: " << params.status().ToString() << "\n";
      continue;
    }
    if (params.value().size() != tensors.size()) {
      err << tag << "/" << file << ": " << params.value().size() << " params, " << tensors.size()
          << " expected\n";
    }
    for (const auto& [param, t] : tensors) {
      const std::string where = tag + "/" + file + ":" + param;
      auto rec = store.GetTensorRecord(tag, file, param);
      if (!rec.ok()) {
        err << where << ": GetTensorRecord: " << rec.status().ToString() << "\n";
        continue;
      }
      const fb::TensorRecord* r = rec.value().get();
      std::vector<int64_t> shape;
      if (r->shape()) shape.assign(r->shape()->begin(), r->shape()->end());
      if (r->dtype() != fb::DType::Float32 || shape != t.shape ||
          r->byte_length() != t.bytes->size()) {
        err << where << ": dtype/shape/length differ\n";
        continue;
      }
      std::vector<uint8_t> got(t.bytes->size());
      Status s = store.ReadTensor(*r, got.data(), got.size(), where);
      if (!s.ok()) {
        err << where << ": ReadTensor: " << s.ToString() << "\n";
      } else if (got != *t.bytes) {
        err << where << ": bytes differ\n";
      }
    }
  }
  return err.str();
}

std::string VerifyProblems(const Store& store) {
  auto report = store.Verify();
  if (!report.ok()) return "Verify failed: " + report.status().ToString();
  std::ostringstream out;
  for (const auto& p : report.value().problems) {
    out << p.tag << "/" << p.file << ":" << p.param << " " << p.digest << ": " << p.what << "\n";
  }
  return out.str();
}

// Opens the database directly (read-only) and checks the block layout of
// docs/format.md: every `index` entry (written by a commit) has its payload
// ('B' + digest) and presence record ('P' + digest) in `blocks`, and every
// payload has its presence record and the other way round (one batch writes
// both, so a crash keeps both or neither; gc finds unindexed blocks through
// the presence records). Blocks without an index entry are allowed: they
// belong to saves that were never committed.
std::string CheckIndexAgainstBlocks(const std::string& dir) {
  std::vector<std::string> names;
  rocksdb::DBOptions dbo;
  rocksdb::Status s = rocksdb::DB::ListColumnFamilies(dbo, dir, &names);
  if (!s.ok()) return "ListColumnFamilies: " + s.ToString();
  std::vector<rocksdb::ColumnFamilyDescriptor> descs;
  for (const auto& n : names) descs.emplace_back(n, rocksdb::ColumnFamilyOptions());
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  s = rocksdb::DB::OpenForReadOnly(dbo, dir, descs, &handles, &raw);
  if (!s.ok()) return "OpenForReadOnly: " + s.ToString();
  std::unique_ptr<rocksdb::DB> db(raw);
  rocksdb::ColumnFamilyHandle *blocks = nullptr, *index = nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == "blocks") blocks = handles[i];
    if (names[i] == "index") index = handles[i];
  }
  std::ostringstream err;
  if (!blocks || !index) {
    err << "no blocks/index column family\n";
  } else {
    auto has = [&](const std::string& key) {
      std::string v;
      return db->Get(rocksdb::ReadOptions(), blocks, key, &v).ok();
    };
    size_t entries = 0, no_payload = 0, no_presence = 0, unpaired = 0, other = 0;
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions(), index));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      entries++;
      const std::string k = it->key().ToString();
      if (!has("B" + k)) no_payload++;
      if (!has("P" + k)) no_presence++;
    }
    if (!it->status().ok()) err << "index scan: " << it->status().ToString() << "\n";
    it.reset(db->NewIterator(rocksdb::ReadOptions(), blocks));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      std::string k = it->key().ToString();
      if (k.empty() || (k[0] != 'B' && k[0] != 'P')) {
        other++;
        continue;
      }
      k[0] = k[0] == 'B' ? 'P' : 'B';
      if (!has(k)) unpaired++;
    }
    if (!it->status().ok()) err << "blocks scan: " << it->status().ToString() << "\n";
    if (no_payload) err << no_payload << " of " << entries << " index entries have no block\n";
    if (no_presence) {
      err << no_presence << " of " << entries << " index entries have no presence record\n";
    }
    if (unpaired) err << unpaired << " block payloads / presence records lack their pair\n";
    if (other) err << other << " keys of unknown kind in the blocks column family\n";
  }
  for (auto* h : handles) db->DestroyColumnFamilyHandle(h);
  return err.str();
}

StoreOptions Options(const std::shared_ptr<FaultInjectionFileSystem>& fs, BlockDurability mode) {
  StoreOptions o;
  o.file_system = fs;
  o.block_durability = mode;
  o.chunk_size = 64 << 10;
  o.inline_threshold = 4096;
  o.threads = 2;
  return o;
}

// "Crashes" the store: nothing more reaches the disk, the Store object goes
// (its close must not crash; its errors are expected), unsynced data is
// dropped.
std::string Crash(std::unique_ptr<Store>& store, FaultInjectionFileSystem& fs) {
  fs.SetActive(false);
  store.reset();
  std::string log = fs.DropUnsyncedData();
  fs.SetActive(true);
  return log;
}

// What the test believes about each tag.
struct Model {
  std::map<std::string, ExpTag> committed;  // CommitTag returned OK
  std::map<std::string, ExpTag> maybe;      // CommitTag failed: present or absent, but whole
  std::set<std::string> absent;             // never committed

  void Check(const Store& store) {
    auto tags = store.ListTags();
    REQUIRE(tags.ok());
    std::set<std::string> listed;
    for (const auto& t : tags.value()) listed.insert(t.tag);
    for (const auto& [tag, exp] : committed) {
      INFO("committed tag " << tag);
      CHECK(listed.count(tag) == 1);
      if (listed.count(tag)) CHECK(CheckTag(store, tag, exp) == "");
    }
    for (const auto& [tag, exp] : maybe) {
      if (!listed.count(tag)) continue;
      INFO("tag " << tag << " whose commit failed is present; it must be whole");
      CHECK(CheckTag(store, tag, exp) == "");
    }
    for (const auto& tag : absent) {
      INFO("uncommitted tag " << tag);
      CHECK(listed.count(tag) == 0);
    }
    for (const auto& tag : listed) {
      INFO("listed tag " << tag);
      CHECK((committed.count(tag) + maybe.count(tag)) == 1);
    }
    CHECK(VerifyProblems(store) == "");
  }
  // A tag found after a crash is settled as committed; one not found is gone.
  void Settle(const Store& store) {
    auto tags = store.ListTags();
    REQUIRE(tags.ok());
    std::set<std::string> listed;
    for (const auto& t : tags.value()) listed.insert(t.tag);
    for (auto& [tag, exp] : maybe) {
      if (listed.count(tag)) {
        committed[tag] = exp;
      } else {
        absent.insert(tag);
      }
    }
    maybe.clear();
  }
};

// One crash-and-recover run of `cycles` cycles in the given mode.
void RunCrashCycles(BlockDurability mode, uint64_t seed, int cycles) {
  INFO("mode=" << ModeName(mode) << " seed=" << seed);
  TempDir tmp;
  const std::string dir = tmp.Sub("store");
  auto fs = std::make_shared<FaultInjectionFileSystem>();
  Generator gen(seed, 64 << 10);
  const std::string tree = MinimalStateTree();
  Model model;
  std::map<std::string, ExpTag> lost;  // uncommitted tags: re-saved after the crash
  int next_tag = 0;
  auto tag_name = [&] { return "step" + std::to_string(next_tag++); };

  for (int cycle = 0; cycle < cycles; ++cycle) {
    INFO("cycle " << cycle);
    auto opened = Store::Open(dir, Options(fs, mode));
    REQUIRE(opened.ok());
    std::unique_ptr<Store> store = std::move(opened).value();
    model.Check(*store);
    model.Settle(*store);

    // A save that dedups against blocks of tags lost in the last crash.
    if (!lost.empty()) {
      ExpTag resave;
      int i = 0;
      for (const auto& [tag, exp] : lost) {
        for (const auto& [file, tensors] : exp) {
          resave["resave_" + std::to_string(i++) + "/" + file] = tensors;
        }
      }
      const std::string t = tag_name();
      INFO("re-saving the tensors of the lost tags as " << t);
      Status s = PutTag(*store, t, resave, true, tree);
      REQUIRE(s.ToString() == "OK");
      model.committed[t] = resave;
      CHECK(CheckTag(*store, t, resave) == "");
      CHECK(VerifyProblems(*store) == "");
      lost.clear();
    }

    // Gc must never free live blocks.
    if (cycle % 2 == 1) {
      auto dry = store->Gc(true);
      REQUIRE(dry.ok());
      auto gc = store->Gc(false);
      REQUIRE(gc.ok());
      CHECK(gc.value().blocks_removed == dry.value().blocks_removed);
      model.Check(*store);
    }

    // Committed tags.
    int commits = static_cast<int>(gen.Uniform(1, 3));
    for (int c = 0; c < commits; ++c) {
      const std::string t = tag_name();
      ExpTag exp = gen.NextTag();
      Status s = PutTag(*store, t, exp, true, tree);
      REQUIRE(s.ToString() == "OK");
      model.committed[t] = exp;
    }

    // A tag whose blocks are written but which is never committed.
    {
      const std::string t = tag_name();
      ExpTag exp = gen.NextTag();
      Status s = PutTag(*store, t, exp, false, tree);
      REQUIRE(s.ToString() == "OK");
      model.absent.insert(t);
      lost[t] = exp;
    }

    // Sometimes a commit that the crash cuts short at a random operation.
    if (gen.Uniform(0, 2) != 0) {
      const std::string t = tag_name();
      ExpTag exp = gen.NextTag();
      Status s = PutTag(*store, t, exp, false, tree);
      REQUIRE(s.ToString() == "OK");
      uint64_t ops_before = fs->ops();
      // A flush-mode commit takes some 20-40 operations (tables, blob file,
      // manifest, WAL); a WAL-mode commit two (append, sync).
      uint64_t after = gen.Uniform(0, mode == BlockDurability::kFlush ? 36 : 2);
      fs->DeactivateAfter(after);
      Status c = store->CommitTag(t, CommitOptions()).status();
      INFO("commit of " << t << " with the file system dying after " << after << " operations: "
                        << c.ToString() << " (" << fs->ops() - ops_before << " operations)");
      if (Verbose()) {
        std::cout << ModeName(mode) << " cycle " << cycle << ": commit of " << t
                  << " with the file system dying after " << after << " of "
                  << fs->ops() - ops_before << " operations: " << c.ToString() << std::endl;
      }
      if (c.ok()) {
        model.committed[t] = exp;
      } else {
        model.maybe[t] = exp;
        lost[t] = exp;
      }
    }

    std::string log = Crash(store, *fs);
    if (Verbose()) std::cout << ModeName(mode) << " cycle " << cycle << " dropped:\n" << log;
    INFO("dropped:\n" << log);
    std::string idx = CheckIndexAgainstBlocks(dir);
    CHECK(idx == "");
  }

  // Final reopen and check.
  auto opened = Store::Open(dir, Options(fs, mode));
  REQUIRE(opened.ok());
  model.Check(*opened.value());
}

TEST_CASE("store survives crashes that drop unsynced data", "[crash]") {
  const uint64_t seed = crash_testing::TestSeed("store survives crashes that drop unsynced data");
  const int cycles = static_cast<int>(crash_testing::EnvInt("CKPTKV_CRASH_CYCLES", 6));
  for (BlockDurability mode : {BlockDurability::kFlush, BlockDurability::kWal}) {
    DYNAMIC_SECTION("block durability " << ModeName(mode)) { RunCrashCycles(mode, seed, cycles); }
  }
}

// Regression: a crash between block writes and the commit must not leave
// index entries whose blocks are gone, and a later save that would dedup
// against the lost blocks must write them again.
TEST_CASE("crash between block writes and commit loses blocks and index together", "[crash]") {
  const uint64_t seed = crash_testing::TestSeed(
      "crash between block writes and commit loses blocks and index together");
  for (BlockDurability mode : {BlockDurability::kFlush, BlockDurability::kWal}) {
    DYNAMIC_SECTION("block durability " << ModeName(mode)) {
      INFO("seed=" << seed);
      TempDir tmp;
      const std::string dir = tmp.Sub("store");
      auto fs = std::make_shared<FaultInjectionFileSystem>();
      Generator gen(seed, 64 << 10);
      const std::string tree = MinimalStateTree();

      // Tensors big enough for several chunks each, distinct from each other.
      ExpTag base, pending;
      for (int i = 0; i < 3; ++i) {
        ExpTensor t = gen.Fresh();
        while (t.bytes->size() < 200000) t = gen.Fresh();
        base["model.pt"]["base." + std::to_string(i)] = t;
        ExpTensor u = gen.Fresh();
        while (u.bytes->size() < 200000) u = gen.Fresh();
        pending["model.pt"]["new." + std::to_string(i)] = u;
      }

      auto store = std::move(Store::Open(dir, Options(fs, mode))).value();
      REQUIRE(PutTag(*store, "base", base, true, tree).ToString() == "OK");
      // Blocks written, tag never committed.
      REQUIRE(PutTag(*store, "pending", pending, false, tree).ToString() == "OK");
      // A second tag that dedups against the pending tag's blocks and commits:
      // its commit must make those blocks durable.
      ExpTag shared = pending;
      REQUIRE(PutTag(*store, "shared", shared, true, tree).ToString() == "OK");
      // A third tag dedups against them again, is written but not committed.
      REQUIRE(PutTag(*store, "pending2", pending, false, tree).ToString() == "OK");
      Crash(store, *fs);

      CHECK(CheckIndexAgainstBlocks(dir) == "");
      store = std::move(Store::Open(dir, Options(fs, mode))).value();
      Model model;
      model.committed["base"] = base;
      model.committed["shared"] = shared;
      model.absent = {"pending", "pending2"};
      model.Check(*store);

      // Now lose blocks that nothing committed references, then re-save them.
      ExpTag fresh;
      for (int i = 0; i < 3; ++i) {
        ExpTensor t = gen.Fresh();
        while (t.bytes->size() < 200000) t = gen.Fresh();
        fresh["model.pt"]["fresh." + std::to_string(i)] = t;
      }
      REQUIRE(PutTag(*store, "lost", fresh, false, tree).ToString() == "OK");
      Crash(store, *fs);
      CHECK(CheckIndexAgainstBlocks(dir) == "");
      store = std::move(Store::Open(dir, Options(fs, mode))).value();
      model.absent.insert("lost");
      model.Check(*store);
      REQUIRE(PutTag(*store, "resaved", fresh, true, tree).ToString() == "OK");
      model.committed["resaved"] = fresh;
      model.Check(*store);
      // And once more after a crash right after that commit.
      Crash(store, *fs);
      CHECK(CheckIndexAgainstBlocks(dir) == "");
      store = std::move(Store::Open(dir, Options(fs, mode))).value();
      model.Check(*store);
      auto gc = store->Gc(false);
      REQUIRE(gc.ok());
      model.Check(*store);
    }
  }
}

// The fault-injecting file system itself: unsynced bytes and never-synced
// files go, synced bytes stay, renames carry the state along, and an
// inactive file system refuses writes.
TEST_CASE("fault injection file system drops exactly the unsynced data", "[crash]") {
  TempDir tmp;
  auto fs = std::make_shared<FaultInjectionFileSystem>();
  rocksdb::FileOptions fo;
  rocksdb::IOOptions io;
  auto write = [&](const std::string& name, const std::string& data, bool sync,
                   std::unique_ptr<rocksdb::FSWritableFile>* keep = nullptr) {
    std::unique_ptr<rocksdb::FSWritableFile> f;
    REQUIRE(fs->NewWritableFile(name, fo, &f, nullptr).ok());
    REQUIRE(f->Append(data, io, nullptr).ok());
    if (sync) REQUIRE(f->Sync(io, nullptr).ok());
    if (keep) {
      *keep = std::move(f);
    } else {
      REQUIRE(f->Close(io, nullptr).ok());
    }
  };
  auto size_of = [&](const std::string& name) -> int64_t {
    uint64_t size = 0;
    if (!fs->FileExists(name, io, nullptr).ok()) return -1;
    REQUIRE(fs->GetFileSize(name, io, &size, nullptr).ok());
    return static_cast<int64_t>(size);
  };
  const std::string a = tmp.Sub("a"), b = tmp.Sub("b"), c = tmp.Sub("c"), d = tmp.Sub("d");
  write(a, "synced", true);
  write(b, "never synced", false);
  std::unique_ptr<rocksdb::FSWritableFile> cf;
  write(c, "12345", true, &cf);
  REQUIRE(cf->Append("678", io, nullptr).ok());  // unsynced tail
  write(tmp.Sub("tmp"), "renamed", true);
  REQUIRE(fs->RenameFile(tmp.Sub("tmp"), d, io, nullptr).ok());

  fs->SetActive(false);
  CHECK_FALSE(cf->Append("x", io, nullptr).ok());
  CHECK_FALSE(cf->Sync(io, nullptr).ok());
  std::unique_ptr<rocksdb::FSWritableFile> nf;
  CHECK_FALSE(fs->NewWritableFile(tmp.Sub("e"), fo, &nf, nullptr).ok());
  CHECK_FALSE(fs->DeleteFile(a, io, nullptr).ok());
  CHECK_FALSE(fs->RenameFile(a, tmp.Sub("f"), io, nullptr).ok());
  cf->Close(io, nullptr).PermitUncheckedError();
  cf.reset();

  std::string log = fs->DropUnsyncedData();
  INFO("dropped:\n" << log);
  fs->SetActive(true);
  CHECK(size_of(a) == 6);
  CHECK(size_of(b) == -1);
  CHECK(size_of(c) == 5);
  CHECK(size_of(d) == 7);
  CHECK(size_of(tmp.Sub("tmp")) == -1);

  // DeactivateAfter: the (n+1)-th operation fails, and so does every later one.
  fs->DeactivateAfter(2);
  std::unique_ptr<rocksdb::FSWritableFile> g;
  REQUIRE(fs->NewWritableFile(tmp.Sub("g"), fo, &g, nullptr).ok());  // 1
  REQUIRE(g->Append("ab", io, nullptr).ok());                        // 2
  CHECK_FALSE(g->Sync(io, nullptr).ok());                            // 3
  CHECK_FALSE(fs->IsActive());
  g->Close(io, nullptr).PermitUncheckedError();
  fs->DropUnsyncedData();
  fs->SetActive(true);
  CHECK(size_of(tmp.Sub("g")) == -1);
}

}  // namespace
}  // namespace ckptkv

namespace ckptkv {
namespace {

// A transient write failure inside PutTensor, then a retry of the same file
// (KvCheckpointEngine::save does ClearFile + PutTensor again): every chunk
// of the retried tensor must reach the store before the commit. (A chunk
// whose write failed used to stay pinned, and the retry skipped it.)
TEST_CASE("retrying a save after a transient write error stores every block",
          "[crash][transient]") {
  const uint64_t seed =
      crash_testing::TestSeed("retrying a save after a transient write error stores every block");
  TempDir tmp;
  const std::string dir = tmp.Sub("store");
  auto fs = std::make_shared<FaultInjectionFileSystem>();
  fs->SetRetryable(true);  // RocksDB resumes by itself once the fault is gone
  Generator gen(seed, 64 << 10);
  const std::string tree = MinimalStateTree();
  auto store = std::move(Store::Open(dir, Options(fs, BlockDurability::kFlush))).value();

  ExpTensor x = gen.Fresh();
  while (x.bytes->size() < 200000) x = gen.Fresh();
  TensorMeta meta;
  meta.shape = x.shape;
  ByteSource src;
  src.length = x.bytes->size();
  src.data = x.bytes->data();

  // A failed flush puts the database into its background-error state, in
  // which block writes fail.
  ExpTag other = gen.NextTag();
  REQUIRE(PutTag(*store, "other", other, false, tree).ToString() == "OK");
  fs->SetActive(false);
  Status c = store->CommitTag("other", CommitOptions()).status();
  INFO("commit while the file system fails: " << c.ToString());
  REQUIRE_FALSE(c.ok());

  REQUIRE(store->BeginTag("t").ok());
  Status first = store->PutTensor("t", "model.pt", "w", meta, src).status();
  INFO("first PutTensor: " << first.ToString());
  // Retries while the fault lasts must not pretend the chunks are stored.
  for (int i = 0; i < 3; ++i) {
    REQUIRE(store->ClearFile("t", "model.pt").ok());
    Status again = store->PutTensor("t", "model.pt", "w", meta, src).status();
    INFO("retry " << i << " while failing: " << again.ToString());
    CHECK(again.ok() == first.ok());
  }
  fs->SetActive(true);  // the fault goes away

  // Retry until RocksDB has resumed (it retries in the background).
  auto retry = [](auto&& op) {
    Status s;
    for (int i = 0; i < 150; ++i) {
      s = op();
      if (s.ok()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return s;
  };
  Status put = retry([&] {
    Status s = store->ClearFile("t", "model.pt");
    if (!s.ok()) return s;
    return store->PutTensor("t", "model.pt", "w", meta, src).status();
  });
  INFO("retried PutTensor: " << put.ToString());
  if (!put.ok()) {
    // The store does not resume by itself (auto-recovery off): nothing to check.
    WARN("the store did not accept writes again within 15 s: " << put.ToString());
    fs->SetRetryable(false);
    return;
  }
  REQUIRE(store->PutFile("t", "model.pt", tree).ok());
  Status commit = retry([&] { return store->CommitTag("t", CommitOptions()).status(); });
  INFO("commit: " << commit.ToString());
  REQUIRE(commit.ok());
  Status commit_other = retry([&] { return store->CommitTag("other", CommitOptions()).status(); });
  INFO("commit of other: " << commit_other.ToString());
  REQUIRE(commit_other.ok());

  Model model;
  model.committed["t"]["model.pt"]["w"] = x;
  model.committed["other"] = other;
  model.Check(*store);
  // And after a power loss. (Plain IOErrors now: RocksDB 7.8 aborts the
  // process when a retryable error hits DB::Close after an earlier automatic
  // recovery; see the hidden test below.)
  fs->SetRetryable(false);
  Crash(store, *fs);
  CHECK(CheckIndexAgainstBlocks(dir) == "");
  store = std::move(Store::Open(dir, Options(fs, BlockDurability::kFlush))).value();
  model.Check(*store);
}

}  // namespace
}  // namespace ckptkv

namespace ckptkv {
namespace {

// Regression: with RocksDB 7.8's automatic resume after a retryable I/O
// error (ENOSPC is one: the local file system marks it retryable), a second
// such error while the store closed made DB::Close throw std::system_error
// from ErrorHandler::StartRecoverFromRetryableBGIOError (thread::join), and
// since ~Store is noexcept the process aborted (in other timings Close
// waited forever: facebook/rocksdb#11440). The store now turns automatic
// resume off: the error sticks until the store is reopened, closing is
// clean, and the reopened store holds exactly what was committed. The
// scenario runs in a child process; a hang or an abort fails the test.
TEST_CASE("closing the store after a retryable I/O error neither aborts nor hangs",
          "[crash][rocksdb-close]") {
  TempDir tmp;
  const std::string dir = tmp.Sub("store");
  std::cout.flush();
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // Die of the abort itself, not through the test framework's handler.
    ::signal(SIGABRT, SIG_DFL);
    ::signal(SIGSEGV, SIG_DFL);
    auto fs = std::make_shared<FaultInjectionFileSystem>();
    fs->SetRetryable(true);
    auto opened = Store::Open(dir, Options(fs, BlockDurability::kFlush));
    if (!opened.ok()) ::_exit(10);
    std::unique_ptr<Store> store = std::move(opened).value();
    Generator gen(1, 64 << 10);
    if (!PutTag(*store, "a", gen.NextTag(), false, MinimalStateTree()).ok()) ::_exit(11);
    fs->SetActive(false);
    if (store->CommitTag("a", CommitOptions()).ok()) ::_exit(12);
    fs->SetActive(true);
    // No automatic resume: the store keeps failing writes until reopened
    // (RocksDB's own resume would retry after about a second).
    for (int i = 0; i < 30; ++i) {
      if (store->CommitTag("a", CommitOptions()).ok()) ::_exit(13);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    fs->SetActive(false);  // the disk fills up again while the store closes
    store.reset();
    ::_exit(0);
  }
  int status = 0;
  bool hung = true;
  for (int i = 0; i < 6000; ++i) {
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      hung = false;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (hung) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
  }
  INFO("child: " << (hung                  ? "hung in close"
                     : WIFSIGNALED(status) ? std::string("killed by ") + strsignal(WTERMSIG(status))
                                           : "exit " + std::to_string(WEXITSTATUS(status))));
  REQUIRE_FALSE(hung);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  // The store opens again; the failed commit left no tag behind.
  auto reopened = Store::Open(dir, StoreOptions());
  INFO(reopened.status().ToString());
  REQUIRE(reopened.ok());
  CHECK(reopened.value()->ListTags()->empty());
  CHECK(reopened.value()->Verify()->ok());
}

}  // namespace
}  // namespace ckptkv
