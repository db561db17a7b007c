// ckptkvd: the node writer of one store (store/node_writer.h). A rank
// process that opens a store through its node writer starts this program
// when no writer serves the store yet; it is not meant to be run by hand,
// though it can be (--foreground), e.g. under a process supervisor.
//
//   ckptkvd --db DIR [--ready-fd N] [--idle-exit SECONDS] [--foreground]
//
// Without --foreground it detaches first (its first process exits once
// the writer runs in a session of its own, so the rank that started it
// never has to reap it). It opens the store for writing (waiting up to 30 s
// while another writer that is closing still holds it), listens at
// DIR/ckptkvd.sock, writes "ok" to the ready descriptor, or "error <code>"
// and the reason, and serves until its last client has gone. After a
// commit whose ranks asked for it, it records the placements of the tag's
// DeepSpeed files (checkpoint::PlaceTag).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "checkpoint/query/placer.h"
#include "store/node_writer.h"
#include "store/store.h"

namespace {

int Usage(const char* why) {
  std::fprintf(stderr,
               "ckptkvd: %s\nusage: ckptkvd --db DIR [--ready-fd N] [--idle-exit SECONDS] "
               "[--foreground]\n",
               why);
  return 1;
}

void Tell(int fd, const std::string& text) {
  if (fd < 0) return;
  size_t off = 0;
  while (off < text.size()) {
    ssize_t n = ::write(fd, text.data() + off, text.size() - off);
    if (n <= 0) break;
    off += static_cast<size_t>(n);
  }
  ::close(fd);
}

// Descriptors a rank process left open without close-on-exec (its
// sockets, its files) must not live on in the writer.
void CloseInheritedFds(int keep) {
  if (keep > 3) ::close_range(3, static_cast<unsigned>(keep) - 1, 0);
  ::close_range(static_cast<unsigned>(std::max(keep, 2)) + 1, ~0u, 0);
}

}  // namespace

int main(int argc, char** argv) {
  std::string db;
  int ready_fd = -1;
  double idle_exit = 2;
  bool foreground = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (a == "--db") {
      const char* v = value();
      if (!v) return Usage("--db needs a directory");
      db = v;
    } else if (a == "--ready-fd") {
      const char* v = value();
      if (!v) return Usage("--ready-fd needs a number");
      ready_fd = std::atoi(v);
    } else if (a == "--idle-exit") {
      const char* v = value();
      char* end = nullptr;
      if (v) idle_exit = std::strtod(v, &end);
      if (!v || end == v || *end != '\0' || !(idle_exit >= 0) || idle_exit > 86400) {
        return Usage("--idle-exit needs seconds from 0 to 86400");
      }
    } else if (a == "--foreground") {
      foreground = true;
    } else {
      return Usage(("unknown argument '" + a + "'").c_str());
    }
  }
  if (db.empty()) return Usage("--db is required");
  CloseInheritedFds(ready_fd);
  if (!foreground) {
    const pid_t child = ::fork();
    if (child < 0) {
      Tell(ready_fd, std::string("error 5\nfork: ") + std::strerror(errno) + "\n");
      return 2;
    }
    if (child > 0) _exit(0);
    ::setsid();
  }
  ckptkv::StoreOptions options;
  options.node = ckptkv::NodeOptions();
  ckptkv::Result<std::unique_ptr<ckptkv::Store>> store = ckptkv::Status::OK();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (;;) {
    store = ckptkv::Store::Open(db, options);
    if (store.ok() || !store.status().IsBusy() || std::chrono::steady_clock::now() > deadline) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (!store.ok()) {
    std::fprintf(stderr, "ckptkvd: %s\n", store.status().ToString().c_str());
    Tell(ready_fd, "error " + std::to_string(static_cast<int>(store.status().code())) + "\n" +
                       store.status().message() + "\n");
    return 2;
  }
  ckptkv::node::WriterOptions wo;
  wo.idle_exit_s = idle_exit;
  wo.place_after_commit = [](ckptkv::Store& s, const std::string& tag) -> ckptkv::Status {
    // Only tags with DeepSpeed's model or optimizer files have anything to
    // place; the others are not committed again.
    ckptkv::Result<ckptkv::TagInfo> info = s.GetTag(tag);
    if (!info.ok()) return info.status();
    bool deepspeed = false;
    for (const std::string& f : info->files) {
      deepspeed = deepspeed || f.find("model_states") != std::string::npos ||
                  f.find("optim_states") != std::string::npos;
    }
    if (!deepspeed) return ckptkv::Status::OK();
    ckptkv::checkpoint::DeepSpeedPlacer placer;
    ckptkv::Result<ckptkv::checkpoint::PlaceTagReport> report =
        ckptkv::checkpoint::PlaceTag(s, tag, tag, placer);
    if (!report.ok()) return report.status();
    std::fprintf(stderr, "ckptkvd: placed tag '%s': %llu of %llu tensors in %llu files\n",
                 tag.c_str(), static_cast<unsigned long long>(report->placed_tensors),
                 static_cast<unsigned long long>(report->tensors),
                 static_cast<unsigned long long>(report->files));
    return ckptkv::Status::OK();
  };
  wo.on_ready = [&](const ckptkv::Status& s) {
    Tell(ready_fd, s.ok() ? std::string("ok\n")
                          : "error " + std::to_string(static_cast<int>(s.code())) + "\n" +
                                s.message() + "\n");
    ready_fd = -1;
  };
  std::unique_ptr<ckptkv::Store> open = std::move(store).value();
  wo.on_exit = [&open] { open.reset(); };
  ckptkv::Status served = ckptkv::node::ServeNode(*open, wo);
  if (!served.ok()) {
    std::fprintf(stderr, "ckptkvd: %s\n", served.ToString().c_str());
    return 2;
  }
  return 0;
}
