// The writers behind `ckptkv export` (checkpoint/core/pickle_writer.h,
// zip_writer.h): pickles read back by the project's pickle machine as the
// values written, zip files read back by its zip reader, and the export
// directory refusing every path that would leave it.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "checkpoint/core/pickle_machine.h"
#include "checkpoint/core/pickle_writer.h"
#include "checkpoint/core/zip_archive.h"
#include "checkpoint/core/zip_writer.h"
#include "tests/python_tree.h"

using namespace ckptkv;
using namespace ckptkv::checkpoint;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  TempDir() {
    std::string t = (fs::temp_directory_path() / "ckptkv-export-test-XXXXXX").string();
    REQUIRE(::mkdtemp(t.data()) != nullptr);
    path = t;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string path;
};

std::unique_ptr<pickle::Tree> Reparse(const std::string& bytes) {
  uint64_t consumed = 0;
  auto t = pickle::Parse(bytes, "test", pickle::Limits::ForSize(bytes.size()), &consumed);
  INFO(t.status().ToString());
  REQUIRE(t.ok());
  REQUIRE(consumed == bytes.size());
  return std::move(*t);
}

// Builds a state tree node with FlatBuffers (tests/python_tree.h's nodes).
struct TreeBuilder {
  flatbuffers::FlatBufferBuilder b;
  using Off = testing::NodeOffset;
  Off Int(int64_t i) { return testing::IntNode(b, i); }
  Off Str(fb::NodeKind k, const std::string& s) { return testing::TextNode(b, k, s); }
  Off Tensor(const std::string& param) { return Str(fb::NodeKind::Tensor, param); }
  Off Items(fb::NodeKind k, const std::vector<Off>& items, const std::string& cls = "",
            int64_t form = 0) {
    if (k == fb::NodeKind::Object) return testing::ObjectNode(b, cls, form, items);
    return testing::SeqNode(b, k, items);
  }
  Off Dict(const std::vector<Off>& keys, const std::vector<Off>& values) {
    auto k = b.CreateVector(keys);
    auto v = b.CreateVector(values);
    fb::NodeBuilder n(b);
    n.add_kind(fb::NodeKind::Dict);
    n.add_keys(k);
    n.add_items(v);
    return n.Finish();
  }
  const fb::Node* Finish(Off root) {
    b.Finish(root);
    return flatbuffers::GetRoot<fb::Node>(b.GetBufferPointer());
  }
};

}  // namespace

TEST_CASE("pickle writer: every opcode reads back as the value written", "[export]") {
  pickle::Writer w;
  const std::vector<int64_t> ints = {0,    1,         255,       256,         65535,     65536,
                                     -1,   INT32_MIN, INT32_MAX, 2147483648,  INT64_MAX, INT64_MIN,
                                     -129, -32768,    1ll << 40, -(1ll << 40)};
  w.EmptyList();
  w.Mark();
  for (int64_t i : ints) w.Int(i);
  const std::vector<std::string> bigs = {"18446744073709551616", "-18446744073709551616",
                                         "-9223372036854775809", "1267650600228229401496703205376",
                                         std::string(500, '9'),  "-" + std::string(1000, '7')};
  for (const auto& s : bigs) REQUIRE(w.BigInt(s).ok());
  w.Float(-0.25);
  w.String("h\xc3\xa9llo");
  w.Bytes(std::string("\x00\xff\x80", 3));
  w.None();
  w.Bool(true);
  w.Bool(false);
  w.Appends();
  const uint32_t list_memo = w.Put();
  w.EmptyDict();
  w.Mark();
  w.String("k");
  w.Get(list_memo);
  w.SetItems();
  w.EmptyList();
  w.Mark();
  const std::vector<size_t> sizes = {0, 1, 2, 3, 4, 7};
  for (size_t n : sizes) {
    if (pickle::Writer::TupleNeedsMark(n)) w.Mark();
    for (size_t i = 0; i < n; ++i) w.Int(static_cast<int64_t>(i));
    w.TupleOf(n);
  }
  w.Appends();
  w.Build();     // recorded as the dict's state
  w.TupleOf(2);  // (list, dict)
  w.Stop();
  CHECK_FALSE(w.BigInt("12a").ok());
  CHECK_FALSE(w.BigInt("").ok());
  CHECK_FALSE(w.BigInt(std::string(4301, '1')).ok());

  auto tree = Reparse(w.bytes());
  REQUIRE(tree->root()->kind == pickle::Kind::kTuple);
  REQUIRE(tree->root()->items.size() == 2);
  const pickle::Value* root = tree->root()->items[1];
  REQUIRE(root->kind == pickle::Kind::kDict);
  CHECK(root->items[1] == tree->root()->items[0]);  // BINGET gives the memoized list
  REQUIRE(root->items.size() == 2);
  CHECK(root->items[0]->text == "k");
  const pickle::Value* list = root->items[1];
  REQUIRE(list->kind == pickle::Kind::kList);
  REQUIRE(list->items.size() == ints.size() + bigs.size() + 6);
  for (size_t i = 0; i < ints.size(); ++i) {
    INFO(ints[i]);
    CHECK(list->items[i]->kind == pickle::Kind::kInt);
    CHECK(list->items[i]->i == ints[i]);
  }
  for (size_t i = 0; i < bigs.size(); ++i) {
    const pickle::Value* v = list->items[ints.size() + i];
    CHECK(v->kind == pickle::Kind::kBigInt);
    CHECK(v->text == bigs[i]);
  }
  size_t at = ints.size() + bigs.size();
  CHECK(list->items[at]->kind == pickle::Kind::kFloat);
  CHECK(list->items[at]->d == -0.25);
  CHECK(list->items[at + 1]->text == "h\xc3\xa9llo");
  const pickle::Value* bytes = list->items[at + 2];
  REQUIRE(bytes->kind == pickle::Kind::kCall);
  CHECK(pickle::QualifiedName(bytes->items[0]) == "_codecs.encode");
  CHECK(bytes->items[1]->items[0]->text ==
        std::string("\x00\xc3\xbf\xc2\x80", 5));  // latin-1 as UTF-8
  CHECK(bytes->items[1]->items[1]->text == "latin1");
  CHECK(list->items[at + 3]->kind == pickle::Kind::kNone);
  CHECK(list->items[at + 4]->b);
  CHECK_FALSE(list->items[at + 5]->b);
  REQUIRE(root->state != nullptr);
  REQUIRE(root->state->items.size() == sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    CHECK(root->state->items[i]->kind == pickle::Kind::kTuple);
    CHECK(root->state->items[i]->items.size() == sizes[i]);
  }
}

TEST_CASE("pickle writer: a state tree as torch.save pickles it", "[export]") {
  TreeBuilder t;
  auto w = t.Tensor("model/w");
  auto tied = t.Tensor("model/w");
  auto od = t.Items(
      fb::NodeKind::Object,
      {t.Dict({t.Str(fb::NodeKind::String, "w"), t.Str(fb::NodeKind::String, "t")}, {w, tied})},
      "collections:OrderedDict", 0);
  auto size = t.Items(fb::NodeKind::Object, {t.Items(fb::NodeKind::Tuple, {t.Int(2), t.Int(3)})},
                      "torch:Size", 0);
  auto nested = t.Items(fb::NodeKind::Object, {t.Int(2)}, "m:Outer.Inner", 1);
  const fb::Node* root = t.Finish(t.Items(fb::NodeKind::List, {od, size, nested}));
  std::vector<std::string> asked;
  pickle::PickleHooks hooks;
  hooks.tensor = [&](const std::string& param, const std::string& device) {
    asked.push_back(param);
    pickle::PickledTensor p;
    p.key = std::to_string(asked.size() - 1);
    p.dtype = fb::DType::BFloat16;
    p.shape = {2, 3};
    return Result<pickle::PickledTensor>(p);
  };
  auto bytes = pickle::PickleStateTree(root, hooks, "f.pt", 1000);
  REQUIRE(bytes.ok());
  CHECK(asked == std::vector<std::string>{"model/w"});  // tied: asked once
  auto tree = Reparse(*bytes);
  const pickle::Value* list = tree->root();
  REQUIRE(list->kind == pickle::Kind::kList);
  REQUIRE(list->items.size() == 3);
  const pickle::Value* dict = list->items[0];
  REQUIRE(dict->kind == pickle::Kind::kCall);
  CHECK(pickle::QualifiedName(dict->items[0]) == "collections.OrderedDict");
  REQUIRE(dict->set_items.size() == 4);
  const pickle::Value* tensor = dict->set_items[1];
  CHECK(dict->set_items[3] == tensor);  // one tensor object, memoized
  REQUIRE(tensor->kind == pickle::Kind::kCall);
  CHECK(pickle::QualifiedName(tensor->items[0]) == "torch._utils._rebuild_tensor_v2");
  const pickle::Value* args = tensor->items[1];
  REQUIRE(args->items.size() == 6);
  const pickle::Value* pid = args->items[0];
  REQUIRE(pid->kind == pickle::Kind::kPersistentId);
  const pickle::Value* id = pid->items[0];
  CHECK(id->items[0]->text == "storage");
  CHECK(pickle::QualifiedName(id->items[1]) == "torch.BFloat16Storage");
  CHECK(id->items[2]->text == "0");
  CHECK(id->items[3]->text == "cpu");
  CHECK(id->items[4]->i == 6);
  CHECK(args->items[3]->items[0]->i == 3);  // strides (3, 1)
  CHECK(args->items[3]->items[1]->i == 1);
  CHECK(pickle::QualifiedName(list->items[1]->items[0]) == "torch.Size");
  // A nested class is reached through getattr, as protocol 2 needs.
  const pickle::Value* e = list->items[2];
  REQUIRE(e->kind == pickle::Kind::kCall);
  const pickle::Value* cls = e->items[0];
  REQUIRE(cls->kind == pickle::Kind::kCall);
  CHECK(pickle::QualifiedName(cls->items[0]) == "builtins.getattr");
  CHECK(pickle::QualifiedName(cls->items[1]->items[0]) == "m.Outer");
  CHECK(cls->items[1]->items[1]->text == "Inner");

  SECTION("the node budget bounds the work") {
    auto small = pickle::PickleStateTree(root, hooks, "f.pt", 3);
    REQUIRE_FALSE(small.ok());
    CHECK(small.status().message().find("more than 3 nodes") != std::string::npos);
  }
  SECTION("a stored class that would run code on torch.load is refused, naming it") {
    // Enum form is `cls(value)` in the pickle: os.system("...") on load.
    for (const char* cls : {"os:system", "posix:system", "builtins:eval", "subprocess:Popen",
                            "importlib:import_module", "m:Outer.__reduce__"}) {
      TreeBuilder u;
      const fb::Node* bad =
          u.Finish(u.Items(fb::NodeKind::Object, {u.Str(fb::NodeKind::String, "id")}, cls, 1));
      auto r = pickle::PickleStateTree(bad, hooks, "f.pt", 100);
      INFO(cls);
      REQUIRE_FALSE(r.ok());
      CHECK(r.status().message().find(cls) != std::string::npos);
      CHECK(r.status().message().find("does not write") != std::string::npos);
    }
  }
  SECTION("an unknown builtin class is refused, naming it") {
    TreeBuilder u;
    const fb::Node* bad = u.Finish(u.Items(fb::NodeKind::Object, {u.Int(1)}, "builtins:eval", 0));
    auto r = pickle::PickleStateTree(bad, hooks, "f.pt", 100);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().message().find("builtins:eval") != std::string::npos);
  }
}

TEST_CASE("zip writer: the zip reader reads what it writes, aligned, with ZIP64", "[export]") {
  TempDir tmp;
  for (bool zip64 : {false, true}) {
    INFO(zip64);
    auto dir = ExportDir::Open(tmp.path);
    REQUIRE(dir.ok());
    const std::string rel = zip64 ? "z64.pt" : "z.pt";
    auto f = (*dir)->Create(rel);
    REQUIRE(f.ok());
    ZipWriterOptions zo;
    zo.force_zip64 = zip64;
    ZipWriter zip(f->get(), zo);
    REQUIRE(zip.Add("archive/data.pkl", "pickle bytes").ok());
    std::string big(100000, '\0');
    for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7);
    REQUIRE(zip.Begin("archive/data/0", big.size()).ok());
    REQUIRE(zip.Append(big.data(), 40000).ok());
    REQUIRE(zip.Append(big.data() + 40000, big.size() - 40000).ok());
    CHECK_FALSE(zip.Append("x", 1).ok());  // past its size
    REQUIRE(zip.End().ok());
    REQUIRE(zip.Add("archive/version", "3\n").ok());
    REQUIRE(zip.Finish().ok());
    REQUIRE((*f)->SyncAndClose().ok());
    auto z = ZipArchive::Open((*f)->temp_path());
    REQUIRE(z.ok());
    REQUIRE((*z)->entries().size() == 3);
    CHECK((*z)->Prefix() == "archive");
    for (const auto& e : (*z)->entries()) CHECK(e.data_offset % 64 == 0);
    const ZipEntry* d = (*z)->Find("archive/data/0");
    REQUIRE(d != nullptr);
    auto got = (*z)->Read(*d, big.size());  // CRC-checked
    REQUIRE(got.ok());
    CHECK(*got == big);
    REQUIRE((*dir)->Commit(f->get(), false).ok());
    CHECK(fs::exists(tmp.path + "/" + rel));
  }
}

TEST_CASE("zip writer: the sliced CRC-32 equals the reader's", "[export]") {
  std::string bytes(1000, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 131 + 7);
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  for (size_t n : {0, 1, 7, 8, 9, 100, 1000}) {
    INFO(n);
    CHECK(Crc32Sliced(p, n) == Crc32(p, n));
    CHECK(Crc32Sliced(p + n / 2, n - n / 2, Crc32Sliced(p, n / 2)) == Crc32(p, n));
  }
}

TEST_CASE("export directory: unsafe paths and symlinks are refused", "[export]") {
  for (const char* bad : {"", "/etc/passwd", "../x.pt", "a/../../x.pt", "a/./b.pt", "a//b.pt", "a/",
                          "..", ".", "x\n.pt", ".ckptkv-export-1-x.partial"}) {
    INFO(bad);
    Status s = ExportDir::CheckRelative(bad);
    CHECK(s.code() == Status::Code::kInvalidArgument);
    CHECK(s.message().find("refusing to write") != std::string::npos);
  }
  CHECK_FALSE(ExportDir::CheckRelative(std::string("a\0b", 3)).ok());
  CHECK(ExportDir::CheckRelative("global_step1/zero/a.b/fp32.pt").ok());
  CHECK(ExportDir::CheckRelative("..a/b..").ok());

  TempDir tmp;
  const std::string out = tmp.path + "/out", elsewhere = tmp.path + "/elsewhere";
  fs::create_directories(out);
  fs::create_directories(elsewhere);
  fs::create_directory_symlink(elsewhere, out + "/link");
  auto dir = ExportDir::Open(out);
  REQUIRE(dir.ok());
  auto through = (*dir)->Create("link/x.pt");
  REQUIRE_FALSE(through.ok());
  CHECK(through.status().message().find("symlink") != std::string::npos);
  CHECK(fs::is_empty(elsewhere));
  // A final symlink is replaced, never written through.
  fs::create_symlink(elsewhere + "/target", out + "/f.pt");
  auto exists = (*dir)->Exists("f.pt");
  REQUIRE(exists.ok());
  CHECK(*exists);
  {
    auto f = (*dir)->Create("f.pt");
    REQUIRE(f.ok());
    REQUIRE((*f)->Write("abc", 3).ok());
    CHECK((*dir)->Commit(f->get(), false).code() == Status::Code::kAlreadyExists);
  }
  {
    auto f = (*dir)->Create("f.pt");
    REQUIRE(f.ok());
    REQUIRE((*f)->Write("abc", 3).ok());
    REQUIRE((*dir)->Commit(f->get(), true).ok());
  }
  CHECK(fs::is_regular_file(fs::symlink_status(out + "/f.pt")));
  CHECK(fs::is_empty(elsewhere));
  // A temporary file not committed is removed, and so are the directories
  // made for it.
  {
    auto f = (*dir)->Create("new/sub/g.pt");
    REQUIRE(f.ok());
    REQUIRE((*f)->Write("abc", 3).ok());
  }
  (*dir)->RemoveCreatedDirs();
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(out)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  CHECK(names == std::vector<std::string>{"f.pt", "link"});
}
