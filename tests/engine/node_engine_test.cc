// The C++ KvCheckpointEngine of four rank processes (tests/engine/
// node_rank_main.cc) writing one store through its node writer: the tag
// commits once all four have committed, the shared tensor is stored once,
// and a rank killed in the middle of its save aborts the tag for all.
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <csignal>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "store/store.h"
#include "tests/test_util.h"

extern char** environ;

using namespace ckptkv;
using ckptkv::testing::TempDir;

namespace {

constexpr int kWorld = 4;

struct RankRun {
  int status = 0;
  std::string err;
};

// Runs kWorld ranks of node_rank with `modes`; returns each one's wait
// status and stderr.
std::vector<RankRun> RunRanks(const TempDir& tmp, const std::string& save_dir,
                              const std::string& tag, const std::vector<std::string>& modes) {
  std::vector<pid_t> pids;
  for (int r = 0; r < kWorld; ++r) {
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) env.emplace_back(*e);
    env.push_back("LOCAL_RANK=" + std::to_string(r));
    env.push_back("LOCAL_WORLD_SIZE=" + std::to_string(kWorld));
    std::vector<char*> envp;
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    const std::string err = tmp.Sub(tag + "-rank" + std::to_string(r) + ".err");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    std::vector<std::string> args = {CKPTKV_NODE_RANK, save_dir, tag, modes[r]};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = 0;
    REQUIRE(::posix_spawn(&pid, CKPTKV_NODE_RANK, &fa, nullptr, argv.data(), envp.data()) == 0);
    posix_spawn_file_actions_destroy(&fa);
    pids.push_back(pid);
  }
  std::vector<RankRun> out(kWorld);
  for (int r = 0; r < kWorld; ++r) {
    REQUIRE(::waitpid(pids[r], &out[r].status, 0) == pids[r]);
    std::ifstream in(tmp.Sub(tag + "-rank" + std::to_string(r) + ".err"));
    std::stringstream ss;
    ss << in.rdbuf();
    out[r].err = ss.str();
  }
  return out;
}

std::unique_ptr<Store> ReadOnly(const std::string& dir) {
  StoreOptions o;
  o.read_only = true;
  auto s = Store::Open(dir, o);
  INFO(s.status().ToString());
  REQUIRE(s.ok());
  return std::move(s).value();
}

}  // namespace

TEST_CASE("four C++ engine ranks commit one tag through the node writer", "[node]") {
  TempDir tmp;
  const std::string save_dir = tmp.Sub("ckpts");
  auto runs = RunRanks(tmp, save_dir, "global_step1", {"save", "save", "save", "save"});
  for (int r = 0; r < kWorld; ++r) {
    INFO("rank " << r << ": " << runs[r].err);
    REQUIRE(WIFEXITED(runs[r].status));
    REQUIRE(WEXITSTATUS(runs[r].status) == 0);
  }
  auto store = ReadOnly(save_dir);
  auto info = store->GetTag("global_step1");
  REQUIRE(info.ok());
  CHECK(info->files.size() == kWorld);
  // The shared ~3 MiB tensor once, the own 1 MiB tensors four times.
  const uint64_t shared = ((3 << 20) / 4 + 11) * 4, own = (1 << 18) * 4;
  CHECK(info->logical_bytes >= kWorld * (shared + own));
  CHECK(info->new_bytes <= shared + kWorld * own + 64 * 1024);
  auto report = store->Verify();
  REQUIRE(report.ok());
  CHECK(report->ok());
}

TEST_CASE("a C++ rank killed in its save aborts the tag for every rank", "[node]") {
  TempDir tmp;
  const std::string save_dir = tmp.Sub("ckpts");
  auto runs = RunRanks(tmp, save_dir, "broken", {"save", "die", "save", "save"});
  REQUIRE(WIFSIGNALED(runs[1].status));
  for (int r : {0, 2, 3}) {
    INFO("rank " << r << ": " << runs[r].err);
    REQUIRE(WIFEXITED(runs[r].status));
    CHECK(WEXITSTATUS(runs[r].status) == 3);
    CHECK(runs[r].err.find("rank 1") != std::string::npos);
  }
  auto store = ReadOnly(save_dir);
  CHECK(store->GetTag("broken").status().IsNotFound());
  auto report = store->Verify();
  REQUIRE(report.ok());
  CHECK(report->ok());
}
