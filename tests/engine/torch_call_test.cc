// TorchCall: the one mapping of LibTorch's exceptions to Status.
#include "engine/torch_call.h"

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <catch2/catch.hpp>
#include <new>
#include <stdexcept>

using namespace ckptkv;

namespace {

c10::SourceLocation Here() { return {__func__, __FILE__, static_cast<uint32_t>(__LINE__)}; }

template <typename E>
Status Throwing(TorchErrorKind kind, E e) {
  return TorchCall(kind, "t/f:p", [&]() -> Status { throw e; });
}

}  // namespace

TEST_CASE("TorchCall maps a c10::Error by what the caller was doing", "[unit][engine]") {
  const c10::Error e(Here(), "shapes do not fit");
  const Status user = Throwing(TorchErrorKind::kUserValue, e);
  CHECK(user.code() == Status::Code::kInvalidArgument);
  CHECK(user.message() == "t/f:p: shapes do not fit");
  CHECK(Throwing(TorchErrorKind::kStoredValue, e).code() == Status::Code::kCorruption);
  CHECK(Throwing(TorchErrorKind::kDevice, e).code() == Status::Code::kIOError);
  // LibTorch's containers throw std::runtime_error: the same table.
  CHECK(Throwing(TorchErrorKind::kStoredValue, std::runtime_error("unhashable key")).code() ==
        Status::Code::kCorruption);
}

TEST_CASE("TorchCall: out of memory is ResourceExhausted whatever the call", "[unit][engine]") {
  for (TorchErrorKind kind :
       {TorchErrorKind::kUserValue, TorchErrorKind::kStoredValue, TorchErrorKind::kDevice}) {
    const Status oom = Throwing(kind, c10::OutOfMemoryError(Here(), "CUDA out of memory"));
    CHECK(oom.code() == Status::Code::kResourceExhausted);
    CHECK(oom.message().find("t/f:p: out of memory") == 0);
    CHECK(Throwing(kind, std::bad_alloc()).code() == Status::Code::kResourceExhausted);
  }
}

TEST_CASE("TorchCall keeps ckptkv's own status and lets other throws pass", "[unit][engine]") {
  const Status s = Throwing(TorchErrorKind::kUserValue, StatusError(Status::NotFound("no tag")));
  CHECK(s.code() == Status::Code::kNotFound);
  CHECK(s.message() == "no tag");
  CHECK_THROWS_AS(Throwing(TorchErrorKind::kUserValue, 42), int);
  Result<int> r = TorchCall(TorchErrorKind::kUserValue, "x", []() -> Result<int> { return 7; });
  REQUIRE(r.ok());
  CHECK(*r == 7);
}

TEST_CASE("TorchCall around a real LibTorch failure names the call", "[unit][engine]") {
  const at::Tensor a = at::zeros({2, 3});
  const at::Tensor b = at::zeros({2, 4});
  const Status s = TorchCall(TorchErrorKind::kUserValue, "cat of a and b", [&] {
    (void)at::cat({a, b}, 0);
    return Status::OK();
  });
  CHECK(s.IsInvalidArgument());
  CHECK(s.message().find("cat of a and b: ") == 0);
  CHECK(s.message().find("Exception raised from") == std::string::npos);  // no backtrace
}

TEST_CASE("ParseDevice accepts LibTorch's device strings only", "[unit][engine]") {
  CHECK(ParseDevice("cpu") == c10::Device(c10::kCPU));
  CHECK(ParseDevice("cuda:1") == c10::Device(c10::kCUDA, 1));
  CHECK_FALSE(ParseDevice("gpu").has_value());
  CHECK_FALSE(ParseDevice("").has_value());
  CHECK_FALSE(ParseDevice("cuda:-3").has_value());
}
