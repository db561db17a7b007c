// kv-browser end to end: runs the program on a store with known contents
// (tests/tools/kv_browser_fixture.h) and checks its JSON fields and values
// against what was saved, its exit codes and its messages.
#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
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
  CHECK(again.err.find("already exists") != std::string::npos);

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
