// Engine-level crash test: a child process saves and commits checkpoints
// (ckptkv_crash_child) and is killed with SIGKILL at a random moment, or
// kills itself at one of the store's kill points. After each death the
// parent opens the store and checks it:
//   - it opens (the dead child's lock is gone);
//   - the committed tags are exactly step0..stepM minus the ones the test
//     deleted, `latest` is stepM, and every acknowledged step is among them;
//   - every committed tag has the files of its step and loads bit-exact
//     (a commit that was not acknowledged yet is fine, but it is whole);
//   - Verify() reports no problem;
//   - after commit.before_batch the tag being committed is absent, after
//     commit.after_batch it is present;
//   - every 10 deaths old tags are deleted and gc runs; every remaining tag
//     still loads (gc never frees a live block).
// The next child continues from stepM+1.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "engine/kv_checkpoint_engine.h"
#include "tests/crash/crash_state.h"
#include "tests/crash/crash_util.h"

// After the LibTorch headers: their glog-style CHECK (which aborts) must not
// replace Catch's.
#undef CHECK
#include <catch2/catch.hpp>

#ifndef CRASH_CHILD_PATH
#error "CRASH_CHILD_PATH must name the ckptkv_crash_child executable"
#endif

extern char** environ;

namespace ckptkv {
namespace {

using crash_testing::CompareIValues;
using crash_testing::MakeStepFiles;
using crash_testing::ParseStepTag;
using crash_testing::StepTag;
using crash_testing::TempDir;

using Clock = std::chrono::steady_clock;

struct ChildResult {
  bool ready = false;  // the child opened the store
  bool killed_by_us = false;
  int status = 0;  // from waitpid
  double lifetime_s = 0;
};

std::string Tail(const std::string& path, size_t max = 4000) {
  std::ifstream in(path);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return all.size() > max ? "..." + all.substr(all.size() - max) : all;
}

std::string DescribeStatus(int status) {
  if (WIFSIGNALED(status)) return std::string("killed by signal ") + strsignal(WTERMSIG(status));
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  return "status " + std::to_string(status);
}

// Waits for the child to end, at most `timeout`; kills it after that.
int WaitOrKill(pid_t pid, std::chrono::milliseconds timeout, bool* killed) {
  auto deadline = Clock::now() + timeout;
  int status = 0;
  while (true) {
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    if (r < 0 && errno != EINTR) return -1;
    if (Clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  *killed = true;
  ::kill(pid, SIGKILL);
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return status;
}

// Starts the child. With `kill_after` set, waits until it has opened the
// store, lets it run that long and SIGKILLs it; otherwise waits for it to
// die by itself (a kill point), at most `timeout`.
ChildResult RunChild(const std::vector<std::string>& args, const std::string& kill_point,
                     const std::string& log_path,
                     std::optional<std::chrono::milliseconds> kill_after,
                     std::chrono::milliseconds timeout) {
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  // Everything the child needs is built before fork: after fork it only
  // makes async-signal-safe calls, then execs (no LibTorch in between).
  std::vector<std::string> argv_s = args;
  argv_s.push_back("--ready-fd");
  argv_s.push_back(std::to_string(fds[1]));
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_s;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, "CKPTKV_KILL_POINT=", 18) != 0) env_s.push_back(*e);
  }
  if (!kill_point.empty()) env_s.push_back("CKPTKV_KILL_POINT=" + kill_point);
  std::vector<char*> envp;
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);
  int log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  REQUIRE(log_fd >= 0);

  auto started = Clock::now();
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
    ::fcntl(fds[1], F_SETFD, 0);  // the ready pipe survives exec
    ::execve(argv[0], argv.data(), envp.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  ::close(log_fd);

  ChildResult r;
  if (kill_after) {
    pollfd p{fds[0], POLLIN, 0};
    int n = ::poll(&p, 1, static_cast<int>(timeout.count()));
    char c;
    r.ready = n == 1 && ::read(fds[0], &c, 1) == 1;
    if (r.ready) std::this_thread::sleep_for(*kill_after);
    ::close(fds[0]);
    r.killed_by_us = true;
    ::kill(pid, SIGKILL);
    while (::waitpid(pid, &r.status, 0) < 0 && errno == EINTR) {
    }
  } else {
    bool killed = false;
    r.status = WaitOrKill(pid, timeout, &killed);
    r.killed_by_us = killed;
    ::close(fds[0]);
  }
  r.lifetime_s = std::chrono::duration<double>(Clock::now() - started).count();
  return r;
}

std::set<int64_t> ReadAcks(const std::string& path) {
  std::set<int64_t> acks;
  std::ifstream in(path);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t pos = 0;
  while (true) {
    size_t nl = all.find('\n', pos);
    if (nl == std::string::npos) break;  // an unfinished last line is ignored
    acks.insert(std::stoll(all.substr(pos, nl - pos)));
    pos = nl + 1;
  }
  return acks;
}

KvEngineConfig EngineConfig(const std::string& db) {
  KvEngineConfig config;
  config.db = db;
  config.store.chunk_size = 256 << 10;
  config.store.threads = 2;
  return config;
}

// Loads every file of step `step` and compares it with what the child saved.
// Returns "" when the tag is whole and exact.
std::string CheckStep(KvCheckpointEngine& engine, const std::string& db, uint64_t seed,
                      int64_t step) {
  const std::string tag = StepTag(step);
  std::ostringstream err;
  try {
    auto opened = engine.open(db, tag);
    if (!opened || *opened != tag) return tag + ": open returned another tag";
    auto expected = MakeStepFiles(seed, step);
    auto info = engine.store()->GetTag(tag);
    if (!info.ok()) return tag + ": " + info.status().ToString();
    std::vector<std::string> want, got = info.value().files;
    for (const auto& f : expected) want.push_back(f.name);
    std::sort(want.begin(), want.end());
    std::sort(got.begin(), got.end());
    if (want != got) {
      err << tag << ": files differ (" << got.size() << " committed, " << want.size()
          << " expected)\n";
    }
    for (const auto& f : expected) {
      c10::IValue loaded = engine.load(db + "/" + tag + "/" + f.name);
      std::string d = CompareIValues(f.state, loaded);
      if (!d.empty()) err << tag << "/" << f.name << ": " << d << "\n";
    }
    engine.close(tag);
  } catch (const std::exception& e) {
    err << tag << ": " << e.what() << "\n";
  }
  return err.str();
}

std::string VerifyStore(const Store& store) {
  auto report = store.Verify();
  if (!report.ok()) return "Verify: " + report.status().ToString();
  std::ostringstream out;
  for (const auto& p : report.value().problems) {
    out << p.tag << "/" << p.file << ":" << p.param << " " << p.digest << ": " << p.what << "\n";
  }
  return out.str();
}

TEST_CASE("SIGKILL during save and commit never loses or damages a committed checkpoint",
          "[crash][slow]") {
  const uint64_t seed = crash_testing::TestSeed(
      "SIGKILL during save and commit never loses or damages a committed checkpoint");
  const long kills = crash_testing::EnvInt("CKPTKV_CRASH_KILLS", 50);
  std::mt19937_64 rng(seed);
  auto uniform = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  TempDir tmp("ckptkv-sigkill");
  const std::string db = tmp.Sub("db");
  const std::string ack_path = tmp.Sub("acks");
  const std::string log_path = tmp.Sub("child.log");

  int64_t next_start = 0;
  std::set<int64_t> checked;  // committed steps already compared with their content
  std::set<int64_t> deleted;  // steps the test deleted
  std::map<std::string, int> deaths;
  int never_ready = 0, gcs = 0;
  uint64_t gc_removed = 0;
  const auto begin = Clock::now();

  for (long it = 0; it < kills; ++it) {
    // Every fifth child dies at a kill point, the others at a random moment.
    std::string kill_point;
    if (it % 5 == 4) {
      switch ((it / 5) % 3) {
        case 0:
          kill_point = "commit.before_batch";
          break;
        case 1:
          kill_point = "commit.after_batch";
          break;
        default:
          kill_point = "save.after_blocks:" + std::to_string(uniform(1, 25));
          break;
      }
    }
    const bool wal = uniform(0, 1) == 1;
    // Half the children save asynchronously: they die while background
    // writes run (kill points save.after_blocks fire on the writer thread).
    const bool async = uniform(0, 1) == 1;
    const int64_t start = next_start;
    std::vector<std::string> args = {
        CRASH_CHILD_PATH,     "--db",  db,      "--start", std::to_string(start), "--seed",
        std::to_string(seed), "--ack", ack_path};
    if (wal) args.push_back("--wal");
    if (async) args.push_back("--async");
    std::optional<std::chrono::milliseconds> kill_after;
    if (kill_point.empty()) kill_after = std::chrono::milliseconds(uniform(20, 400));

    INFO("iteration " << it << " seed=" << seed << " start=step" << start
                      << (wal ? " wal" : " flush") << (async ? " async" : "")
                      << (kill_point.empty() ? "" : " kill point " + kill_point)
                      << (kill_after ? " kill after " + std::to_string(kill_after->count()) + " ms"
                                     : std::string()));
    ChildResult child =
        RunChild(args, kill_point, log_path, kill_after, std::chrono::milliseconds(60000));
    INFO("child " << DescribeStatus(child.status) << " after " << child.lifetime_s
                  << " s; its log:\n"
                  << Tail(log_path));
    REQUIRE(WIFSIGNALED(child.status));
    REQUIRE(WTERMSIG(child.status) == SIGKILL);
    if (kill_point.empty()) {
      if (!child.ready) never_ready++;
      deaths["random"]++;
    } else {
      // It must have died by itself at the kill point.
      REQUIRE_FALSE(child.killed_by_us);
      deaths[kill_point.substr(0, kill_point.find(':'))]++;
    }

    const std::set<int64_t> acks = ReadAcks(ack_path);
    KvCheckpointEngine engine(EngineConfig(db));
    std::optional<std::string> latest;
    REQUIRE_NOTHROW(latest = engine.open(db));  // the dead child's lock is gone
    Store& store = *engine.store();

    auto tags = store.ListTags();
    REQUIRE(tags.ok());
    std::set<int64_t> committed;
    for (const auto& t : tags.value()) {
      int64_t step;
      INFO("tag " << t.tag);
      REQUIRE(ParseStepTag(t.tag, &step));  // no tag outside the generated sequence
      REQUIRE(deleted.count(step) == 0);
      committed.insert(step);
    }
    const int64_t max_step = committed.empty() ? -1 : *committed.rbegin();
    // Steps commit in order: everything up to the newest is there (or deleted).
    for (int64_t s = 0; s <= max_step; ++s) {
      INFO("step " << s);
      CHECK(committed.count(s) + deleted.count(s) == 1);
    }
    for (int64_t s : acks) {
      INFO("acknowledged step " << s);
      CHECK(committed.count(s) + deleted.count(s) == 1);
    }
    if (max_step >= 0) {
      CHECK(latest == std::optional<std::string>(StepTag(max_step)));
    }
    if (kill_point == "commit.before_batch") {
      CHECK(committed.count(start) == 0);
      CHECK(max_step == start - 1);
    } else if (kill_point == "commit.after_batch") {
      CHECK(committed.count(start) == 1);
      CHECK(max_step == start);
    }

    for (int64_t s : committed) {
      if (checked.count(s)) continue;
      INFO("checking step " << s);
      CHECK(CheckStep(engine, db, seed, s) == "");
      checked.insert(s);
    }
    CHECK(VerifyStore(store) == "");

    // Every 10 deaths: delete all but the newest 3 tags, collect garbage, and
    // check that every remaining tag still loads.
    if (it % 10 == 9) {
      std::vector<int64_t> steps(committed.begin(), committed.end());
      for (size_t i = 0; i + 3 < steps.size(); ++i) {
        Status s = store.DeleteTag(StepTag(steps[i]));
        INFO("deleting " << StepTag(steps[i]));
        REQUIRE(s.ToString() == "OK");
        deleted.insert(steps[i]);
        committed.erase(steps[i]);
      }
      auto gc = store.Gc();
      INFO("gc: " << gc.status().ToString());
      REQUIRE(gc.ok());
      gcs++;
      gc_removed += gc.value().blocks_removed;
      for (int64_t s : committed) {
        INFO("after gc, step " << s);
        CHECK(CheckStep(engine, db, seed, s) == "");
      }
      CHECK(VerifyStore(store) == "");
    }
    next_start = max_step + 1;
  }

  const double total_s = std::chrono::duration<double>(Clock::now() - begin).count();
  std::ostringstream summary;
  summary << "sigkill crash test: " << kills << " deaths (";
  for (const auto& [how, n] : deaths) summary << how << " " << n << ", ";
  summary << "killed before ready " << never_ready << "), " << next_start << " steps committed, "
          << ReadAcks(ack_path).size() << " acknowledged, " << gcs << " gc runs removed "
          << gc_removed << " blocks, " << total_s << " s, seed=" << seed;
  std::cout << summary.str() << std::endl;
  // The children must have made progress, or the test checked nothing.
  CHECK(next_start >= kills / 5);
}

}  // namespace
}  // namespace ckptkv

namespace ckptkv {
namespace {

TEST_CASE("gc killed between its delete batch and its compaction is finished by the next gc",
          "[crash]") {
  // Before: the next gc found 0 blocks to remove and skipped the
  // compaction, so the dead blocks' space was never given back.
  TempDir dir;
  const std::string db = dir.path() + "/store";
  const std::string log = dir.path() + "/child.log";
  const uint64_t seed = 77;
  ChildResult saved =
      RunChild({CRASH_CHILD_PATH, "--db", db, "--start", "0", "--seed", std::to_string(seed),
                "--ack", dir.path() + "/acks", "--count", "8"},
               "", log, std::nullopt, std::chrono::milliseconds(120000));
  INFO(Tail(log));
  REQUIRE(WIFEXITED(saved.status));
  REQUIRE(WEXITSTATUS(saved.status) == 0);
  {
    KvCheckpointEngine engine(EngineConfig(db));
    engine.makedirs(db, true);
    for (int64_t s = 0; s < 6; ++s) REQUIRE(engine.store()->DeleteTag(StepTag(s)).ok());
  }
  ChildResult gc = RunChild({CRASH_CHILD_PATH, "--db", db, "--gc"}, "gc.after_batch", log,
                            std::nullopt, std::chrono::milliseconds(120000));
  REQUIRE(WIFSIGNALED(gc.status));  // died at the kill point
  KvCheckpointEngine engine(EngineConfig(db));
  engine.makedirs(db, true);
  auto again = engine.store()->Gc();
  REQUIRE(again.ok());
  CHECK(again->blocks_removed == 0);  // the dead gc's batch did remove them
  CHECK(again->resumed_compaction);
  CHECK(again->disk_bytes_after < again->disk_bytes_before);
  auto third = engine.store()->Gc();
  REQUIRE(third.ok());
  CHECK(!third->resumed_compaction);  // finished: the marker is gone
  CHECK(VerifyStore(*engine.store()).empty());
  for (int64_t s = 6; s < 8; ++s) CHECK(CheckStep(engine, db, seed, s).empty());
}

}  // namespace
}  // namespace ckptkv
