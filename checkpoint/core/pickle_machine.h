// A symbolic pickle machine: reads the pickle in a torch.save file into an
// inert tree, running nothing.
//
// Python's unpickler calls whatever a GLOBAL names (os.system included)
// when it meets REDUCE, BUILD or NEWOBJ. This machine only records them: a
// GLOBAL is a (module, name) pair, REDUCE a Call node holding the callable
// and its argument tuple, NEWOBJ a NewObj node (class, args), BINPERSID a
// PersistentId node; BUILD records its state on the object it builds, and
// APPEND / SETITEM into such an object are recorded on it too (as pickle
// writes OrderedDict: REDUCE of the class, SETITEMS of its items, BUILD). What those
// mean (a tensor rebuild, an OrderedDict, an enum) is decided afterwards
// against an allowlist, by the interpreter of torch files (issue 13's
// reader); nothing in this file gives a name power.
//
// Protocols 2 to 5 as torch.save and pickle.dump write them (plus the
// protocol-0/1 opcodes Python 2 writers used for strings). Every size and
// count read from the bytes is checked before use, and the work is bounded
// by Limits tied to the input's size: the memo, the stack, nesting, the
// nodes made and the bytes copied. Malformed input is a Corruption error
// naming `where` and the byte offset of the opcode at fault.
#ifndef CKPTKV_CHECKPOINT_CORE_PICKLE_MACHINE_H_
#define CKPTKV_CHECKPOINT_CORE_PICKLE_MACHINE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "store/status.h"

namespace ckptkv::checkpoint::pickle {

enum class Kind {
  kNone,
  kBool,
  kInt,     // fits int64
  kBigInt,  // text: decimal digits (LONG1 / LONG4 beyond int64)
  kFloat,
  kString,  // UTF-8 (py2 strings are kept as their bytes)
  kBytes,
  kByteArray,
  kList,
  kTuple,
  kDict,  // items: key, value, key, value, ...
  kSet,
  kFrozenSet,
  kGlobal,        // text = module, name = name (after Python 2 name mapping)
  kCall,          // REDUCE: items = [callable, args tuple]
  kNewObj,        // NEWOBJ / NEWOBJ_EX: items = [class, args tuple(, kwargs dict)]
  kPersistentId,  // BINPERSID: items = [pid]
};

const char* KindName(Kind k);

// One node. Containers are filled in place (APPEND, SETITEM, ADDITEMS), so
// a memoized list can hold itself: walkers bound their depth.
struct Value {
  Kind kind = Kind::kNone;
  bool b = false;
  int64_t i = 0;
  double d = 0;
  std::string text;  // String / Bytes / BigInt digits / Global module
  std::string name;  // Global name
  std::vector<const Value*> items;
  const Value* state = nullptr;         // BUILD's argument; nullptr when never built
  std::vector<const Value*> appended;   // APPEND(S) into an object that is not a list
  std::vector<const Value*> set_items;  // SETITEM(S) into one that is not a dict: k, v, ...
  uint64_t offset = 0;                  // byte offset of the opcode that made it
};

struct Limits {
  uint64_t max_nodes = 0;      // Values made
  uint64_t max_memo = 0;       // memo entries
  uint64_t max_stack = 0;      // stack depth plus marks
  uint64_t max_bytes = 0;      // bytes of strings, bytes and digits copied
  uint64_t max_container = 0;  // items appended to one container
  // Sized for a pickle of `bytes` bytes: no honest pickle makes more nodes
  // or memo entries than it has opcode bytes (plus a small constant).
  static Limits ForSize(uint64_t bytes);
};

// The parsed pickle: the root and the arena that owns every node.
class Tree {
 public:
  const Value* root() const { return root_; }
  uint64_t nodes() const { return arena_.size(); }
  // Every node made, in the order made (those no longer reachable too).
  const Value* node(uint64_t i) const { return arena_[i].get(); }

 private:
  friend class Machine;
  std::vector<std::unique_ptr<Value>> arena_;
  const Value* root_ = nullptr;
};

// Runs the pickle in `bytes` (ending at its STOP; bytes after it are left
// alone and their count returned in `*consumed` when not null).
Result<std::unique_ptr<Tree>> Parse(std::string_view bytes, const std::string& where,
                                    const Limits& limits, uint64_t* consumed = nullptr);

// How a pickle inside a larger file is run.
struct ParseOptions {
  // Added to every byte offset (of Values and in errors): where `bytes`
  // starts in its file.
  uint64_t base = 0;
  // When not null and the pickle fails because `bytes` ended too early (a
  // STOP, a newline or an argument beyond them), set to the length of
  // `bytes` needed to get further (at least bytes.size() + 1); 0 for other
  // errors. Readers of a pickle of unknown length read a window, and a
  // larger one while this grows within their file.
  uint64_t* needed = nullptr;
};
Result<std::unique_ptr<Tree>> Parse(std::string_view bytes, const std::string& where,
                                    const Limits& limits, uint64_t* consumed,
                                    const ParseOptions& options);

// "module.name" of a Global node; "" for other nodes.
std::string QualifiedName(const Value* v);

}  // namespace ckptkv::checkpoint::pickle

#endif  // CKPTKV_CHECKPOINT_CORE_PICKLE_MACHINE_H_
