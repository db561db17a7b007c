// checkpoint/core/state_view: the queries' reads of a state tree see a
// Python Object node (saved by the Python package) as its payload.
#include "checkpoint/core/state_view.h"

#include <catch2/catch.hpp>

#include "tests/python_tree.h"

using namespace ckptkv;
using namespace ckptkv::checkpoint;
using namespace ckptkv::testing;

TEST_CASE("state views read through OrderedDicts, sets, torch.Size, enums and dataclasses",
          "[unit][checkpoint]") {
  auto state = StoredState::FromBytes(PythonModelTree(), "t/mp_rank_00_model_states.pt");
  REQUIRE(state.ok());
  CHECK(TensorParam(state->Find({"module", "w"})) == "module/w");
  CHECK(state->GetInt({"zero_stage"}).value() == 2);
  CHECK(state->GetInt({"frag", "numel"}).value() == 32);
  CHECK(state->GetInt({"param_shapes", "0", "w", "1"}).value() == 8);
  CHECK(Items(state->Find({"param_shapes", "0", "w"})).size() == 2);
  CHECK(DictEntries(state->Find({"module"})).size() == 1);
  CHECK(Items(state->Find({"sparse_tensor_module_names"})).empty());
  CHECK_FALSE(IsNone(state->Find({"sparse_tensor_module_names"})));
  // Bytes and big ints are neither ints nor strings to the queries.
  CHECK(state->GetInt({"big"}).status().IsInvalidArgument());
  CHECK_FALSE(AsString(state->Find({"raw"})).has_value());
}

TEST_CASE("ValueOf follows at most 16 nested objects", "[unit][checkpoint]") {
  for (int depth : {16, 17}) {
    flatbuffers::FlatBufferBuilder b;
    NodeOffset n = IntNode(b, 5);
    for (int i = 0; i < depth; ++i) n = ObjectNode(b, "m:Wrap", 2, {n});
    auto bytes = FinishTree(b, n);
    const fb::StateTree* tree = VerifiedStateTree(bytes);
    REQUIRE(tree != nullptr);
    INFO(depth);
    CHECK((AsInt(tree->root()) == std::optional<int64_t>(5)) == (depth == 16));
  }
}
