// Status and Result<T>: ckptkv's one error model.
//
// A Status is free on success (no allocation) and otherwise carries a code
// and a message that names the thing at fault and what would be valid.
// RocksDB statuses are converted in store/ (FromRocks); LibTorch's c10::Error
// is converted at one boundary, engine/torch_call.h. The engine API, which mirrors DeepSpeed's
// Python API, reports a non-OK Status by throwing StatusError.
#ifndef CKPTKV_STORE_STATUS_H_
#define CKPTKV_STORE_STATUS_H_

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

namespace ckptkv {

class [[nodiscard]] Status {
 public:
  enum class Code {
    kOk = 0,
    kNotFound,
    kCorruption,
    kInvalidArgument,
    kIOError,
    kAlreadyExists,
    kFailedPrecondition,  // e.g. save before create
    kBusy,                // store locked by another process
    kNotSupported,
    kResourceExhausted,  // out of memory (host or device)
  };

  Status() = default;
  static Status OK() { return Status(); }
  // A Status of `code` (kOk gives OK and drops the message).
  static Status FromCode(Code code, std::string msg) {
    return code == Code::kOk ? Status() : Status(code, std::move(msg));
  }
  static Status NotFound(std::string msg) { return Status(Code::kNotFound, std::move(msg)); }
  static Status Corruption(std::string msg) { return Status(Code::kCorruption, std::move(msg)); }
  static Status InvalidArgument(std::string msg) {
    return Status(Code::kInvalidArgument, std::move(msg));
  }
  static Status IOError(std::string msg) { return Status(Code::kIOError, std::move(msg)); }
  static Status AlreadyExists(std::string msg) {
    return Status(Code::kAlreadyExists, std::move(msg));
  }
  static Status FailedPrecondition(std::string msg) {
    return Status(Code::kFailedPrecondition, std::move(msg));
  }
  static Status Busy(std::string msg) { return Status(Code::kBusy, std::move(msg)); }
  static Status NotSupported(std::string msg) {
    return Status(Code::kNotSupported, std::move(msg));
  }

  static Status ResourceExhausted(std::string msg) {
    return Status(Code::kResourceExhausted, std::move(msg));
  }

  bool ok() const { return state_ == nullptr; }
  Code code() const { return state_ ? state_->code : Code::kOk; }
  bool IsNotFound() const { return code() == Code::kNotFound; }
  bool IsCorruption() const { return code() == Code::kCorruption; }
  bool IsInvalidArgument() const { return code() == Code::kInvalidArgument; }
  bool IsAlreadyExists() const { return code() == Code::kAlreadyExists; }
  bool IsBusy() const { return code() == Code::kBusy; }
  const std::string& message() const;
  // "Corruption: <message>", or "OK".
  std::string ToString() const;
  // A copy with "context: " put in front of the message.
  Status WithContext(const std::string& context) const;

 private:
  struct State {
    Code code;
    std::string message;
  };
  Status(Code code, std::string msg)
      : state_(std::make_shared<State>(State{code, std::move(msg)})) {}
  std::shared_ptr<const State> state_;
};

const char* CodeName(Status::Code code);

// Thrown by the engine API; carries the Status it was made from.
class StatusError : public std::runtime_error {
 public:
  explicit StatusError(Status status)
      : std::runtime_error(status.ToString()), status_(std::move(status)) {}
  const Status& status() const { return status_; }

 private:
  Status status_;
};

// Either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}          // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {}  // NOLINT
  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() { return *value_; }

 private:
  Status status_;
  std::optional<T> value_;
};

// Throws StatusError if !s.ok().
void ThrowIfError(const Status& s);
template <typename T>
T ValueOrThrow(Result<T> r) {
  ThrowIfError(r.status());
  return std::move(r).value();
}

}  // namespace ckptkv

#define CKPTKV_CONCAT_INNER(a, b) a##b
#define CKPTKV_CONCAT(a, b) CKPTKV_CONCAT_INNER(a, b)

// Returns the Status from the enclosing function if it is not OK.
#define RETURN_IF_ERROR(expr)      \
  do {                             \
    ::ckptkv::Status _st = (expr); \
    if (!_st.ok()) return _st;     \
  } while (0)

// Declares `lhs` from a Result, or returns its Status.
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL(CKPTKV_CONCAT(_result_, __LINE__), lhs, expr)
// `lhs` may be a declaration ("auto x") and `tmp` is a name, so neither can
// be parenthesized.
// NOLINTBEGIN(bugprone-macro-parentheses)
#define ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                          \
  if (!tmp.ok()) return tmp.status();         \
  lhs = std::move(tmp).value()
// NOLINTEND(bugprone-macro-parentheses)

#endif  // CKPTKV_STORE_STATUS_H_
