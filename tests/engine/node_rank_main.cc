// One rank of a C++ multi-process job for tests/engine/node_engine_test.cc:
// KvCheckpointEngine in DeepSpeed's call order (makedirs, create, save,
// commit), with LOCAL_RANK / LOCAL_WORLD_SIZE from the environment, so the
// engine writes through the store's node writer.
//
//   node_rank SAVE_DIR TAG MODE     MODE: save | die (SIGKILL after the first file)
//
// Each rank saves rank<r>.pt: {"shared": the same tensor on every rank,
// "own": its own, "rank": r}; after the commit it loads every rank's file
// and checks it bit for bit. Exit 0 on success, 3 with the error on stderr.
#include <ATen/ATen.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "engine/kv_checkpoint_engine.h"
#include "store/status.h"

namespace {

at::Tensor Seeded(uint64_t seed, int64_t n) {
  at::Generator g = at::detail::createCPUGenerator(seed);
  return at::randn({n}, g);
}

c10::IValue RankFile(int rank) {
  c10::impl::GenericDict d(c10::StringType::get(), c10::AnyType::get());
  d.insert("shared", Seeded(7, (3 << 20) / 4 + 11));  // ~3 MiB, several chunks
  d.insert("own", Seeded(100 + rank, 1 << 18));
  d.insert("rank", static_cast<int64_t>(rank));
  return d;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: node_rank SAVE_DIR TAG save|die\n");
    return 1;
  }
  const std::string save_dir = argv[1], tag = argv[2], mode = argv[3];
  const int rank = std::atoi(std::getenv("LOCAL_RANK") ? std::getenv("LOCAL_RANK") : "0");
  const int world =
      std::atoi(std::getenv("LOCAL_WORLD_SIZE") ? std::getenv("LOCAL_WORLD_SIZE") : "1");
  try {
    ckptkv::KvCheckpointEngine ce;
    ce.makedirs(save_dir, true);
    ce.create(tag);
    ce.save(RankFile(rank), save_dir + "/" + tag + "/rank" + std::to_string(rank) + ".pt");
    if (mode == "die") std::raise(SIGKILL);
    ce.commit(tag);
    for (int r = 0; r < world; ++r) {
      c10::IValue got = ce.load(save_dir + "/" + tag + "/rank" + std::to_string(r) + ".pt");
      c10::IValue want = RankFile(r);
      auto g = got.toGenericDict();
      auto w = want.toGenericDict();
      if (!at::equal(g.at("shared").toTensor(), w.at("shared").toTensor()) ||
          !at::equal(g.at("own").toTensor(), w.at("own").toTensor()) || g.at("rank").toInt() != r) {
        std::fprintf(stderr, "ERROR: rank%d.pt does not load as saved\n", r);
        return 4;
      }
    }
    std::printf("rank %d committed %s: %llu new bytes\n", rank, tag.c_str(),
                static_cast<unsigned long long>(ce.last_commit().new_bytes));
  } catch (const ckptkv::StatusError& e) {
    std::fprintf(stderr, "ERROR: %s\n", e.status().ToString().c_str());
    return 3;
  }
  return 0;
}
