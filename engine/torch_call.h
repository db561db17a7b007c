// The one boundary between LibTorch's exceptions and ckptkv's Status.
//
// LibTorch reports errors by throwing: c10::Error (and its subclasses, such
// as c10::OutOfMemoryError), std::bad_alloc, and std::runtime_error from its
// containers. ckptkv code never lets them escape: every LibTorch call that
// can throw runs inside TorchCall, which maps what it throws with one table:
//
//   StatusError (ckptkv's own)            -> the Status it carries
//   c10::OutOfMemoryError, std::bad_alloc -> ResourceExhausted
//   any other c10::Error / std::exception -> the caller's TorchErrorKind:
//       kUserValue   InvalidArgument (a value the caller gave: cat of
//                    shapes that do not fit, an unpicklable object)
//       kStoredValue Corruption (a value rebuilt from stored bytes)
//       kDevice      IOError (a failure of the device doing the work)
//
// The message is "<where>: <what LibTorch said, without its backtrace>".
// Exceptions of other types are not LibTorch's and propagate.
#ifndef CKPTKV_ENGINE_TORCH_CALL_H_
#define CKPTKV_ENGINE_TORCH_CALL_H_

#include <exception>
#include <optional>
#include <string>

#include "store/status.h"

namespace c10 {
struct Device;
}

namespace ckptkv {

enum class TorchErrorKind { kUserValue, kStoredValue, kDevice };

// The Status for the exception `e` (see the table above); rethrows `e`
// when it is not a std::exception.
Status StatusFromException(const std::exception_ptr& e, TorchErrorKind kind,
                           const std::string& where);

// Runs `f` (returning Status or Result<T>) and returns its result, or the
// Status of what it threw.
template <typename F>
auto TorchCall(TorchErrorKind kind, const std::string& where, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (...) {
    return StatusFromException(std::current_exception(), kind, where);
  }
}

// "cpu", "cuda", "cuda:1", ... as a device; nullopt when LibTorch does not
// accept the string.
std::optional<c10::Device> ParseDevice(const std::string& s);

}  // namespace ckptkv

#endif  // CKPTKV_ENGINE_TORCH_CALL_H_
