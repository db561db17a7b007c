// ckptkv_crash_child: saves checkpoints until it is killed.
//
//   ckptkv_crash_child --db DIR --start N --seed S --ack FILE
//                      [--wal] [--async] [--ready-fd FD] [--count C]
//   ckptkv_crash_child --db DIR --gc [--ready-fd FD]
//
// For i = N, N+1, ... (at most C steps): create("step<i>"), save the 1-3
// files of MakeStepFiles(S, i), commit, then append "i\n" to FILE and fsync
// it. A line in FILE therefore means that commit returned. --ready-fd gets
// one byte once the store is open. --wal opens the store with
// BlockDurability::kWal instead of kFlush; --async saves through the
// engine's async_save (hashing and writes in the background, commit waits). Exit status 0 after C
// steps, 2 for bad arguments, 3 when a step fails (the error goes to stderr).
// --gc runs Store::Gc once instead (kill point gc.after_batch lies between
// its delete batch and its compaction).
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#include "engine/kv_checkpoint_engine.h"
#include "store/store.h"
#include "tests/crash/crash_state.h"

namespace {

void Ack(int fd, int64_t step) {
  std::string line = std::to_string(step) + "\n";
  if (::write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size()) ||
      ::fsync(fd) != 0) {
    std::cerr << "crash_child: cannot write the ack file: " << std::strerror(errno) << std::endl;
    std::exit(3);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string db, ack;
  int64_t start = -1, count = 100000;
  uint64_t seed = 0;
  bool have_seed = false, wal = false, gc = false, async = false;
  int ready_fd = -1;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "crash_child: " << a << " needs a value" << std::endl;
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--db") {
      db = value();
    } else if (a == "--start") {
      start = std::strtoll(value().c_str(), nullptr, 10);
    } else if (a == "--seed") {
      seed = std::strtoull(value().c_str(), nullptr, 10);
      have_seed = true;
    } else if (a == "--ack") {
      ack = value();
    } else if (a == "--count") {
      count = std::strtoll(value().c_str(), nullptr, 10);
    } else if (a == "--ready-fd") {
      ready_fd = std::atoi(value().c_str());
    } else if (a == "--wal") {
      wal = true;
    } else if (a == "--async") {
      async = true;
    } else if (a == "--gc") {
      gc = true;
    } else {
      std::cerr << "crash_child: unknown argument " << a << std::endl;
      return 2;
    }
  }
  if (gc && !db.empty()) {
    ckptkv::StoreOptions o;
    o.create_if_missing = false;
    auto store = ckptkv::Store::Open(db, o);
    if (!store.ok()) {
      std::cerr << "crash_child: " << store.status().ToString() << std::endl;
      return 3;
    }
    if (ready_fd >= 0) {
      char c = 'r';
      if (::write(ready_fd, &c, 1) != 1) return 3;
      ::close(ready_fd);
    }
    auto r = (*store)->Gc();
    if (!r.ok()) {
      std::cerr << "crash_child: gc: " << r.status().ToString() << std::endl;
      return 3;
    }
    return 0;
  }
  if (db.empty() || ack.empty() || start < 0 || !have_seed) {
    std::cerr << "usage: ckptkv_crash_child --db DIR --start N --seed S --ack FILE [--wal] "
                 "[--ready-fd FD] [--count C]"
              << std::endl;
    return 2;
  }
  int ack_fd = ::open(ack.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (ack_fd < 0) {
    std::cerr << "crash_child: cannot open " << ack << ": " << std::strerror(errno) << std::endl;
    return 3;
  }
  try {
    ckptkv::KvEngineConfig config;
    config.db = db;
    config.store.chunk_size = 256 << 10;
    config.store.threads = 2;
    config.store.block_durability =
        wal ? ckptkv::BlockDurability::kWal : ckptkv::BlockDurability::kFlush;
    config.async_save = async;
    ckptkv::KvCheckpointEngine engine(config);
    engine.makedirs(db, /*exist_ok=*/true);  // opens the store
    if (ready_fd >= 0) {
      char c = 'r';
      if (::write(ready_fd, &c, 1) != 1) return 3;
      ::close(ready_fd);
    }
    for (int64_t i = start; i < start + count; ++i) {
      const std::string tag = ckptkv::crash_testing::StepTag(i);
      engine.create(db, tag);
      for (const auto& file : ckptkv::crash_testing::MakeStepFiles(seed, i)) {
        engine.save(file.state, db + "/" + tag + "/" + file.name);
      }
      engine.commit(tag);
      Ack(ack_fd, i);
    }
  } catch (const std::exception& e) {
    std::cerr << "crash_child: " << e.what() << std::endl;
    return 3;
  }
  return 0;
}
