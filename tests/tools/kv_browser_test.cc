// kv-browser end to end: runs the program on a store with known contents
// (tests/tools/kv_browser_fixture.h) and checks its JSON fields and values
// against what was saved, its exit codes and its messages.
#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "store/names.h"
#include "store/store.h"
#include "tests/raw_db.h"
#include "tests/test_util.h"
#include "tests/tools/kv_browser_fixture.h"

using json = nlohmann::json;
using namespace ckptkv;
using ckptkv::testing::TempDir;

namespace {

struct Run {
  int rc = -1;
  std::string out, err;
  json j() const {
    INFO("stdout: " << out << "\nstderr: " << err);
    return json::parse(out);
  }
};

std::string Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// Runs kv-browser with `args` (stdin from /dev/null).
Run KvBrowser(const std::string& db, const std::vector<std::string>& args) {
  static int counter = 0;
  std::string base = std::filesystem::temp_directory_path() /
                     ("kvb-run-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
  std::string cmd = Quote(KV_BROWSER_BIN) + " --db " + Quote(db);
  for (const auto& a : args) cmd += " " + Quote(a);
  cmd += " >" + base + ".out 2>" + base + ".err </dev/null";
  int status = std::system(cmd.c_str());
  Run r;
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = Slurp(base + ".out");
  r.err = Slurp(base + ".err");
  std::filesystem::remove(base + ".out");
  std::filesystem::remove(base + ".err");
  return r;
}

struct Fixture {
  TempDir dir;
  std::string db = dir.Sub("store");
  Fixture() {
    Status s = testing::WriteFixtureStore(db);
    INFO(s.ToString());
    REQUIRE(s.ok());
  }
};

double L2(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

}  // namespace

TEST_CASE("tags: times, counts, bytes, sharing and latest", "[tools][kv-browser]") {
  Fixture f;
  Run r = KvBrowser(f.db, {"tags", "--json"});
  REQUIRE(r.rc == 0);
  json tags = r.j();
  REQUIRE(tags.is_array());
  REQUIRE(tags.size() == 3);
  CHECK(tags[0]["tag"] == "step1");
  CHECK(tags[2]["latest"] == true);
  CHECK(tags[0]["latest"] == false);
  const uint64_t step1_logical = 8192 + 2 * 8192 + 2 * 128 + 32 + 32 + 4096;
  CHECK(tags[0]["logical_bytes"] == step1_logical);
  CHECK(tags[0]["files"] == 2);
  CHECK(tags[0]["tensors"] == 8);
  CHECK(tags[0]["committed_at"].get<std::string>().size() == 19);
  // Every chunk is new; the two chunks of embed.weight hold equal bytes (one block).
  CHECK(tags[0]["new_bytes"] == 4096 + 2 * 8192 + 4096);
  CHECK(tags[1]["new_bytes"] == 8192);  // both chunks of layers.1.weight changed
  CHECK(tags[2]["new_bytes"] == 0);     // step3 repeats step2
  CHECK(tags[2]["shared_bytes"] == 4096 + 2 * 8192 + 4096);
  CHECK(tags[2]["unique_bytes"] == 2 * 128 + 32 + 8);  // inline tensors only
  CHECK(tags[2]["dedup_ratio"].is_null());
  CHECK(tags[1]["dedup_ratio"].get<double>() ==
        Approx(static_cast<double>(tags[1]["logical_bytes"].get<uint64_t>()) / 8192));

  Run text = KvBrowser(f.db, {"tags"});
  REQUIRE(text.rc == 0);
  CHECK(text.out.find("* step3") != std::string::npos);
}

TEST_CASE("tree: files with coordinates, parameters, collapsed runs", "[tools][kv-browser]") {
  Fixture f;
  Run r = KvBrowser(f.db, {"tree", "step1", "--json"});
  REQUIRE(r.rc == 0);
  json t = r.j();
  REQUIRE(t["files"].size() == 2);
  json model = t["files"][0], optim = t["files"][1];
  CHECK(model["file"] == testing::kModelFile);
  CHECK(model["coordinates"]["pp"] == 0);
  CHECK(model["coordinates"]["tp"] == 0);
  CHECK(optim["coordinates"]["dp"] == 1);
  CHECK(optim["coordinates"]["kind"] == "optim_states");
  CHECK(model["tensors"] == 7);
  bool seen = false;
  for (const auto& p : model["params"]) {
    if (p["param"] == "module/embed.weight") {
      seen = true;
      CHECK(p["dtype"] == "bfloat16");
      CHECK(p["shape"] == json::array({256, 16}));
      CHECK(p["bytes"] == 8192);
    }
  }
  CHECK(seen);

  Run text = KvBrowser(f.db, {"tree", "latest"});
  REQUIRE(text.rc == 0);
  CHECK(text.out.find("module/layers.{0..1}.weight") != std::string::npos);
  CHECK(text.out.find("pp=0 tp=0 dp=1") != std::string::npos);

  Run filtered = KvBrowser(f.db, {"tree", "step1", "*.bias", "--json"});
  REQUIRE(filtered.rc == 0);
  json ft = filtered.j();
  REQUIRE(ft["files"].size() == 1);
  CHECK(ft["files"][0]["params"].size() == 2);
  Run regex = KvBrowser(f.db, {"tree", "step1", "--regex", "layers\\.[01]\\.w", "--json"});
  REQUIRE(regex.rc == 0);
  CHECK(regex.j()["files"][0]["params"].size() == 2);
}

TEST_CASE("show: chunks, digests and the tags that share them", "[tools][kv-browser]") {
  Fixture f;
  Run r =
      KvBrowser(f.db, {"show", "step1", testing::kModelFile, "module/layers.0.weight", "--json"});
  REQUIRE(r.rc == 0);
  json s = r.j();
  CHECK(s["dtype"] == "float32");
  CHECK(s["bytes"] == 8192);
  REQUIRE(s["chunks"].size() == 2);
  CHECK(s["chunks"][1]["offset"] == 4096);
  CHECK(s["chunks"][0]["digest"].get<std::string>().size() == 32);
  CHECK(s["chunks"][0]["shared_with"] == json::array({"step2", "step3"}));
  CHECK(s["placement"].is_null());

  Run changed =
      KvBrowser(f.db, {"show", "step1", testing::kModelFile, "module/layers.1.weight", "--json"});
  REQUIRE(changed.rc == 0);
  CHECK(changed.j()["chunks"][0]["shared_with"].empty());
}

TEST_CASE("stats and hist: values of known tensors", "[tools][kv-browser]") {
  Fixture f;
  Run r = KvBrowser(f.db, {"stats", "step1", "module/*", "--json"});
  REQUIRE(r.rc == 0);
  json st = r.j();
  std::map<std::string, json> by;
  for (const auto& p : st["params"]) by[p["param"]] = p;
  REQUIRE(by.count("module/layers.0.weight"));
  std::vector<float> w = testing::LayerWeight(0);
  double mn = w[0], mx = w[0], sum = 0;
  for (float x : w) {
    mn = std::min<double>(mn, x);
    mx = std::max<double>(mx, x);
    sum += x;
  }
  double mean = sum / w.size(), var = 0;
  for (float x : w) var += (x - mean) * (x - mean);
  const json& l0 = by["module/layers.0.weight"];
  CHECK(l0["min"].get<double>() == mn);
  CHECK(l0["max"].get<double>() == mx);
  CHECK(l0["mean"].get<double>() == Approx(mean));
  CHECK(l0["std"].get<double>() == Approx(std::sqrt(var / w.size())));
  CHECK(l0["l2_norm"].get<double>() == Approx(L2(w)));
  CHECK(l0["count"] == 2048);

  const json& sp = by["module/special"];
  CHECK(sp["nan"] == 1);
  CHECK(sp["inf"] == 1);
  CHECK(sp["zeros"] == 2);
  CHECK(sp["min"] == -1.0);
  CHECK(sp["max"] == 3.0);
  CHECK(sp["mean"].get<double>() == Approx(5.0 / 6.0));

  const json& emb = by["module/embed.weight"];  // bfloat16 decoded
  CHECK(emb["min"] == -32.0);
  CHECK(emb["max"] == 31.0);
  CHECK(emb["mean"].get<double>() == Approx(-0.5));

  Run none = KvBrowser(f.db, {"stats", "step1", "nothing*"});
  CHECK(none.rc == 1);

  Run h = KvBrowser(f.db, {"hist", "step1", "module/embed.weight", "--bins", "4", "--json"});
  REQUIRE(h.rc == 0);
  json hist = h.j();
  REQUIRE(hist["buckets"].size() == 4);
  uint64_t total = 0;
  for (const auto& b : hist["buckets"]) total += b["count"].get<uint64_t>();
  CHECK(total == 4096);
  CHECK(hist["buckets"][0]["lo"] == -32.0);
  CHECK(hist["buckets"][0]["count"] == 16 * 64);  // [-32, -16.25): 16 of every 64 values
  Run ht = KvBrowser(f.db, {"hist", "step1", "module/embed.weight"});
  REQUIRE(ht.rc == 0);
  CHECK(ht.out.find("#####") != std::string::npos);
}

TEST_CASE("peek: first values, slices, every dtype, out of range", "[tools][kv-browser]") {
  Fixture f;
  Run r = KvBrowser(f.db, {"peek", "step2", "module/steps", "--json"});
  REQUIRE(r.rc == 0);
  CHECK(r.j()["values"] == json::array({1, 2, 3, 4}));
  Run row = KvBrowser(f.db, {"peek", "step2", "module/steps", "1, :", "--json"});
  REQUIRE(row.rc == 0);
  CHECK(row.j()["values"] == json::array({3, 4}));
  CHECK(row.j()["result_shape"] == json::array({2}));
  Run rev = KvBrowser(f.db, {"peek", "step2", "module/steps", "::-1, 1", "--json"});
  REQUIRE(rev.rc == 0);
  CHECK(rev.j()["values"] == json::array({4, 2}));
  Run half = KvBrowser(f.db, {"peek", "step2", "module/head.weight", "--json"});
  REQUIRE(half.rc == 0);
  CHECK(half.j()["values"] == json::array({1.0, 0.5, -2.0, 65504.0}));
  Run sp = KvBrowser(f.db, {"peek", "step1", "module/special", "--json"});
  REQUIRE(sp.rc == 0);
  CHECK(sp.j()["values"][0] == "nan");
  CHECK(sp.j()["values"][1] == "inf");
  Run w = KvBrowser(f.db, {"peek", "step1", "module/layers.0.weight", "63, 30:", "--json"});
  REQUIRE(w.rc == 0);
  std::vector<float> lw = testing::LayerWeight(0);
  CHECK(w.j()["values"] == json::array({lw[63 * 32 + 30], lw[63 * 32 + 31]}));
  Run text = KvBrowser(f.db, {"peek", "step2", "module/steps", ":, :"});
  REQUIRE(text.rc == 0);
  CHECK(text.out.find("[[1, 2],\n [3, 4]]") != std::string::npos);

  Run oob = KvBrowser(f.db, {"peek", "step2", "module/steps", "5"});
  CHECK(oob.rc == 1);
  CHECK(oob.err.find("out of range") != std::string::npos);
  Run dims = KvBrowser(f.db, {"peek", "step2", "module/steps", "0,0,0"});
  CHECK(dims.rc == 1);
  CHECK(dims.err.find("dimensions") != std::string::npos);
}

TEST_CASE("diff: added, removed, reshaped, changed, reading only differing chunks",
          "[tools][kv-browser]") {
  Fixture f;
  Run r = KvBrowser(f.db, {"diff", "step1", "step2", "--json"});
  REQUIRE(r.rc == 0);
  json d = r.j();
  REQUIRE(d["added"].size() == 1);
  CHECK(d["added"][0]["param"] == "module/head.weight");
  REQUIRE(d["removed"].size() == 1);
  CHECK(d["removed"][0]["param"] == "module/special");
  REQUIRE(d["reshaped"].size() == 1);
  CHECK(d["reshaped"][0]["to"]["shape"] == json::array({2, 2}));
  REQUIRE(d["changed"].size() == 1);
  const json& c = d["changed"][0];
  CHECK(c["param"] == "module/layers.1.weight");
  CHECK(c["elements_changed"] == 2);
  CHECK(c["chunks_differing"] == 2);
  CHECK(c["max_abs_diff"] == 1.0);
  CHECK(c["l2_diff"].get<double>() == Approx(std::sqrt(1.25)));
  CHECK(c["frac_changed"].get<double>() == Approx(2.0 / 2048));
  CHECK(d["unchanged"] == 5);
  CHECK(d["bytes_read"] == 2 * 8192);  // the two chunks of one tensor, in both tags

  Run same = KvBrowser(f.db, {"diff", "step2", "step3", "--json"});
  REQUIRE(same.rc == 0);
  CHECK(same.j()["changed"].empty());
  CHECK(same.j()["bytes_read"] == 0);
}

TEST_CASE("history: norm and digest across tags", "[tools][kv-browser]") {
  Fixture f;
  Run r = KvBrowser(f.db, {"history", "module/layers.1.weight", "--json"});
  REQUIRE(r.rc == 0);
  json h = r.j();
  REQUIRE(h["tags"].size() == 3);
  CHECK(h["tags"][0]["l2_norm"].get<double>() == Approx(L2(testing::LayerWeight(1))));
  CHECK(h["tags"][1]["changed"] == true);
  CHECK(h["tags"][2]["changed"] == false);
  CHECK(h["tags"][1]["digest"] == h["tags"][2]["digest"]);
  Run sp = KvBrowser(f.db, {"history", "module/special", "--json"});
  REQUIRE(sp.rc == 0);
  CHECK(sp.j()["tags"][1]["present"] == false);
  Run missing = KvBrowser(f.db, {"history", "module/layers.1.weigth"});
  CHECK(missing.rc == 1);
  CHECK(missing.err.find("closest: module/layers.1.weight") != std::string::npos);
}

TEST_CASE("meta: the non-tensor state", "[tools][kv-browser]") {
  Fixture f;
  Run r = KvBrowser(f.db, {"meta", "step2", testing::kModelFile, "--json"});
  REQUIRE(r.rc == 0);
  json m = r.j();
  const json& st = m["files"][0]["state"];
  CHECK(st["iteration"] == 200);
  CHECK(st["args"]["lr"] == 0.001);
  CHECK(st["args"]["name"] == "tiny");
  CHECK(st["ds_config"]["train_batch_size"] == 8);
  CHECK(!st.contains("module"));  // only tensors: left out
  Run t = KvBrowser(f.db, {"meta", "step2", testing::kModelFile, "--tensors", "--json"});
  REQUIRE(t.rc == 0);
  CHECK(t.j()["files"][0]["state"]["module"]["steps"]["shape"] == json::array({2, 2}));
  Run text = KvBrowser(f.db, {"meta", "step1"});
  REQUIRE(text.rc == 0);
  CHECK(text.out.find("iteration: 100") != std::string::npos);
}

TEST_CASE("du: unique and shared bytes by tag and by file", "[tools][kv-browser]") {
  Fixture f;
  Run r = KvBrowser(f.db, {"du", "--json"});
  REQUIRE(r.rc == 0);
  json d = r.j();
  REQUIRE(d["groups"].size() == 3);
  CHECK(d["groups"][0]["group"] == "step1");
  CHECK(d["groups"][0]["unique_bytes"] == 8192 + 256 + 32 + 32);  // old layers.1 + inline
  CHECK(d["referenced_block_bytes"] == 4096 + 8192 * 3 + 4096);
  Run byf = KvBrowser(f.db, {"du", "--by", "file", "--json"});
  REQUIRE(byf.rc == 0);
  CHECK(byf.j()["groups"].size() == 2);
  Run byp = KvBrowser(f.db, {"du", "--by", "param-prefix", "--depth", "1", "--json"});
  REQUIRE(byp.rc == 0);
  CHECK(byp.j()["groups"].size() == 2);  // module, optimizer
}

TEST_CASE("verify: sound store, then damaged blocks reported by tag, file, param",
          "[tools][kv-browser]") {
  Fixture f;
  Run ok = KvBrowser(f.db, {"verify", "--json"});
  REQUIRE(ok.rc == 0);
  CHECK(ok.j()["ok"] == true);
  CHECK(ok.j()["blocks_checked"] == 8);  // distinct blocks
  for (const auto& e : std::filesystem::directory_iterator(f.db)) {
    if (e.path().extension() != ".blob") continue;
    std::fstream file(e.path(), std::ios::in | std::ios::out | std::ios::binary);
    auto size = std::filesystem::file_size(e.path());
    for (uint64_t off = 64; off + 8 < size; off += 1024) {
      file.seekp(static_cast<std::streamoff>(off));
      file.write("\xde\xad\xbe\xef\xde\xad\xbe\xef", 8);
    }
  }
  Run bad = KvBrowser(f.db, {"verify", "--json"});
  CHECK(bad.rc == 2);
  json b = bad.j();
  CHECK(b["ok"] == false);
  REQUIRE(!b["problems"].empty());
  CHECK(!b["problems"][0]["param"].get<std::string>().empty());
  Run text = KvBrowser(f.db, {"verify", "step1"});
  CHECK(text.rc == 2);
  CHECK(text.err.find("problem: tag=step1 file=") != std::string::npos);
  Run stats = KvBrowser(f.db, {"stats", "step1", "module/layers.0.weight"});
  CHECK(stats.rc == 2);  // a damaged block is corruption, never a crash
}

TEST_CASE("rm, keep and gc: plan first, write only when asked", "[tools][kv-browser]") {
  Fixture f;
  Run plan = KvBrowser(f.db, {"rm", "step1", "--dry-run", "--json"});
  REQUIRE(plan.rc == 0);
  CHECK(plan.j()["reclaimable_bytes"] == 8192);  // the old layers.1.weight
  CHECK(plan.j()["deleted"].empty());
  Run refused = KvBrowser(f.db, {"rm", "step1"});
  CHECK(refused.rc == 1);
  CHECK(refused.err.find("--yes") != std::string::npos);
  CHECK(KvBrowser(f.db, {"tags", "--json"}).j().size() == 3);

  Run rm = KvBrowser(f.db, {"rm", "step1", "--yes", "--json"});
  REQUIRE(rm.rc == 0);
  CHECK(rm.j()["deleted"] == json::array({"step1"}));
  Run gc_plan = KvBrowser(f.db, {"gc", "--dry-run", "--json"});
  REQUIRE(gc_plan.rc == 0);
  CHECK(gc_plan.j()["blocks_removed"] == 2);
  CHECK(gc_plan.j()["bytes_removed"] == 8192);
  Run gc = KvBrowser(f.db, {"gc", "--yes", "--json"});
  REQUIRE(gc.rc == 0);
  CHECK(gc.j()["dry_run"] == false);
  CHECK(gc.j()["blocks_removed"] == 2);
  CHECK(KvBrowser(f.db, {"verify"}).rc == 0);

  Run keep = KvBrowser(f.db, {"keep", "--last", "1", "--yes", "--gc", "--json"});
  REQUIRE(keep.rc == 0);
  CHECK(keep.j()["deleted"] == json::array({"step2"}));
  CHECK(keep.j()["gc"]["blocks_removed"] == 0);  // step3 holds the same blocks
  json tags = KvBrowser(f.db, {"tags", "--json"}).j();
  REQUIRE(tags.size() == 1);
  CHECK(tags[0]["tag"] == "step3");
  Run missing = KvBrowser(f.db, {"rm", "step9", "--yes"});
  CHECK(missing.rc == 1);
  CHECK(missing.err.find("closest: step3") != std::string::npos);
}

TEST_CASE("reads while a writer holds the store, and refuses to write", "[tools][kv-browser]") {
  Fixture f;
  StoreOptions o;
  o.create_if_missing = false;
  auto writer = Store::Open(f.db, o);
  REQUIRE(writer.ok());
  Run tags = KvBrowser(f.db, {"tags", "--json"});
  REQUIRE(tags.rc == 0);
  CHECK(tags.j().size() == 3);
  Run gc = KvBrowser(f.db, {"gc", "--yes"});
  CHECK(gc.rc == 1);
  CHECK(gc.err.find("locked by") != std::string::npos);
  Run rm = KvBrowser(f.db, {"rm", "step1", "--yes"});
  CHECK(rm.rc == 1);
  // A commit made by the writer is seen by the next (re)open.
  std::vector<uint8_t> bytes(100, 7);
  REQUIRE((*writer)->BeginTag("step4").ok());
  TensorMeta meta;
  meta.dtype = fb::DType::UInt8;
  meta.shape = {100};
  ByteSource src;
  src.length = bytes.size();
  src.data = bytes.data();
  REQUIRE((*writer)->PutTensor("step4", "f.pt", "x", meta, src).ok());
  flatbuffers::FlatBufferBuilder b;
  fb::NodeBuilder nb(b);
  nb.add_kind(fb::NodeKind::None);
  auto root = nb.Finish();
  b.Finish(fb::CreateStateTree(b, root));
  REQUIRE(
      (*writer)
          ->PutFile("step4", "f.pt",
                    std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize()))
          .ok());
  REQUIRE((*writer)->CommitTag("step4", CommitOptions()).ok());
  Run after = KvBrowser(f.db, {"peek", "step4", "x", "--json"});
  REQUIRE(after.rc == 0);
  CHECK(after.j()["values"][0] == 7);
}

TEST_CASE("export: safetensors shards with index, re-read, confined to the directory",
          "[tools][kv-browser]") {
  Fixture f;
  std::string out = f.dir.Sub("export");
  Run r = KvBrowser(f.db, {"export", "step1", "--format", "safetensors", "--out", out, "--file",
                           testing::kModelFile, "--exclude", "module/special", "--json"});
  REQUIRE(r.rc == 0);
  CHECK(r.j()["verified"] == true);
  CHECK(r.j()["tensors"] == 6);
  std::string bytes = Slurp(out + "/model.safetensors");
  REQUIRE(bytes.size() > 8);
  uint64_t hlen = 0;
  std::memcpy(&hlen, bytes.data(), 8);
  CHECK(hlen % 8 == 0);
  json header = json::parse(bytes.substr(8, hlen));
  const json& w = header["module/layers.0.weight"];
  CHECK(w["dtype"] == "F32");
  CHECK(w["shape"] == json::array({64, 32}));
  uint64_t begin = w["data_offsets"][0];
  std::vector<float> lw = testing::LayerWeight(0);
  CHECK(std::memcmp(bytes.data() + 8 + hlen + begin, lw.data(), lw.size() * 4) == 0);
  CHECK(header["module/embed.weight"]["dtype"] == "BF16");
  CHECK(!header.contains("module/special"));
  json index = json::parse(Slurp(out + "/model.safetensors.index.json"));
  CHECK(index["weight_map"]["module/steps"] == "model.safetensors");

  Run again = KvBrowser(f.db, {"export", "step1", "--out", out, "--file", testing::kModelFile});
  CHECK(again.rc == 1);
  CHECK(again.err.find("already holds safetensors files") != std::string::npos);

  std::string sharded = f.dir.Sub("sharded");
  Run s =
      KvBrowser(f.db, {"export", "step2", "--out", sharded, "--max-shard-size", "10KiB", "--json"});
  REQUIRE(s.rc == 0);
  CHECK(s.j()["files"].size() >= 3);
  json sindex = json::parse(Slurp(sharded + "/model.safetensors.index.json"));
  CHECK(sindex["weight_map"].size() == 8);  // two files: names are file/param
  CHECK(sindex["metadata"]["total_size"] == s.j()["total_bytes"]);
  for (const auto& e : std::filesystem::directory_iterator(f.dir.path())) {
    CHECK((e.path().filename() == "store" || e.path().filename() == "export" ||
           e.path().filename() == "sharded"));
  }
}

TEST_CASE("bad input: clear messages and exit codes", "[tools][kv-browser]") {
  Fixture f;
  Run nostore = KvBrowser(f.dir.Sub("missing"), {"tags"});
  CHECK(nostore.rc == 1);
  CHECK(nostore.err.find("does not exist") != std::string::npos);
  std::filesystem::create_directories(f.dir.Sub("plain"));
  std::ofstream(f.dir.Sub("plain/file")) << "hi";
  Run plain = KvBrowser(f.dir.Sub("plain"), {"tags"});
  CHECK(plain.rc == 1);
  CHECK(plain.err.find("not a ckptkv store") != std::string::npos);
  Run tag = KvBrowser(f.db, {"tree", "stepp1"});
  CHECK(tag.rc == 1);
  CHECK(tag.err.find("closest: step1") != std::string::npos);
  Run param = KvBrowser(f.db, {"peek", "step1", "module/embed.wieght"});
  CHECK(param.rc == 1);
  CHECK(param.err.find("module/embed.weight") != std::string::npos);
  Run file = KvBrowser(f.db, {"show", "step1", "mp_rank_01_model_states.pt", "x"});
  CHECK(file.rc == 1);
  CHECK(file.err.find("closest: mp_rank_00_model_states.pt") != std::string::npos);
  Run usage = KvBrowser(f.db, {"frobnicate"});
  CHECK(usage.rc == 1);
  Run piped = KvBrowser(f.db, {});
  CHECK(piped.rc == 1);
  for (const Run* run : {&nostore, &plain, &tag, &param, &file}) {
    CHECK(run->err.find("rocksdb") == std::string::npos);
  }
}

TEST_CASE("a corrupt record is exit code 2 with the record named, never a crash",
          "[tools][kv-browser]") {
  Fixture f;
  {
    testing::RawDb raw(f.db);
    raw.Put("tensors", TensorKey("step2", testing::kModelFile, "module/layers.0.weight"),
            std::string(40, '\x7f'));
  }
  Run tree = KvBrowser(f.db, {"tree", "step2"});
  CHECK(tree.rc == 2);
  CHECK(tree.err.find("module/layers.0.weight") != std::string::npos);
  Run verify = KvBrowser(f.db, {"verify", "--json"});
  CHECK(verify.rc == 2);
  json v = verify.j();
  REQUIRE(v["problems"].size() == 1);
  CHECK(v["problems"][0]["tag"] == "step2");
  CHECK(v["problems"][0]["param"] == "module/layers.0.weight");
  CHECK(KvBrowser(f.db, {"tree", "step1"}).rc == 0);  // other tags still browse
}

namespace {

// The files in `dir`, sorted.
std::vector<std::string> Listing(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    out.push_back(e.path().filename().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Checks a safetensors file against the format, independently of the
// exporter: 8-byte LE header length, a JSON object whose tensors have a
// known dtype, non-negative shape and data_offsets holding shape x dtype
// bytes, tiling the data buffer in order; __metadata__ values are strings.
// Returns "" or what is wrong.
std::string SafetensorsProblem(const std::string& bytes) {
  if (bytes.size() < 8) return "shorter than 8 bytes";
  uint64_t hlen = 0;
  for (int i = 0; i < 8; ++i) hlen |= uint64_t{static_cast<uint8_t>(bytes[i])} << (8 * i);
  if (hlen > bytes.size() - 8) return "header length past the end";
  json h;
  try {
    h = json::parse(bytes.substr(8, hlen));
  } catch (const std::exception& e) {
    return std::string("header is not JSON: ") + e.what();
  }
  if (!h.is_object()) return "header is not an object";
  const std::map<std::string, uint64_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"I16", 2}, {"U16", 2}, {"F16", 2}, {"BF16", 2},
      {"I32", 4},  {"U32", 4}, {"F32", 4}, {"I64", 8}, {"U64", 8}, {"F64", 8}};
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& [name, v] : h.items()) {
    if (name == "__metadata__") {
      for (const auto& [k, m] : v.items()) {
        if (!m.is_string()) return "metadata " + k + " is not a string";
      }
      continue;
    }
    if (!v.is_object() || v.size() != 3) return name + ": not {dtype, shape, data_offsets}";
    auto it = sizes.find(v.value("dtype", ""));
    if (it == sizes.end()) return name + ": bad dtype";
    uint64_t n = it->second;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) return name + ": bad shape";
      n *= d.get<uint64_t>();
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2) return name + ": bad data_offsets";
    uint64_t b = off[0], e = off[1];
    if (e < b || e - b != n) return name + ": data_offsets do not hold its shape";
    ranges.emplace_back(b, e);
  }
  std::sort(ranges.begin(), ranges.end());
  uint64_t at = 0;
  for (const auto& [b, e] : ranges) {
    if (b != at) return "tensors are not contiguous at " + std::to_string(at);
    at = e;
  }
  if (at != bytes.size() - 8 - hlen) return "tensors do not cover the data buffer";
  return "";
}

// A minimal state tree (a None root) for stores written in a test.
std::string NoneTree(uint32_t tensors, uint64_t bytes) {
  flatbuffers::FlatBufferBuilder b;
  fb::NodeBuilder nb(b);
  nb.add_kind(fb::NodeKind::None);
  auto root = nb.Finish();
  b.Finish(fb::CreateStateTree(b, root, tensors, bytes));
  return std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
}

// One tag "t" of float32 [2] tensors, {file: [params]}.
void WriteNamedStore(const std::string& dir,
                     const std::vector<std::pair<std::string, std::vector<std::string>>>& files) {
  auto s = Store::Open(dir, StoreOptions{});
  REQUIRE(s.ok());
  REQUIRE((*s)->BeginTag("t").ok());
  const float v[2] = {1.5f, -2.0f};
  for (const auto& [file, params] : files) {
    for (const auto& p : params) {
      TensorMeta meta;
      meta.shape = {2};
      ByteSource src;
      src.length = sizeof v;
      src.data = reinterpret_cast<const uint8_t*>(v);
      auto r = (*s)->PutTensor("t", file, p, meta, src);
      INFO(r.status().ToString());
      REQUIRE(r.ok());
    }
    REQUIRE((*s)->PutFile("t", file, NoneTree(static_cast<uint32_t>(params.size()), 8)).ok());
  }
  auto c = (*s)->CommitTag("t", CommitOptions{});
  INFO(c.status().ToString());
  REQUIRE(c.ok());
}

}  // namespace

// Regression: --limit and --bins were size_t options, so "-1" wrapped to a
// huge count and an overflowing value was clamped; --depth took negative
// numbers; CLI11's range check called "2abc" out of range.
TEST_CASE("options: counts are whole numbers in range, with the option named",
          "[tools][kv-browser]") {
  Fixture f;
  struct Bad {
    std::vector<std::string> args;
    std::string option;
  };
  const Bad bad[] = {
      {{"peek", "step2", "module/steps", "--limit", "-1"}, "--limit"},
      {{"peek", "step2", "module/steps", "--limit", "99999999999999999999999"}, "--limit"},
      {{"peek", "step2", "module/steps", "--limit", "0"}, "--limit"},
      {{"peek", "step2", "module/steps", "--limit", "0x10"}, "--limit"},
      {{"peek", "step2", "module/steps", "--limit", "1e3"}, "--limit"},
      {{"hist", "step2", "module/steps", "--bins", "18446744073709551617"}, "--bins"},
      {{"hist", "step2", "module/steps", "--bins", "-3"}, "--bins"},
      {{"hist", "step2", "module/steps", "--bins", "nan"}, "--bins"},
      {{"du", "--by", "param-prefix", "--depth", "-5"}, "--depth"},
      {{"keep", "--last", "2abc", "--dry-run"}, "--last"},
      {{"keep", "--last", "1", "--every", "1e1", "--dry-run"}, "--every"},
  };
  for (const auto& b : bad) {
    Run r = KvBrowser(f.db, b.args);
    INFO(b.args.back() << ": " << r.err);
    CHECK(r.rc == 1);
    CHECK(r.err.find(b.option + ": '") != std::string::npos);
    CHECK(r.err.find("whole number from") != std::string::npos);
  }
  Run ok = KvBrowser(f.db, {"peek", "step2", "module/steps", "--limit", "3", "--json"});
  REQUIRE(ok.rc == 0);
  CHECK(ok.j()["values"] == json::array({1, 2, 3}));

  // --max-shard-size: a number and a known unit, nothing else.
  for (const std::string s : {"5XiB", "nan", "inf", "-1", "0", "1e3", "10 KiB", "1.5.0K",
                              "99999999999999999999T", "MiB", ""}) {
    Run r = KvBrowser(f.db, {"export", "step1", "--out", f.dir.Sub("x"), "--max-shard-size", s});
    INFO("'" << s << "': " << r.err);
    CHECK(r.rc == 1);
    CHECK(r.err.find("--max-shard-size") != std::string::npos);
    CHECK(Listing(f.dir.Sub("x")).empty());
  }
  Run half = KvBrowser(f.db, {"export", "step1", "--out", f.dir.Sub("half"), "--max-shard-size",
                              "0.5KiB", "--json"});
  REQUIRE(half.rc == 0);
  CHECK(half.j()["files"].size() > 3);  // 512-byte shards: one per tensor
}

// Regression: slice numbers were read with strtoll (an overflow became
// INT64_MAX and was reported as that bound) and the element count of a
// slice overflowed for huge steps (0:64:INT64_MAX selected nothing,
// ::INT64_MIN negated INT64_MIN).
TEST_CASE("peek: huge, negative and zero slice steps and bounds", "[tools][kv-browser]") {
  Fixture f;
  const std::string w = "module/layers.0.weight";  // float32 [64, 32]
  std::vector<float> lw = testing::LayerWeight(0);
  auto values = [&](const std::string& slice) {
    Run r = KvBrowser(f.db, {"peek", "step1", w, slice, "--json"});
    INFO(slice << ": " << r.err);
    REQUIRE(r.rc == 0);
    return r.j()["values"];
  };
  CHECK(values("0:64:9223372036854775807, 0") == json::array({lw[0]}));
  CHECK(values("::-9223372036854775808, 0") == json::array({lw[63 * 32]}));
  CHECK(values("::9223372036854775807, -1") == json::array({lw[31]}));
  CHECK(values("-64:64:63, 1") == json::array({lw[1], lw[63 * 32 + 1]}));
  CHECK(values("5:5, 0").empty());
  CHECK(values("64:, 0").empty());
  CHECK(values("-1::-64, -1") == json::array({lw[63 * 32 + 31]}));
  json all = values("::-1, 0");
  REQUIRE(all.size() == 64);
  CHECK(all[0] == lw[63 * 32]);
  CHECK(all[63] == lw[0]);

  struct Bad {
    std::string slice, says;
  };
  const Bad bad[] = {
      {"0:99999999999999999999", "does not fit in a 64-bit integer"},
      {"-9223372036854775809", "does not fit in a 64-bit integer"},
      {"-9223372036854775808", "out of range"},
      {"9223372036854775807:", "out of range"},
      {"::0", "step must not be zero"},
      {"::-0", "step must not be zero"},
      {"1:2:3:4", "more than two ':'"},
      {"1.5", "not an integer"},
      {"0x1", "not an integer"},
      {"+-1", "not an integer"},
      {"-65:", "valid bounds are -64 to 64"},
      {"64", "valid indices are -64 to 63"},
      {"0, 32", "valid indices are -32 to 31"},
  };
  for (const auto& b : bad) {
    Run r = KvBrowser(f.db, {"peek", "step1", w, b.slice});
    INFO(b.slice << ": " << r.err);
    CHECK(r.rc == 1);
    CHECK(r.err.find(b.says) != std::string::npos);
  }
}

// Regression: a stored name that is not UTF-8 (written around the API)
// made every --json output of its tag throw in nlohmann::json's dump().
TEST_CASE("names that are not UTF-8 in a store: every command still answers",
          "[tools][kv-browser]") {
  Fixture f;
  const std::string bad = "module/bad\xff\xfe\xc0\xafname";
  {
    testing::RawDb raw(f.db);
    raw.Put("tensors", TensorKey("step1", testing::kModelFile, bad),
            raw.Get("tensors", TensorKey("step1", testing::kModelFile, "module/steps")));
  }
  const std::string shown = "module/bad\xef\xbf\xbd";  // U+FFFD
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"tags", "--json"},
           {"tree", "step1", "--json"},
           {"tree", "step1"},
           {"stats", "step1", "--json"},
           {"du", "--by", "param-prefix", "--depth", "9", "--json"},
           {"diff", "step1", "step2", "--json"},
           {"history", bad, "--json"},
           {"show", "step1", testing::kModelFile, bad, "--json"},
           {"peek", "step1", bad, "--json"},
           {"verify", "--json"},
           {"meta", "step1", "--json"}}) {
    Run r = KvBrowser(f.db, args);
    INFO(args[0] << ": " << r.err << r.out.substr(0, 2000));
    // verify reports the planted record (its file's state tree does not
    // list it) as a problem: exit 2, with a JSON report.
    CHECK(r.rc == (args[0] == "verify" ? 2 : 0));
    CHECK(r.err.find("json.exception") == std::string::npos);
    if (args.back() == "--json") {
      json j;
      CHECK_NOTHROW(j = json::parse(r.out));
      if (args[0] == "tree" || args[0] == "stats" || args[0] == "show") {
        CHECK(r.out.find(shown) != std::string::npos);
      }
    }
  }
  Run ex = KvBrowser(f.db, {"export", "step1", "--file", testing::kModelFile, "--out",
                            f.dir.Sub("export"), "--json"});
  INFO(ex.err);
  REQUIRE(ex.rc == 0);
  json skipped = ex.j()["skipped"];
  REQUIRE(skipped.size() == 1);
  CHECK(skipped[0]["reason"].get<std::string>().find("UTF-8") != std::string::npos);
  CHECK(SafetensorsProblem(Slurp(f.dir.Sub("export/model.safetensors"))) == "");
}

// Regression: a failed export left a renamed shard and a .partial file
// behind, an export into a directory holding another export's index wrote
// its shards before noticing, and --force over a larger export left the
// old shards beside the new ones.
TEST_CASE("export: all or nothing, never mixed with files already in --out",
          "[tools][kv-browser]") {
  Fixture f;
  // A foreign index (or shard) in --out: refused before anything is written.
  const std::string foreign = f.dir.Sub("foreign");
  std::filesystem::create_directories(foreign);
  std::ofstream(foreign + "/model.safetensors.index.json") << "{\"weight_map\": {}}\n";
  Run refused =
      KvBrowser(f.db, {"export", "step1", "--out", foreign, "--file", testing::kModelFile});
  CHECK(refused.rc == 1);
  CHECK(refused.err.find("already holds safetensors files") != std::string::npos);
  CHECK(refused.err.find("--force") != std::string::npos);
  CHECK(Listing(foreign) == std::vector<std::string>{"model.safetensors.index.json"});
  const std::string other = f.dir.Sub("other");
  std::filesystem::create_directories(other);
  std::ofstream(other + "/weights.safetensors") << "x";
  CHECK(KvBrowser(f.db, {"export", "step1", "--out", other}).rc == 1);
  CHECK(Listing(other) == std::vector<std::string>{"weights.safetensors"});

  // --force over a 4-shard export with a 1-shard one: only the new files.
  const std::string out = f.dir.Sub("out");
  Run four =
      KvBrowser(f.db, {"export", "step2", "--out", out, "--max-shard-size", "10KiB", "--json"});
  REQUIRE(four.rc == 0);
  REQUIRE(four.j()["files"].size() == 4);
  for (const auto& file : four.j()["files"]) {
    CHECK(SafetensorsProblem(Slurp(out + "/" + file["file"].get<std::string>())) == "");
  }
  std::ofstream(out + "/README.md") << "kept\n";
  Run one = KvBrowser(f.db, {"export", "step2", "--out", out, "--force", "--json"});
  REQUIRE(one.rc == 0);
  CHECK(Listing(out) == (std::vector<std::string>{"README.md", "model.safetensors",
                                                  "model.safetensors.index.json"}));
  CHECK(one.j()["replaced"].size() == 5);
  json index = json::parse(Slurp(out + "/model.safetensors.index.json"));
  for (const auto& [name, file] : index["weight_map"].items()) CHECK(file == "model.safetensors");
  CHECK(SafetensorsProblem(Slurp(out + "/model.safetensors")) == "");

  // A damaged block in the last shard: exit 2, and --out as it was.
  Run show = KvBrowser(
      f.db, {"show", "step2", testing::kOptimFile, "optimizer/state/0/exp_avg", "--json"});
  REQUIRE(show.rc == 0);
  const std::string hex = show.j()["chunks"][0]["digest"];
  std::string key = "B";
  for (size_t i = 0; i < 32; i += 2) {
    key.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  {
    testing::RawDb raw(f.db);
    std::string block = raw.Get("blocks", key);
    REQUIRE(block.size() > 5);
    block.back() ^= 0x5a;
    raw.Put("blocks", key, block);
  }
  const std::string failed = f.dir.Sub("failed");
  Run damaged = KvBrowser(f.db, {"export", "step2", "--out", failed, "--max-shard-size", "10KiB"});
  CHECK(damaged.rc == 2);
  CHECK(damaged.err.find("exp_avg") != std::string::npos);
  CHECK(Listing(failed).empty());
  Run over =
      KvBrowser(f.db, {"export", "step2", "--out", out, "--force", "--max-shard-size", "10KiB"});
  CHECK(over.rc == 2);
  CHECK(Listing(out) == (std::vector<std::string>{"README.md", "model.safetensors",
                                                  "model.safetensors.index.json"}));
}

// Regression: two tensors with one exported name (file "m.pt" param "x/y"
// and file "m.pt/x" param "y"), or a param named __metadata__, gave a
// header missing a tensor that the export still called verified.
TEST_CASE("export: names that would make an invalid safetensors header", "[tools][kv-browser]") {
  TempDir dir;
  const std::string clash = dir.Sub("clash");
  WriteNamedStore(clash, {{"m.pt", {"x/y", "z"}}, {"m.pt/x", {"y"}}});
  Run r = KvBrowser(clash, {"export", "t", "--out", dir.Sub("out1")});
  CHECK(r.rc == 1);
  CHECK(r.err.find("both export as 'm.pt/x/y'") != std::string::npos);
  CHECK(Listing(dir.Sub("out1")).empty());
  Run one = KvBrowser(clash, {"export", "t", "--file", "m.pt", "--out", dir.Sub("out2"), "--json"});
  REQUIRE(one.rc == 0);
  CHECK(SafetensorsProblem(Slurp(dir.Sub("out2/model.safetensors"))) == "");

  const std::string meta = dir.Sub("meta");
  WriteNamedStore(meta, {{"m.pt", {"__metadata__", "w"}}});
  Run m = KvBrowser(meta, {"export", "t", "--out", dir.Sub("out3"), "--json"});
  REQUIRE(m.rc == 0);
  CHECK(m.j()["tensors"] == 1);
  REQUIRE(m.j()["skipped"].size() == 1);
  CHECK(m.j()["skipped"][0]["name"] == "__metadata__");
  std::string bytes = Slurp(dir.Sub("out3/model.safetensors"));
  CHECK(SafetensorsProblem(bytes) == "");
  CHECK(bytes.find("\"w\"") != std::string::npos);
}
