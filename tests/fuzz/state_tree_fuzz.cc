// Fuzz target: a StateTree as read from the store. The Verifier (table
// limit tied to the size), the store's bounded walk (CollectTreeTensors)
// and the engine's decoder (DecodeState with its node budget) must answer
// with a Status in time proportional to the input, whatever the bytes.
#include <ATen/Functions.h>

#include <cstdint>
#include <string>
#include <vector>

#include "engine/state_codec.h"
#include "store/record_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  const ckptkv::fb::StateTree* tree = ckptkv::VerifiedStateTree(bytes);
  if (tree == nullptr) return 0;
  std::vector<std::string> paths;
  if (!ckptkv::CollectTreeTensors(*tree, size, "fuzz", &paths).ok()) return 0;
  ckptkv::TensorLoader loader = [](const std::string&,
                                   const std::string&) -> ckptkv::Result<at::Tensor> {
    return at::zeros({2});
  };
  (void)ckptkv::DecodeState(bytes, loader, "fuzz");
  return 0;
}
