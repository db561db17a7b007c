#include "engine/torch_call.h"

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <new>

namespace ckptkv {

Status StatusFromException(const std::exception_ptr& e, TorchErrorKind kind,
                           const std::string& where) {
  std::string what;
  try {
    std::rethrow_exception(e);
  } catch (const StatusError& err) {
    return err.status();
  } catch (const c10::OutOfMemoryError& err) {
    return Status::ResourceExhausted(where + ": out of memory: " + err.what_without_backtrace());
  } catch (const std::bad_alloc& err) {
    return Status::ResourceExhausted(where + ": out of memory: " + err.what());
  } catch (const c10::Error& err) {
    what = err.what_without_backtrace();
  } catch (const std::exception& err) {
    what = err.what();
  }
  std::string msg = where + ": " + what;
  switch (kind) {
    case TorchErrorKind::kUserValue:
      return Status::InvalidArgument(std::move(msg));
    case TorchErrorKind::kStoredValue:
      return Status::Corruption(std::move(msg));
    case TorchErrorKind::kDevice:
      return Status::IOError(std::move(msg));
  }
  return Status::InvalidArgument(std::move(msg));
}

std::optional<c10::Device> ParseDevice(const std::string& s) {
  try {
    return c10::Device(s);
  } catch (const c10::Error&) {
    return std::nullopt;
  }
}

}  // namespace ckptkv
