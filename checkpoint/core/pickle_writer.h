// A pickle protocol-2 writer, and the pickle of a stored state tree as
// torch.save writes it (docs/export.md).
//
// Writer emits opcodes one at a time, as Python's pickler does for
// protocol 2 (the protocol torch.save uses): PROTO 2, NONE, NEWTRUE /
// NEWFALSE, BININT1 / BININT2 / BININT / LONG1 / LONG4, BINFLOAT,
// BINUNICODE, EMPTY_LIST / EMPTY_DICT / EMPTY_TUPLE, MARK, APPENDS,
// SETITEMS, TUPLE1..3 / TUPLE, GLOBAL, REDUCE, NEWOBJ, BUILD, BINPERSID,
// BINPUT / LONG_BINPUT, BINGET / LONG_BINGET, STOP. Bytes are written as
// Python 3 writes them at protocol 2: `_codecs.encode(latin-1 text,
// "latin1")`.
//
// PickleStateTree turns a verified StateTree node into the pickle of the
// value the Python package would load (docs/format.md, "Python objects"):
// tensors as `torch._utils._rebuild_tensor_v2` of a storage persistent id,
// Object nodes in the form Python itself pickles their class. It uses only
// the globals listed in docs/export.md. No LibTorch.
#ifndef CKPTKV_CHECKPOINT_CORE_PICKLE_WRITER_H_
#define CKPTKV_CHECKPOINT_CORE_PICKLE_WRITER_H_

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "schema/records.h"
#include "store/status.h"

namespace ckptkv::checkpoint::pickle {

class Writer {
 public:
  Writer();  // starts with PROTO 2

  void None();
  void Bool(bool v);
  void Int(int64_t v);
  // An int of any size given in decimal ("-123..."): LONG1 or LONG4.
  // InvalidArgument unless it is '-'? followed by 1 to 4300 digits.
  Status BigInt(std::string_view decimal);
  void Float(double v);
  void String(std::string_view utf8);  // BINUNICODE, the bytes as given
  void Bytes(std::string_view bytes);  // _codecs.encode(latin-1 text, "latin1")
  void Global(std::string_view module, std::string_view name);
  void Mark();
  void EmptyList();
  void EmptyDict();
  void EmptyTuple();
  void Appends();   // after Mark and the items
  void SetItems();  // after Mark and key, value, ...
  // The tuple of the last n values: TUPLE1..3, or TUPLE after a Mark that
  // the caller wrote before them when n > 3 (n == 0: EMPTY_TUPLE, no Mark).
  void TupleOf(size_t n);
  // Whether TupleOf(n) needs a Mark before the items.
  static bool TupleNeedsMark(size_t n) { return n > 3; }
  void Reduce();
  void NewObj();
  void Build();
  void BinPersId();
  // Memoizes the top of the stack; returns its memo index.
  uint32_t Put();
  void Get(uint32_t index);
  void Stop();

  const std::string& bytes() const { return out_; }
  std::string Take() { return std::move(out_); }

 private:
  void Op(uint8_t op) { out_.push_back(static_cast<char>(op)); }
  void U32(uint32_t v);
  std::string out_;
  uint32_t memo_ = 0;
};

// A distinct tensor of a tree, as its storage: the key of its zip record
// (`<archive>/data/<key>`), its dtype and shape (contiguous, offset 0), its
// requires_grad and the device it was saved from (the storage's location).
struct PickledTensor {
  std::string key;
  fb::DType dtype = fb::DType::Float32;
  std::vector<int64_t> shape;
  bool requires_grad = false;
  std::string location = "cpu";
};

// torch's storage class for a dtype ("FloatStorage", "BFloat16Storage").
const char* StorageClass(fb::DType dtype);

struct PickleHooks {
  // The storage of the Tensor node naming `param` (saved from `device`).
  // Called once per distinct param; later nodes naming it reuse the first
  // (memoized), so tied tensors load as one tensor.
  std::function<Result<PickledTensor>(const std::string& param, const std::string& device)> tensor;
  // The bytes of a tensor a numpy array's payload names (arrays above
  // 64 KiB are stored as a uint8 tensor): they are written inside the
  // pickle, as numpy pickles arrays.
  std::function<Result<std::string>(const std::string& param)> tensor_bytes;
};

// The pickle (PROTO 2 ... STOP) of a state tree's root. At most
// `node_budget` nodes are visited (a record of shared subtrees cannot cost
// out of proportion), nesting at most 1000 levels. `where` names the file
// in errors: InvalidArgument for a value with no pickle form (an Object of
// an unknown builtin class, a malformed payload).
Result<std::string> PickleStateTree(const fb::Node* root, const PickleHooks& hooks,
                                    const std::string& where, uint64_t node_budget);

}  // namespace ckptkv::checkpoint::pickle

#endif  // CKPTKV_CHECKPOINT_CORE_PICKLE_WRITER_H_
