#include "checkpoint/core/pickle_machine.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <unordered_map>

#include "store/record_check.h"

namespace ckptkv::checkpoint::pickle {

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return "bool";
    case Kind::kInt:
      return "int";
    case Kind::kBigInt:
      return "big int";
    case Kind::kFloat:
      return "float";
    case Kind::kString:
      return "str";
    case Kind::kBytes:
      return "bytes";
    case Kind::kByteArray:
      return "bytearray";
    case Kind::kList:
      return "list";
    case Kind::kTuple:
      return "tuple";
    case Kind::kDict:
      return "dict";
    case Kind::kSet:
      return "set";
    case Kind::kFrozenSet:
      return "frozenset";
    case Kind::kGlobal:
      return "global";
    case Kind::kCall:
      return "call";
    case Kind::kNewObj:
      return "new object";
    case Kind::kPersistentId:
      return "persistent id";
  }
  return "?";
}

Limits Limits::ForSize(uint64_t bytes) {
  Limits l;
  // Every node, memo entry, stack slot and container item costs at least
  // one opcode byte; the constant lets tiny pickles (and their empty
  // containers) through.
  l.max_nodes = bytes + 64;
  l.max_memo = bytes + 64;
  l.max_stack = bytes + 64;
  l.max_bytes = bytes + 64;
  l.max_container = bytes + 64;
  return l;
}

std::string QualifiedName(const Value* v) {
  if (v == nullptr || v->kind != Kind::kGlobal) return "";
  return v->text + "." + v->name;
}

namespace {

// Python 2 module names, as pickle's _compat_pickle maps them for torch's
// files (torch 0.4-era checkpoints, Python 2 writers).
std::string MapModule(const std::string& m) {
  // A subset of pickle's _compat_pickle.IMPORT_MAPPING (Python 3's pickler
  // writes these names at protocols below 3, e.g. subprocess as commands).
  static const std::pair<const char*, const char*> kMap[] = {{"__builtin__", "builtins"},
                                                             {"copy_reg", "copyreg"},
                                                             {"commands", "subprocess"},
                                                             {"exceptions", "builtins"},
                                                             {"cPickle", "pickle"},
                                                             {"UserDict", "collections"},
                                                             {"UserList", "collections"},
                                                             {"Queue", "queue"},
                                                             {"ConfigParser", "configparser"},
                                                             {"urllib2", "urllib.request"},
                                                             {"cStringIO", "io"},
                                                             {"StringIO", "io"},
                                                             {"thread", "_thread"},
                                                             {"dummy_thread", "_dummy_thread"}};
  for (const auto& [py2, py3] : kMap) {
    if (m == py2) return py3;
  }
  return m;
}

// An int of n little-endian two's-complement bytes as decimal digits.
std::string TwosComplementDigits(std::string_view le) {
  std::vector<uint8_t> mag(le.begin(), le.end());
  const bool negative = !mag.empty() && (mag.back() & 0x80) != 0;
  if (negative) {  // magnitude = ~x + 1
    unsigned carry = 1;
    for (auto& byte : mag) {
      const unsigned v = static_cast<uint8_t>(~byte) + carry;
      byte = static_cast<uint8_t>(v);
      carry = v >> 8;
    }
  }
  std::string digits;
  // Repeated division by 10 of the big-endian magnitude.
  std::vector<uint8_t> be(mag.rbegin(), mag.rend());
  size_t start = 0;
  while (start < be.size() && be[start] == 0) ++start;
  while (start < be.size()) {
    unsigned rem = 0;
    for (size_t i = start; i < be.size(); ++i) {
      const unsigned cur = (rem << 8) | be[i];
      be[i] = static_cast<uint8_t>(cur / 10);
      rem = cur % 10;
    }
    digits.push_back(static_cast<char>('0' + rem));
    while (start < be.size() && be[start] == 0) ++start;
  }
  if (digits.empty()) digits = "0";
  if (negative) digits.push_back('-');
  return std::string(digits.rbegin(), digits.rend());
}

}  // namespace

class Machine {
 public:
  Machine(std::string_view bytes, const std::string& where, const Limits& limits,
          const ParseOptions& options)
      : in_(bytes),
        where_(where),
        limits_(limits),
        base_(options.base),
        needed_(options.needed),
        tree_(std::make_unique<Tree>()) {
    if (needed_ != nullptr) *needed_ = 0;
  }

  Result<std::unique_ptr<Tree>> Run(uint64_t* consumed) {
    while (true) {
      if (pos_ >= in_.size()) {
        Need(in_.size() + 1);
        return Bad(pos_, "the pickle ends without STOP");
      }
      op_at_ = pos_;
      const uint8_t op = static_cast<uint8_t>(in_[pos_++]);
      if (op == '.') {  // STOP
        if (stack_.size() != 1 || !marks_.empty()) {
          return Bad(op_at_, "STOP with " + std::to_string(stack_.size()) +
                                 " values on the stack (1 is valid)");
        }
        tree_->root_ = stack_.back();
        if (consumed != nullptr) *consumed = pos_;
        return std::move(tree_);
      }
      RETURN_IF_ERROR(Step(op));
    }
  }

 private:
  Status Bad(uint64_t at, const std::string& what) const {
    return Status::Corruption(where_ + ": pickle at byte " + std::to_string(base_ + at) + ": " +
                              what);
  }
  // The input ends before `len` bytes: recorded for readers of a window.
  void Need(uint64_t len) {
    if (needed_ != nullptr) *needed_ = std::max<uint64_t>(len, in_.size() + 1);
  }

  // --- input -----------------------------------------------------------
  Status Take(uint64_t n, std::string_view* out) {
    if (n > in_.size() - pos_) {
      Need(n > UINT64_MAX - pos_ ? UINT64_MAX : pos_ + n);
      return Bad(op_at_, "needs " + std::to_string(n) + " bytes, " +
                             std::to_string(in_.size() - pos_) + " remain");
    }
    *out = in_.substr(pos_, n);
    pos_ += n;
    return Status::OK();
  }
  Status Uint(int width, uint64_t* out) {
    std::string_view b;
    RETURN_IF_ERROR(Take(static_cast<uint64_t>(width), &b));
    uint64_t v = 0;
    for (int i = width - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(b[i]);
    *out = v;
    return Status::OK();
  }
  Status Line(std::string* out) {
    const size_t nl = in_.find('\n', pos_);
    if (nl == std::string_view::npos) {
      if (in_.size() - pos_ <= 1024) Need(in_.size() + 1);
      return Bad(op_at_, "a text argument without its newline");
    }
    if (nl - pos_ > 1024) return Bad(op_at_, "a text argument of more than 1024 bytes");
    *out = std::string(in_.substr(pos_, nl - pos_));
    pos_ = nl + 1;
    return Status::OK();
  }
  // Bytes of a length-prefixed argument, counted against max_bytes.
  Status Blob(int width, std::string_view* out) {
    uint64_t n = 0;
    RETURN_IF_ERROR(Uint(width, &n));
    if (n > limits_.max_bytes - std::min(limits_.max_bytes, bytes_)) {
      // A larger window has larger limits: past the input, more may help.
      if (n > in_.size() - pos_) Need(n > UINT64_MAX - pos_ ? UINT64_MAX : pos_ + n);
      return Bad(op_at_, "a string of " + std::to_string(n) + " bytes is beyond the limit");
    }
    bytes_ += n;
    return Take(n, out);
  }

  // --- nodes and stack --------------------------------------------------
  Status New(Kind k, Value** out) {
    if (tree_->arena_.size() >= limits_.max_nodes) {
      return Bad(op_at_, "more than " + std::to_string(limits_.max_nodes) + " values");
    }
    tree_->arena_.push_back(std::make_unique<Value>());
    Value* v = tree_->arena_.back().get();
    v->kind = k;
    v->offset = base_ + op_at_;
    *out = v;
    return Status::OK();
  }
  Status Push(Value* v) {
    if (stack_.size() + marks_.size() >= limits_.max_stack) {
      return Bad(op_at_, "the stack grows beyond " + std::to_string(limits_.max_stack));
    }
    stack_.push_back(v);
    return Status::OK();
  }
  Status PushNew(Kind k, Value** out = nullptr) {
    Value* v = nullptr;
    RETURN_IF_ERROR(New(k, &v));
    if (out != nullptr) *out = v;
    return Push(v);
  }
  Status Pop(Value** out) {
    const size_t floor = marks_.empty() ? 0 : marks_.back();
    if (stack_.size() <= floor) return Bad(op_at_, "pops an empty stack");
    *out = stack_.back();
    stack_.pop_back();
    return Status::OK();
  }
  Status Top(Value** out) {
    const size_t floor = marks_.empty() ? 0 : marks_.back();
    if (stack_.size() <= floor) return Bad(op_at_, "needs a value on an empty stack");
    *out = stack_.back();
    return Status::OK();
  }
  // The values above the last MARK, removing them and the mark.
  Status PopMark(std::vector<Value*>* out) {
    if (marks_.empty()) return Bad(op_at_, "needs a MARK that is not there");
    const size_t m = marks_.back();
    marks_.pop_back();
    out->assign(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return Status::OK();
  }
  Status Grow(const std::vector<const Value*>& items, size_t n) const {
    if (items.size() + n > limits_.max_container) {
      return Bad(op_at_,
                 "a container grows beyond " + std::to_string(limits_.max_container) + " items");
    }
    return Status::OK();
  }
  Status Append(Value* target, const std::vector<Value*>& vals) {
    std::vector<const Value*>* dst = nullptr;
    switch (target->kind) {
      case Kind::kList:
        dst = &target->items;
        break;
      case Kind::kCall:
      case Kind::kNewObj:
        dst = &target->appended;
        break;
      default:
        return Bad(op_at_, std::string("appends to a ") + KindName(target->kind));
    }
    RETURN_IF_ERROR(Grow(*dst, vals.size()));
    dst->insert(dst->end(), vals.begin(), vals.end());
    return Status::OK();
  }
  Status SetItems(Value* target, const std::vector<Value*>& kv) {
    if (kv.size() % 2 != 0) return Bad(op_at_, "sets a key without its value");
    std::vector<const Value*>* dst = nullptr;
    switch (target->kind) {
      case Kind::kDict:
        dst = &target->items;
        break;
      case Kind::kCall:
      case Kind::kNewObj:
        dst = &target->set_items;
        break;
      default:
        return Bad(op_at_, std::string("sets items of a ") + KindName(target->kind));
    }
    RETURN_IF_ERROR(Grow(*dst, kv.size()));
    dst->insert(dst->end(), kv.begin(), kv.end());
    return Status::OK();
  }
  Status Tuple(std::vector<Value*> vals) {
    Value* t = nullptr;
    RETURN_IF_ERROR(New(Kind::kTuple, &t));
    t->items.assign(vals.begin(), vals.end());
    return Push(t);
  }
  Status TupleOf(size_t n) {
    const size_t floor = marks_.empty() ? 0 : marks_.back();
    if (stack_.size() - floor < n) return Bad(op_at_, "builds a tuple from too few values");
    std::vector<Value*> vals(stack_.end() - static_cast<std::ptrdiff_t>(n), stack_.end());
    stack_.resize(stack_.size() - n);
    return Tuple(std::move(vals));
  }
  Status Put(uint64_t index) {
    if (memo_.size() >= limits_.max_memo && memo_.count(index) == 0) {
      return Bad(op_at_, "more than " + std::to_string(limits_.max_memo) + " memo entries");
    }
    Value* v = nullptr;
    RETURN_IF_ERROR(Top(&v));
    memo_[index] = v;
    return Status::OK();
  }
  Status Get(uint64_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end())
      return Bad(op_at_, "memo entry " + std::to_string(index) + " is not set");
    return Push(it->second);
  }
  Status Text(Kind k, int width) {
    std::string_view b;
    RETURN_IF_ERROR(Blob(width, &b));
    Value* v = nullptr;
    RETURN_IF_ERROR(PushNew(k, &v));
    v->text.assign(b);
    return Status::OK();
  }
  Status Long(int width) {
    std::string_view b;
    RETURN_IF_ERROR(Blob(width, &b));
    Value* v = nullptr;
    if (b.size() <= 8) {  // n two's-complement bytes, n <= 8, fit int64
      uint64_t u = 0;
      for (size_t i = b.size(); i-- > 0;) u = (u << 8) | static_cast<uint8_t>(b[i]);
      if (!b.empty() && b.size() < 8 && (static_cast<uint8_t>(b.back()) & 0x80) != 0) {
        u |= ~uint64_t{0} << (8 * b.size());  // sign-extend
      }
      RETURN_IF_ERROR(PushNew(Kind::kInt, &v));
      v->i = static_cast<int64_t>(u);
      return Status::OK();
    }
    // Python refuses ints of more than 4300 digits; 1786 bytes hold them.
    if (b.size() > 1786) return Bad(op_at_, "an int of more than 4300 digits");
    RETURN_IF_ERROR(PushNew(Kind::kBigInt, &v));
    v->text = TwosComplementDigits(b);
    if (!IsDecimalInteger(v->text)) return Bad(op_at_, "an int of more than 4300 digits");
    return Status::OK();
  }

  Status Step(uint8_t op) {
    uint64_t n = 0;
    Value* v = nullptr;
    Value* a = nullptr;
    Value* b = nullptr;
    std::vector<Value*> vals;
    switch (op) {
      case 0x80:  // PROTO
        RETURN_IF_ERROR(Uint(1, &n));
        if (n < 2 || n > 5)
          return Bad(op_at_, "pickle protocol " + std::to_string(n) + "; 2 to 5 are read");
        return Status::OK();
      case 0x95:  // FRAME: a length hint; the opcodes follow inline
        RETURN_IF_ERROR(Uint(8, &n));
        if (n > in_.size() - pos_) {
          Need(n > UINT64_MAX - pos_ ? UINT64_MAX : pos_ + n);
          return Bad(op_at_, "a frame longer than the pickle");
        }
        return Status::OK();
      case '(':  // MARK
        if (stack_.size() + marks_.size() >= limits_.max_stack) {
          return Bad(op_at_, "the stack grows beyond " + std::to_string(limits_.max_stack));
        }
        marks_.push_back(stack_.size());
        return Status::OK();
      case '0':  // POP
        return Pop(&v);
      case '1':  // POP_MARK
        return PopMark(&vals);
      case '2':  // DUP
        RETURN_IF_ERROR(Top(&v));
        return Push(v);
      case 'N':
        return PushNew(Kind::kNone);
      case 0x88:  // NEWTRUE
      case 0x89:  // NEWFALSE
        RETURN_IF_ERROR(PushNew(Kind::kBool, &v));
        v->b = op == 0x88;
        return Status::OK();
      case 'J': {  // BININT
        RETURN_IF_ERROR(Uint(4, &n));
        RETURN_IF_ERROR(PushNew(Kind::kInt, &v));
        v->i = static_cast<int32_t>(static_cast<uint32_t>(n));
        return Status::OK();
      }
      case 'K':  // BININT1
      case 'M':  // BININT2
        RETURN_IF_ERROR(Uint(op == 'K' ? 1 : 2, &n));
        RETURN_IF_ERROR(PushNew(Kind::kInt, &v));
        v->i = static_cast<int64_t>(n);
        return Status::OK();
      case 0x8a:  // LONG1
        return Long(1);
      case 0x8b:  // LONG4
        return Long(4);
      case 'G': {  // BINFLOAT, big-endian
        std::string_view d;
        RETURN_IF_ERROR(Take(8, &d));
        uint64_t bits = 0;
        for (char c : d) bits = (bits << 8) | static_cast<uint8_t>(c);
        RETURN_IF_ERROR(PushNew(Kind::kFloat, &v));
        std::memcpy(&v->d, &bits, sizeof bits);
        return Status::OK();
      }
      case 'X':  // BINUNICODE
        return Text(Kind::kString, 4);
      case 0x8c:  // SHORT_BINUNICODE
        return Text(Kind::kString, 1);
      case 0x8d:  // BINUNICODE8
        return Text(Kind::kString, 8);
      case 'T':  // BINSTRING (Python 2 str)
        return Text(Kind::kString, 4);
      case 'U':  // SHORT_BINSTRING
        return Text(Kind::kString, 1);
      case 'B':  // BINBYTES
        return Text(Kind::kBytes, 4);
      case 'C':  // SHORT_BINBYTES
        return Text(Kind::kBytes, 1);
      case 0x8e:  // BINBYTES8
        return Text(Kind::kBytes, 8);
      case 0x96:  // BYTEARRAY8
        return Text(Kind::kByteArray, 8);
      case ']':
        return PushNew(Kind::kList);
      case ')':
        return PushNew(Kind::kTuple);
      case '}':
        return PushNew(Kind::kDict);
      case 0x8f:  // EMPTY_SET
        return PushNew(Kind::kSet);
      case 'l':  // LIST
        RETURN_IF_ERROR(PopMark(&vals));
        RETURN_IF_ERROR(PushNew(Kind::kList, &v));
        v->items.assign(vals.begin(), vals.end());
        return Status::OK();
      case 't':  // TUPLE
        RETURN_IF_ERROR(PopMark(&vals));
        return Tuple(std::move(vals));
      case 0x85:  // TUPLE1
      case 0x86:  // TUPLE2
      case 0x87:  // TUPLE3
        return TupleOf(op - 0x84u);
      case 'd':  // DICT
        RETURN_IF_ERROR(PopMark(&vals));
        if (vals.size() % 2 != 0) return Bad(op_at_, "DICT with a key without its value");
        RETURN_IF_ERROR(PushNew(Kind::kDict, &v));
        v->items.assign(vals.begin(), vals.end());
        return Status::OK();
      case 0x91:  // FROZENSET
        RETURN_IF_ERROR(PopMark(&vals));
        RETURN_IF_ERROR(PushNew(Kind::kFrozenSet, &v));
        v->items.assign(vals.begin(), vals.end());
        return Status::OK();
      case 'a':  // APPEND
        RETURN_IF_ERROR(Pop(&a));
        RETURN_IF_ERROR(Top(&v));
        return Append(v, {a});
      case 'e':  // APPENDS
        RETURN_IF_ERROR(PopMark(&vals));
        RETURN_IF_ERROR(Top(&v));
        return Append(v, vals);
      case 's':  // SETITEM
        RETURN_IF_ERROR(Pop(&b));
        RETURN_IF_ERROR(Pop(&a));
        RETURN_IF_ERROR(Top(&v));
        return SetItems(v, {a, b});
      case 'u':  // SETITEMS
        RETURN_IF_ERROR(PopMark(&vals));
        RETURN_IF_ERROR(Top(&v));
        return SetItems(v, vals);
      case 0x90:  // ADDITEMS
        RETURN_IF_ERROR(PopMark(&vals));
        RETURN_IF_ERROR(Top(&v));
        if (v->kind != Kind::kSet)
          return Bad(op_at_, std::string("adds items to a ") + KindName(v->kind));
        RETURN_IF_ERROR(Grow(v->items, vals.size()));
        v->items.insert(v->items.end(), vals.begin(), vals.end());
        return Status::OK();
      case 'c': {  // GLOBAL module\nname\n
        std::string module, name;
        RETURN_IF_ERROR(Line(&module));
        RETURN_IF_ERROR(Line(&name));
        RETURN_IF_ERROR(PushNew(Kind::kGlobal, &v));
        v->text = MapModule(module);
        v->name = name;
        return Status::OK();
      }
      case 0x93:  // STACK_GLOBAL
        RETURN_IF_ERROR(Pop(&b));
        RETURN_IF_ERROR(Pop(&a));
        if (a->kind != Kind::kString || b->kind != Kind::kString) {
          return Bad(op_at_, "STACK_GLOBAL of values that are not strings");
        }
        RETURN_IF_ERROR(PushNew(Kind::kGlobal, &v));
        v->text = MapModule(a->text);
        v->name = b->text;
        return Status::OK();
      case 'R':  // REDUCE: callable(*args), recorded
        RETURN_IF_ERROR(Pop(&b));
        RETURN_IF_ERROR(Pop(&a));
        if (b->kind != Kind::kTuple)
          return Bad(op_at_, "REDUCE with arguments that are not a tuple");
        RETURN_IF_ERROR(PushNew(Kind::kCall, &v));
        v->items = {a, b};
        return Status::OK();
      case 0x81:  // NEWOBJ
        RETURN_IF_ERROR(Pop(&b));
        RETURN_IF_ERROR(Pop(&a));
        if (b->kind != Kind::kTuple)
          return Bad(op_at_, "NEWOBJ with arguments that are not a tuple");
        RETURN_IF_ERROR(PushNew(Kind::kNewObj, &v));
        v->items = {a, b};
        return Status::OK();
      case 0x92: {  // NEWOBJ_EX
        Value* kwargs = nullptr;
        RETURN_IF_ERROR(Pop(&kwargs));
        RETURN_IF_ERROR(Pop(&b));
        RETURN_IF_ERROR(Pop(&a));
        if (b->kind != Kind::kTuple || kwargs->kind != Kind::kDict) {
          return Bad(op_at_, "NEWOBJ_EX with arguments that are not a tuple and a dict");
        }
        RETURN_IF_ERROR(PushNew(Kind::kNewObj, &v));
        v->items = {a, b, kwargs};
        return Status::OK();
      }
      case 'b':  // BUILD: the state is recorded on the object
        RETURN_IF_ERROR(Pop(&b));
        RETURN_IF_ERROR(Top(&v));
        if (v->state != nullptr) return Bad(op_at_, "BUILD of an object built already");
        v->state = b;
        return Status::OK();
      case 'Q':  // BINPERSID
        RETURN_IF_ERROR(Pop(&a));
        RETURN_IF_ERROR(PushNew(Kind::kPersistentId, &v));
        v->items = {a};
        return Status::OK();
      case 'q':  // BINPUT
        RETURN_IF_ERROR(Uint(1, &n));
        return Put(n);
      case 'r':  // LONG_BINPUT
        RETURN_IF_ERROR(Uint(4, &n));
        return Put(n);
      case 0x94:  // MEMOIZE
        return Put(memo_.size());
      case 'h':  // BINGET
        RETURN_IF_ERROR(Uint(1, &n));
        return Get(n);
      case 'j':  // LONG_BINGET
        RETURN_IF_ERROR(Uint(4, &n));
        return Get(n);
      default:
        return Bad(op_at_, "opcode 0x" + Hex(op) +
                               " is not read (text-protocol, extension-registry and "
                               "out-of-band opcodes are refused)");
    }
  }

  static std::string Hex(uint8_t b) {
    static const char* kHex = "0123456789abcdef";
    return std::string{kHex[b >> 4], kHex[b & 15]};
  }

  std::string_view in_;
  const std::string& where_;
  Limits limits_;
  uint64_t base_;
  uint64_t* needed_;
  std::unique_ptr<Tree> tree_;
  uint64_t pos_ = 0;
  uint64_t op_at_ = 0;
  uint64_t bytes_ = 0;
  std::vector<Value*> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Value*> memo_;
};

Result<std::unique_ptr<Tree>> Parse(std::string_view bytes, const std::string& where,
                                    const Limits& limits, uint64_t* consumed) {
  return Parse(bytes, where, limits, consumed, ParseOptions{});
}

Result<std::unique_ptr<Tree>> Parse(std::string_view bytes, const std::string& where,
                                    const Limits& limits, uint64_t* consumed,
                                    const ParseOptions& options) {
  Machine m(bytes, where, limits, options);
  return m.Run(consumed);
}

}  // namespace ckptkv::checkpoint::pickle
