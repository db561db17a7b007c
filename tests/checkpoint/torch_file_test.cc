// The readers of torch.save files (checkpoint/core/pickle_machine.h,
// zip_archive.h, legacy_archive.h): files written by Debian's Python and torch in the test
// read into the trees Python's unpickler would act on, and hostile input is
// a Corruption naming its byte offset, with nothing run.
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "checkpoint/core/legacy_archive.h"
#include "checkpoint/core/pickle_machine.h"
#include "checkpoint/core/zip_archive.h"

using namespace ckptkv;
using namespace ckptkv::checkpoint;
using namespace std::string_literals;
namespace fs = std::filesystem;

namespace {

const char* kPython = "/usr/bin/python3";

struct TempDir {
  TempDir() {
    char tmpl[] = "/tmp/ckptkv-torch-file-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string path;
};

// Runs a Python script (argv[1] = dir); false when Debian's Python or its
// torch is missing, which the project's install-deps.sh provides.
bool RunPython(const std::string& dir, const std::string& script) {
  const std::string file = dir + "/make.py";
  std::ofstream(file) << script;
  const std::string cmd = std::string(kPython) + " " + file + " " + dir + " 2>&1";
  return std::system(cmd.c_str()) == 0;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A compact rendering of a tree, bounded in depth.
std::string Show(const pickle::Value* v, int depth = 0) {
  using pickle::Kind;
  if (v == nullptr) return "<null>";
  if (depth > 32) return "...";
  auto join = [&](const std::vector<const pickle::Value*>& xs, bool pairs) {
    std::string s;
    for (size_t i = 0; i < xs.size(); ++i) {
      if (i) s += pairs && i % 2 ? ": " : ", ";
      s += Show(xs[i], depth + 1);
    }
    return s;
  };
  std::string out;
  switch (v->kind) {
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return v->b ? "True" : "False";
    case Kind::kInt:
      return std::to_string(v->i);
    case Kind::kBigInt:
      return v->text;
    case Kind::kFloat: {
      std::ostringstream o;
      o << v->d;
      return o.str();
    }
    case Kind::kString:
      return "'" + v->text + "'";
    case Kind::kBytes:
      return "b'" + v->text + "'";
    case Kind::kByteArray:
      return "bytearray(b'" + v->text + "')";
    case Kind::kList:
      return "[" + join(v->items, false) + "]";
    case Kind::kTuple:
      return "(" + join(v->items, false) + (v->items.size() == 1 ? ",)" : ")");
    case Kind::kDict:
      return "{" + join(v->items, true) + "}";
    case Kind::kSet:
      return "set(" + join(v->items, false) + ")";
    case Kind::kFrozenSet:
      return "frozenset(" + join(v->items, false) + ")";
    case Kind::kGlobal:
      return pickle::QualifiedName(v);
    case Kind::kCall:
    case Kind::kNewObj:
      out = (v->kind == Kind::kNewObj ? "new " : "") + Show(v->items[0], depth + 1) +
            Show(v->items[1], depth + 1);
      if (!v->appended.empty()) out += "+[" + join(v->appended, false) + "]";
      if (!v->set_items.empty()) out += "+{" + join(v->set_items, true) + "}";
      break;
    case Kind::kPersistentId:
      return "pid" + Show(v->items[0], depth + 1);
  }
  if (v->state != nullptr) out += ".build(" + Show(v->state, depth + 1) + ")";
  return out;
}

Result<std::unique_ptr<pickle::Tree>> ParseBytes(const std::string& bytes) {
  return pickle::Parse(bytes, "t.pkl", pickle::Limits::ForSize(bytes.size()));
}

}  // namespace

TEST_CASE("pickles Python writes read into the trees its unpickler acts on", "[unit][checkpoint]") {
  TempDir dir;
  REQUIRE(RunPython(dir.path, R"(
import argparse, collections, pickle, sys
with open(sys.argv[1] + "/ds.py", "w") as f:
    f.write("import enum\nclass Stage(enum.IntEnum):\n    two = 2\n")
sys.path.insert(0, sys.argv[1])
from ds import Stage
od = collections.OrderedDict([("w", 1), ("b", [2.5, None])])
od._metadata = {"": {"version": 1}}
value = {"od": od, "set": {7}, "fs": frozenset(), "big": 2**70, "neg": -2**40, "small": -1,
         "bytes": b"ab", "ba": bytearray(b"c"), "ns": argparse.Namespace(lr=0.5),
         "t": (1, 2, 3, 4), "same": [od, od], "s": "h\u00e9", "stage": Stage.two}
for proto in (2, 4, 5):
    with open("%s/p%d.pkl" % (sys.argv[1], proto), "wb") as f:
        pickle.dump(value, f, protocol=proto)
)"));
  for (int proto : {2, 4, 5}) {
    INFO("protocol " << proto);
    const std::string bytes = ReadFile(dir.path + "/p" + std::to_string(proto) + ".pkl");
    uint64_t consumed = 0;
    auto tree = pickle::Parse(bytes, "p.pkl", pickle::Limits::ForSize(bytes.size()), &consumed);
    REQUIRE(tree.ok());
    CHECK(consumed == bytes.size());
    const std::string s = Show((*tree)->root());
    INFO(s);
    CHECK(s.find("'od': collections.OrderedDict()+{'w': 1, 'b': [2.5, None]}.build({'_metadata': "
                 "{'': {'version': 1}}})") != std::string::npos);
    CHECK(s.find("'big': 1180591620717411303424") != std::string::npos);
    CHECK(s.find("'neg': -1099511627776") != std::string::npos);
    CHECK(s.find("'small': -1") != std::string::npos);
    CHECK(s.find("'bytes': ") != std::string::npos);
    CHECK(s.find("argparse.Namespace") != std::string::npos);
    CHECK(s.find("'t': (1, 2, 3, 4)") != std::string::npos);
    CHECK(s.find("'s': 'h\xc3\xa9'") != std::string::npos);
    // Both enum forms: cls(value), and getattr(cls, name) as Python 3.11.2 writes it.
    CHECK((s.find("'stage': ds.Stage(2,)") != std::string::npos ||
           s.find("'stage': builtins.getattr(ds.Stage, 'two')") != std::string::npos));
    // The memo: the second reference is the same node.
    const pickle::Value* root = (*tree)->root();
    const pickle::Value* same = nullptr;
    for (size_t i = 0; i + 1 < root->items.size(); i += 2) {
      if (root->items[i]->text == "same") same = root->items[i + 1];
    }
    REQUIRE(same != nullptr);
    REQUIRE(same->items.size() == 2);
    CHECK(same->items[0] == same->items[1]);
  }
}

TEST_CASE("torch.save's zip files: entries, storages and the data.pkl tree", "[unit][checkpoint]") {
  TempDir dir;
  REQUIRE(RunPython(dir.path, R"(
import sys, torch, zipfile
base = torch.arange(12, dtype=torch.float32)
sd = {"w": base.view(3, 4), "view": base[2:5], "bf": torch.ones(2, dtype=torch.bfloat16),
      "p": torch.nn.Parameter(torch.zeros(2)), "size": torch.Size([3, 4]), "dt": torch.float16}
torch.save(sd, sys.argv[1] + "/sd.pt")
with zipfile.ZipFile(sys.argv[1] + "/deflated.zip", "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("archive/data.pkl", b"x" * 1000)
with zipfile.ZipFile(sys.argv[1] + "/zip64.zip", "w") as z:
    with z.open("archive/data/0", "w", force_zip64=True) as f:
        f.write(b"0123456789")
)"));
  auto zip = ZipArchive::Open(dir.path + "/sd.pt");
  REQUIRE(zip.ok());
  const std::string prefix = (*zip)->Prefix();
  CHECK(prefix == "sd");
  const ZipEntry* pkl = (*zip)->Find(prefix + "/data.pkl");
  REQUIRE(pkl != nullptr);
  auto bytes = (*zip)->Read(*pkl, 1 << 20);
  REQUIRE(bytes.ok());
  auto tree = ParseBytes(*bytes);
  REQUIRE(tree.ok());
  const std::string s = Show((*tree)->root());
  INFO(s);
  // A view and its base name one storage; storages are persistent ids.
  CHECK(s.find("torch._utils._rebuild_tensor_v2(pid('storage', torch.FloatStorage, '0', 'cpu', "
               "12), 0, (3, 4), (4, 1), False, collections.OrderedDict())") != std::string::npos);
  CHECK(s.find("(pid('storage', torch.FloatStorage, '0', 'cpu', 12), 2, (3,), (1,)") !=
        std::string::npos);
  CHECK(s.find("torch.BFloat16Storage") != std::string::npos);
  CHECK(s.find("torch._utils._rebuild_parameter(") != std::string::npos);
  CHECK(s.find("'size': torch.Size((3, 4),)") != std::string::npos);
  CHECK(s.find("'dt': torch.float16") != std::string::npos);
  const ZipEntry* storage = (*zip)->Find(prefix + "/data/0");
  REQUIRE(storage != nullptr);
  CHECK(storage->size == 48);
  CHECK(storage->data_offset % 64 == 0);  // torch aligns records
  float row[4];
  REQUIRE((*zip)->ReadRange(*storage, 16, 16, reinterpret_cast<uint8_t*>(row)).ok());
  CHECK(row[0] == 4.0f);
  CHECK(row[3] == 7.0f);
  CHECK((*zip)->ReadRange(*storage, 40, 16, reinterpret_cast<uint8_t*>(row)).IsCorruption());

  auto deflated = ZipArchive::Open(dir.path + "/deflated.zip");
  REQUIRE(deflated.ok());
  auto r = (*deflated)->Read((*deflated)->entries()[0], 1 << 20);
  CHECK(r.status().code() == Status::Code::kNotSupported);
  CHECK(r.status().message().find("compressed") != std::string::npos);

  auto z64 = ZipArchive::Open(dir.path + "/zip64.zip");
  REQUIRE(z64.ok());
  auto got = (*z64)->Read((*z64)->entries()[0], 100);
  REQUIRE(got.ok());
  CHECK(*got == "0123456789");

  // A flipped byte of a storage fails its CRC; a cut file is no zip.
  std::string sd = ReadFile(dir.path + "/sd.pt");
  sd[storage->data_offset + 3] ^= 1;
  std::ofstream(dir.path + "/flipped.pt", std::ios::binary) << sd;
  auto flipped = ZipArchive::Open(dir.path + "/flipped.pt");
  REQUIRE(flipped.ok());
  CHECK((*flipped)->Read(*(*flipped)->Find(prefix + "/data/0"), 1 << 20).status().IsCorruption());
  // A directory entry whose sizes point past the end of the file.
  {
    std::string bad = ReadFile(dir.path + "/sd.pt");
    const std::string sig("PK\x01\x02", 4);
    const size_t at = bad.find(sig);
    REQUIRE(at != std::string::npos);
    for (int i = 0; i < 8; ++i) bad[at + 20 + i] = static_cast<char>(0xF0);  // both sizes
    std::ofstream(dir.path + "/sizes.pt", std::ios::binary) << bad;
    auto z = ZipArchive::Open(dir.path + "/sizes.pt");
    CHECK(z.status().IsCorruption());
    CHECK(z.status().message().find("past the end") != std::string::npos);
  }
  for (size_t cut : {sd.size() / 2, sd.size() - 10, size_t{10}}) {
    std::ofstream(dir.path + "/cut.pt", std::ios::binary) << sd.substr(0, cut);
    auto c = ZipArchive::Open(dir.path + "/cut.pt");
    INFO(cut);
    CHECK(c.status().IsCorruption());
  }
}

TEST_CASE("hostile pickles are Corruption at their offset and run nothing", "[unit][checkpoint]") {
  TempDir dir;
  const std::string sentinel = dir.path + "/pwned";
  // os.system("touch <sentinel>") as pickle writes it: recorded, never called.
  const std::string cmd = "touch " + sentinel;
  const std::string evil =
      "\x80\x02"
      "cos\nsystem\nX"s +
      std::string(1, static_cast<char>(cmd.size())) + std::string(3, '\0') + cmd + "\x85R.";
  auto tree = ParseBytes(evil);
  REQUIRE(tree.ok());
  CHECK(Show((*tree)->root()) == "os.system('" + cmd + "',)");
  CHECK_FALSE(fs::exists(sentinel));

  struct Case {
    std::string bytes;
    std::string what;
  };
  const std::vector<Case> cases{
      {""s, "ends without STOP"},
      {"\x80\x02]"s, "ends without STOP"},
      {"\x80\x09N."s, "protocol 9"},
      {"\x80\x02N0."s, "STOP with 0"},
      {"\x80\x02NN."s, "STOP with 2"},
      {"\x80\x02h\x05."s, "memo entry 5"},
      {"\x80\x02j\x00\x00\x00\x01."s, "memo entry 16777216"},
      {"\x80\x02X\xff\xff\xff\x7f"
       "abc."s,
       "beyond the limit"},
      {"\x80\x02\x8b\xff\xff\x00\x00"s, "beyond the limit"},
      {"\x80\x02"s + std::string(100000, '(') + "N.", "STOP with 1 values"},
      {"\x80\x02"s + std::string(100000, ']') + ".", "STOP with 100000 values"},
      {"\x80\x02NNa."s, "appends to a None"},
      {"\x80\x02NN\x86\x85\x85\x86."s, "too few"},
      {"\x80\x02"
       "cos\nsystem"s,
       "newline"},
      {"\x80\x02NNR."s, "not a tuple"},
      {"\x80\x02(N."s, "STOP with 1"},
      {"\x80\x02I1\n."s, "opcode 0x49"},
      {"\x80\x02\x82\x01."s, "opcode 0x82"},
      {"\x80\x02\x97."s, "opcode 0x97"},
      {"\x80\x02N\x95\xff\xff\xff\xff\xff\xff\xff\x7f."s, "frame longer"},
      {"\x80\x02](NNu."s, "sets items of a list"},
      {"\x80\x02}N\x85"
       "bN\x85"
       "b."s,
       "built already"},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    auto r = ParseBytes(c.bytes);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().IsCorruption());
    CHECK(r.status().message().find(c.what) != std::string::npos);
    CHECK(r.status().message().find("t.pkl: pickle at byte ") != std::string::npos);
  }
  // An int beyond Python's 4300-digit limit is refused, not converted.
  std::string huge = "\x80\x02\x8b";
  const uint32_t n = 4000;
  huge.append(reinterpret_cast<const char*>(&n), 4);
  huge += std::string(n, '\x7f') + ".";
  auto h = ParseBytes(huge);
  CHECK(h.status().message().find("4300 digits") != std::string::npos);
  // A list that holds itself parses (the memo allows it); walkers bound depth.
  auto loop = ParseBytes("\x80\x02]q\x00h\x00\x61."s);
  REQUIRE(loop.ok());
  CHECK((*loop)->root()->items.size() == 1);
  CHECK((*loop)->root()->items[0] == (*loop)->root());
}

namespace {

std::string Le(uint64_t v, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
  return out;
}
std::string Str(const std::string& s) { return "X" + Le(s.size(), 4) + s; }
// A protocol-2 pickle of a storage id ('storage', torch.<type>, key, 'cpu',
// numel, None) as the legacy format writes it (numel as LONG1, 8 bytes).
std::string StorageId(const std::string& type, const std::string& key, uint64_t numel) {
  return "(" + Str("storage") + "ctorch\n" + type + "\n" + Str(key) + Str("cpu") + "\x8a\x08" +
         Le(numel, 8) + "Nt" + "Q";
}
// A legacy file: the magic, version and sys_info pickles, `main`, a list
// of `keys`, then `records` as they are.
std::string LegacyFile(const std::string& main, const std::vector<std::string>& keys,
                       const std::string& records, bool little_endian = true) {
  std::string out = "\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19."s;
  out += "\x80\x02M\xe9\x03."s;
  out += "\x80\x02}(" + Str("protocol_version") + "M\xe9\x03" + Str("little_endian") +
         (little_endian ? "\x88" : "\x89") + "u.";
  out += "\x80\x02" + main + ".";
  out += "\x80\x02](";
  for (const auto& k : keys) out += Str(k);
  out += "e.";
  return out + records;
}
std::string Record(uint64_t count, const std::string& bytes) { return Le(count, 8) + bytes; }
// The file with its (empty) storage list replaced by None.
std::string NotAList(const std::string& file) {
  return file.substr(0, file.size() - 6) + "\x80\x02N.";
}

}  // namespace

TEST_CASE("torch.save's legacy files: pickles, storage records and the main tree",
          "[unit][checkpoint]") {
  TempDir dir;
  REQUIRE(RunPython(dir.path, R"(
import sys, torch
base = torch.arange(12, dtype=torch.float32)
sd = {"w": base.view(3, 4), "view": base[2:5], "bf": torch.ones(2, dtype=torch.bfloat16),
      "long": torch.arange(3), "s": "x" * 200000}
for proto in (2, 4):
    torch.save(sd, "%s/legacy%d.pt" % (sys.argv[1], proto), _use_new_zipfile_serialization=False,
               pickle_protocol=proto)
torch.save(sd, sys.argv[1] + "/zip.pt")
)"));
  for (int proto : {2, 4}) {
    INFO("protocol " << proto);
    const std::string path = dir.path + "/legacy" + std::to_string(proto) + ".pt";
    const std::string bytes = ReadFile(path);
    CHECK(LegacyArchive::LooksLegacy(bytes.substr(0, 32)));
    auto a = LegacyArchive::Open(path);
    REQUIRE(a.ok());
    // A main pickle of more than the first 64 KiB window (the long str).
    CHECK((*a)->pickle_size() > 200000);
    const pickle::Value* root = (*a)->tree().root();
    CHECK(root->offset >= (*a)->pickle_offset());
    CHECK(root->offset < (*a)->pickle_offset() + 16);
    const std::string s = Show(root);
    INFO(s.substr(0, 2000));
    CHECK(s.find("torch._utils._rebuild_tensor_v2(pid('storage', torch.FloatStorage, '") !=
          std::string::npos);
    CHECK(s.find("', 'cpu', 12, None), 2, (3,), (1,)") != std::string::npos);
    REQUIRE((*a)->storages().size() == 3);
    uint64_t end = 0;
    for (const auto& st : (*a)->storages()) {
      CHECK(st.size == st.numel * st.itemsize);
      CHECK(st.data_offset >= end + 8);
      end = st.data_offset + st.size;
      CHECK((*a)->Find(st.key) == &st);
      if (st.type == "FloatStorage") {
        CHECK(st.numel == 12);
        float row[4];
        REQUIRE((*a)->ReadRange(st, 16, 16, reinterpret_cast<uint8_t*>(row)).ok());
        CHECK(row[0] == 4.0f);
        CHECK(row[3] == 7.0f);
        CHECK((*a)->ReadRange(st, 40, 16, reinterpret_cast<uint8_t*>(row)).IsCorruption());
      } else {
        CHECK((st.type == "BFloat16Storage" || st.type == "LongStorage"));
      }
    }
    CHECK(end == bytes.size());
    CHECK((*a)->Find("nope") == nullptr);
    // Cut anywhere (in a record, in a count, in a pickle): Corruption.
    for (size_t cut : {bytes.size() - 1, end - (*a)->storages().back().size - 4,
                       static_cast<size_t>((*a)->pickle_offset() + 100000), size_t{20}}) {
      INFO("cut at " << cut);
      std::ofstream(dir.path + "/cut.pt", std::ios::binary) << bytes.substr(0, cut);
      auto c = LegacyArchive::Open(dir.path + "/cut.pt");
      REQUIRE_FALSE(c.ok());
      CHECK(c.status().IsCorruption());
      CHECK(c.status().message().find("at byte ") != std::string::npos);
    }
  }
  // A zip file is not a legacy file.
  CHECK_FALSE(LegacyArchive::LooksLegacy(ReadFile(dir.path + "/zip.pt").substr(0, 32)));
  auto z = LegacyArchive::Open(dir.path + "/zip.pt");
  CHECK(z.status().IsCorruption());
  CHECK(z.status().message().find("not a legacy torch.save file") != std::string::npos);
}

TEST_CASE("hostile legacy files are Corruption at their offset, never a huge read",
          "[unit][checkpoint]") {
  TempDir dir;
  const std::string floats(16, '\x01');  // 4 float32
  struct Case {
    std::string name, bytes, what;
    bool not_supported = false;
  };
  const std::vector<Case> cases{
      {"good", LegacyFile(StorageId("FloatStorage", "k", 4), {"k"}, Record(4, floats)), ""},
      {"truncated", LegacyFile(StorageId("FloatStorage", "k", 4), {"k"}, Record(4, "abc")),
       "runs past the end"},
      {"count", LegacyFile(StorageId("FloatStorage", "k", 4), {"k"}, Record(5, floats)),
       "holds 5 elements; its id"},
      {"beyond",
       LegacyFile(StorageId("FloatStorage", "k", 1000000), {"k"}, Record(1000000, floats)),
       "runs past the end"},
      {"overflow",
       LegacyFile(StorageId("FloatStorage", "k", uint64_t{1} << 62), {"k"},
                  Record(uint64_t{1} << 62, floats)),
       "runs past the end"},
      {"no count", LegacyFile(StorageId("FloatStorage", "k", 4), {"k"}, "\x04\x00"), "count"},
      {"unknown key",
       LegacyFile(StorageId("FloatStorage", "k", 4), {"k", "other"},
                  Record(4, floats) + Record(4, floats)),
       "no storage id of the pickle names"},
      {"twice", LegacyFile(StorageId("FloatStorage", "k", 4), {"k", "k"}, Record(4, floats)),
       "names k twice"},
      {"unlisted", LegacyFile(StorageId("FloatStorage", "k", 4), {}, ""),
       "not in the storage list"},
      {"two types",
       LegacyFile("(" + StorageId("FloatStorage", "k", 4) + StorageId("IntStorage", "k", 4) + "l",
                  {"k"}, Record(4, floats)),
       "is named as"},
      {"unknown type", LegacyFile(StorageId("QInt8Storage", "k", 4), {"k"}, Record(4, "abcd")),
       "not read", true},
      {"big-endian", LegacyFile(StorageId("FloatStorage", "k", 4), {"k"}, Record(4, floats), false),
       "big-endian", true},
      {"list", NotAList(LegacyFile(StorageId("FloatStorage", "k", 4), {}, "")),
       "the storage list is not a list"},
      // A string claiming 2 GiB of a small file fails at once.
      {"claim",
       LegacyFile("X\xff\xff\xff\x7f"
                  "abc"s,
                  {}, ""),
       "at byte"},
      {"no magic", "\x80\x02K\x01."s, "not a legacy torch.save file"},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    const std::string path = dir.path + "/" + c.name + ".pt";
    std::ofstream(path, std::ios::binary) << c.bytes;
    auto a = LegacyArchive::Open(path);
    if (c.what.empty()) {
      REQUIRE(a.ok());
      REQUIRE((*a)->storages().size() == 1);
      CHECK((*a)->storages()[0].size == 16);
      continue;
    }
    REQUIRE_FALSE(a.ok());
    INFO(a.status().ToString());
    CHECK(a.status().message().find(c.what) != std::string::npos);
    if (c.not_supported) {
      CHECK(a.status().code() == Status::Code::kNotSupported);
    } else {
      CHECK(a.status().IsCorruption());
      CHECK(a.status().message().find("at byte ") != std::string::npos);
    }
  }
}

TEST_CASE("a pickle cut short says how much more it needs", "[unit][checkpoint]") {
  const std::string full = "\x80\x02X\x05\x00\x00\x00hello."s;
  pickle::ParseOptions o;
  uint64_t needed = 0;
  o.needed = &needed;
  o.base = 1000;
  auto cut = pickle::Parse(full.substr(0, 9), "p", pickle::Limits::ForSize(9), nullptr, o);
  REQUIRE_FALSE(cut.ok());
  CHECK(needed == 12);  // the string's 5 bytes end at 12
  CHECK(cut.status().message().find("pickle at byte 1002") != std::string::npos);
  auto nostop = pickle::Parse(full.substr(0, 12), "p", pickle::Limits::ForSize(12), nullptr, o);
  CHECK(needed == 13);
  uint64_t consumed = 0;
  auto whole = pickle::Parse(full, "p", pickle::Limits::ForSize(full.size()), &consumed, o);
  REQUIRE(whole.ok());
  CHECK(needed == 0);
  CHECK((*whole)->root()->offset == 1002);
  // Other errors need nothing more.
  auto bad = pickle::Parse("\x80\x02NN."s, "p", pickle::Limits::ForSize(5), nullptr, o);
  REQUIRE_FALSE(bad.ok());
  CHECK(needed == 0);
}
