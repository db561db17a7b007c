// Saves a state dict through KvCheckpointEngine into a store, loads it back
// and checks every element: an installed ckptkv works from another project.
#include <ATen/ATen.h>

#include <cstdio>
#include <string>

#include "engine/kv_checkpoint_engine.h"
#include "store/store.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: consumer <empty directory for the store>\n");
    return 1;
  }
  const std::string dir = argv[1];
  const at::Tensor w = at::arange(12, at::kFloat).reshape({3, 4});
  c10::impl::GenericDict sd(c10::StringType::get(), c10::AnyType::get());
  sd.insert("weight", w);
  sd.insert("step", int64_t{7});
  try {
    {
      ckptkv::KvCheckpointEngine engine;  // the writer; closes the store when it goes
      engine.create(dir, "t1");
      engine.save(sd, dir + "/t1/model.pt");
      if (!engine.commit("t1")) return 1;
    }
    ckptkv::KvCheckpointEngine reader;
    const auto tag = reader.open(dir);
    if (!tag || *tag != "t1") {
      std::fprintf(stderr, "open(latest) gave %s, expected t1\n", tag ? tag->c_str() : "nothing");
      return 1;
    }
    const c10::IValue got = reader.load(dir + "/t1/model.pt");
    const auto d = got.toGenericDict();
    if (!at::equal(d.at("weight").toTensor(), w) || d.at("step").toInt() != 7) {
      std::fprintf(stderr, "loaded state differs from the saved one\n");
      return 1;
    }
  } catch (const ckptkv::StatusError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  std::printf("consumer: saved and loaded t1 through an installed ckptkv\n");
  return 0;
}
