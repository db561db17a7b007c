// Block codecs, codec 2 (grouped zstd) above all: byte grouping, the
// encoder's choice per chunk, round trips of every dtype through the store,
// per-save codecs, dedup across codecs, and hostile grouped blocks (every
// one a Corruption, never a crash).
#include <zstd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <tuple>

#include "store/block_codec.h"
#include "store/record_codec.h"
#include "store/store.h"
#include "tests/raw_db.h"
#include "tests/store_util.h"
#include "tests/test_util.h"

using namespace ckptkv;
using ckptkv::testing::EmptyTree;
using ckptkv::testing::RawDb;
using ckptkv::testing::TempDir;

namespace {

const std::string kFile = "mp_rank_00_model_states.pt";

std::unique_ptr<Store> OpenStore(const std::string& dir, Codec codec, uint32_t chunk = 64 * 1024) {
  StoreOptions o;
  o.chunk_size = chunk;
  o.inline_threshold = 256;
  o.codec = codec;
  auto r = Store::Open(dir, o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  return std::move(r).value();
}

uint16_t HalfBits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const int exp = static_cast<int>((x >> 23) & 0xff) - 127 + 15;
  if (exp <= 0) return static_cast<uint16_t>(sign);  // flush to zero
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00);
  return static_cast<uint16_t>(sign | (exp << 10) | ((x >> 13) & 0x3ff));
}

template <typename T>
void Append(std::vector<uint8_t>* v, T x) {
  const auto* p = reinterpret_cast<const uint8_t*>(&x);
  v->insert(v->end(), p, p + sizeof(T));
}

// `numel` elements of `dtype` shaped like trained weights (normal, small)
// for the float dtypes, small integers for the others.
std::vector<uint8_t> TensorBytes(fb::DType dtype, size_t numel, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, 0.02);
  std::uniform_int_distribution<int> small(-100, 100);
  std::uniform_int_distribution<int> tiny(-8, 8);
  std::vector<uint8_t> v;
  v.reserve(numel * DTypeSize(dtype));
  for (size_t i = 0; i < numel; ++i) {
    switch (dtype) {
      case fb::DType::Bool:
        v.push_back(static_cast<uint8_t>(rng() & 1));
        break;
      case fb::DType::UInt8:
      case fb::DType::Int8:
        v.push_back(static_cast<uint8_t>(tiny(rng)));
        break;
      case fb::DType::Int16:
        Append<int16_t>(&v, static_cast<int16_t>(small(rng)));
        break;
      case fb::DType::Int32:
        Append<int32_t>(&v, small(rng));
        break;
      case fb::DType::Int64:
        Append<int64_t>(&v, small(rng));
        break;
      case fb::DType::Float16:
        Append<uint16_t>(&v, HalfBits(static_cast<float>(normal(rng))));
        break;
      case fb::DType::BFloat16: {
        float f = static_cast<float>(normal(rng));
        uint32_t x;
        std::memcpy(&x, &f, 4);
        Append<uint16_t>(&v, static_cast<uint16_t>(x >> 16));
        break;
      }
      case fb::DType::Float32:
        Append<float>(&v, static_cast<float>(normal(rng)));
        break;
      case fb::DType::Float64:
        Append<double>(&v, normal(rng));
        break;
      case fb::DType::ComplexFloat:
        Append<float>(&v, static_cast<float>(normal(rng)));
        Append<float>(&v, static_cast<float>(normal(rng)));
        break;
      case fb::DType::ComplexDouble:
        Append<double>(&v, normal(rng));
        Append<double>(&v, normal(rng));
        break;
    }
  }
  return v;
}

std::vector<uint8_t> RandomBytes(std::mt19937_64& rng, size_t n) {
  std::vector<uint8_t> v(n);
  for (auto& x : v) x = static_cast<uint8_t>(rng());
  return v;
}

const std::vector<fb::DType>& AllDTypes() {
  static const std::vector<fb::DType> all = {
      fb::DType::Bool,    fb::DType::UInt8,   fb::DType::Int8,         fb::DType::Int16,
      fb::DType::Int32,   fb::DType::Int64,   fb::DType::Float16,      fb::DType::BFloat16,
      fb::DType::Float32, fb::DType::Float64, fb::DType::ComplexFloat, fb::DType::ComplexDouble};
  return all;
}

Result<WriteStats> PutTyped(Store& s, const std::string& tag, const std::string& param,
                            fb::DType dtype, const std::vector<uint8_t>& bytes) {
  TensorMeta meta;
  meta.dtype = dtype;
  meta.shape = {static_cast<int64_t>(bytes.size() / DTypeSize(dtype))};
  ByteSource src;
  src.length = bytes.size();
  src.data = bytes.data();
  return s.PutTensor(tag, kFile, param, meta, src);
}

TagInfo Save(Store& s, const std::string& tag,
             const std::vector<std::tuple<std::string, fb::DType, std::vector<uint8_t>>>& tensors,
             const BeginOptions& begin = BeginOptions()) {
  Status b = s.BeginTag(tag, begin);
  INFO(b.ToString());
  REQUIRE(b.ok());
  for (const auto& [param, dtype, bytes] : tensors) {
    auto r = PutTyped(s, tag, param, dtype, bytes);
    INFO(r.status().ToString());
    REQUIRE(r.ok());
  }
  REQUIRE(s.PutFile(tag, kFile, EmptyTree()).ok());
  auto r = s.CommitTag(tag, CommitOptions());
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  return r.value();
}

TensorRecordRef Record(const Store& s, const std::string& tag, const std::string& param) {
  auto r = s.GetTensorRecord(tag, kFile, param);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  return r.value();
}

std::vector<uint8_t> ReadBack(const Store& s, const std::string& tag, const std::string& param) {
  TensorRecordRef rec = Record(s, tag, param);
  std::vector<uint8_t> out(rec->byte_length());
  Status st = s.ReadTensor(*rec.get(), out.data(), out.size(), tag + ":" + param);
  INFO(st.ToString());
  REQUIRE(st.ok());
  return out;
}

std::vector<Digest> ChunksOf(const TensorRecordRef& rec) {
  std::vector<Digest> out;
  if (rec->chunks()) {
    for (const auto* c : *rec->chunks()) out.push_back(FromFb(*c));
  }
  return out;
}

// Index entries of a closed store: digest -> (codec, raw, stored).
struct IndexEntry {
  uint8_t codec = 0xff;
  uint32_t raw = 0, stored = 0;
};
IndexEntry IndexOf(RawDb& raw, const Digest& d) {
  std::string v = raw.Get("index", d.Key());
  IndexEntry e;
  REQUIRE(DecodeIndexValue(v, &e.raw, &e.stored));
  e.codec = static_cast<uint8_t>(v[8]);
  return e;
}

// A zstd frame that claims `content` bytes and holds none (one empty raw block).
std::string FrameClaiming(uint64_t content) {
  std::string f = {'\x28', '\xb5', '\x2f', '\xfd', '\xe0'};  // magic, FCS 8 bytes, one segment
  for (int i = 0; i < 8; ++i) f.push_back(static_cast<char>(content >> (8 * i)));
  f += std::string("\x01\x00\x00", 3);  // last block, raw, size 0
  return f;
}

std::string ZstdFrame(const std::vector<uint8_t>& bytes) {
  std::string f(ZSTD_compressBound(bytes.size()), '\0');
  size_t n = ZSTD_compress(f.data(), f.size(), bytes.data(), bytes.size(), 1);
  REQUIRE(!ZSTD_isError(n));
  f.resize(n);
  return f;
}

}  // namespace

TEST_CASE("byte grouping round-trips for every element size and length", "[codec]") {
  std::mt19937_64 rng(7);
  for (uint32_t es : {2u, 4u, 8u}) {
    for (size_t len : {0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 1000, 4099}) {
      auto src = RandomBytes(rng, len);
      std::vector<uint8_t> g(len), back(len);
      GroupBytes(src.data(), len, es, g.data());
      UngroupBytes(g.data(), len, es, back.data());
      CHECK(back == src);
      const size_t n = len / es;
      for (size_t j = 0; j < n; ++j) {
        for (uint32_t k = 0; k < es; ++k) REQUIRE(g[k * n + j] == src[j * es + k]);
      }
      for (size_t t = n * es; t < len; ++t) CHECK(g[t] == src[t]);  // tail ungrouped, at the end
    }
  }
}

TEST_CASE("codec names parse and print; dtypes pick their element size", "[codec]") {
  CHECK(CodecName(Codec::kGroupedZstd) == "grouped-zstd");
  CHECK(CodecName(uint8_t{9}) == "codec 9");
  CHECK(ParseCodec("raw") == Codec::kRaw);
  CHECK(ParseCodec("zstd") == Codec::kZstd);
  CHECK(ParseCodec("grouped-zstd") == Codec::kGroupedZstd);
  CHECK(!ParseCodec("lz4"));
  CHECK(IsKnownCodec(2));
  CHECK(!IsKnownCodec(3));
  CHECK(GroupElementSize(fb::DType::BFloat16) == 2);
  CHECK(GroupElementSize(fb::DType::Float16) == 2);
  CHECK(GroupElementSize(fb::DType::Float32) == 4);
  CHECK(GroupElementSize(fb::DType::ComplexFloat) == 4);
  CHECK(GroupElementSize(fb::DType::Float64) == 8);
  CHECK(GroupElementSize(fb::DType::ComplexDouble) == 8);
  for (auto dt : {fb::DType::Bool, fb::DType::UInt8, fb::DType::Int8, fb::DType::Int16,
                  fb::DType::Int32, fb::DType::Int64}) {
    CHECK(GroupElementSize(dt) == 0);
  }
}

TEST_CASE("the encoder groups floats, compresses other dtypes plainly, keeps noise raw",
          "[codec]") {
  std::mt19937_64 rng(11);
  std::string payload;
  for (size_t numel : {1000, 300000}) {  // below and above the sample threshold
    auto f32 = TensorBytes(fb::DType::Float32, numel, rng);
    f32.push_back(0x5a);  // a tail that is not a whole element
    CHECK(EncodeChunk(Codec::kGroupedZstd, 4, f32.data(), f32.size(), &payload) ==
          Codec::kGroupedZstd);
    CHECK(payload[0] == 4);
    CHECK(payload.size() < f32.size() - f32.size() / 16);
    std::string block = EncodeBlock(Codec::kGroupedZstd, f32.data(), f32.size(), 4);
    std::vector<uint8_t> out(f32.size());
    REQUIRE(DecodeBlock(block, out.data(), out.size()).ok());
    CHECK(out == f32);
    std::vector<uint8_t> scratch;
    std::fill(out.begin(), out.end(), 0);
    REQUIRE(DecodeBlock(block, out.data(), out.size(), &scratch).ok());
    CHECK(out == f32);
    // No element size: plain zstd.
    CHECK(EncodeChunk(Codec::kGroupedZstd, 0, f32.data(), f32.size(), &payload) !=
          Codec::kGroupedZstd);
    auto noise = RandomBytes(rng, numel * 4);
    CHECK(EncodeChunk(Codec::kGroupedZstd, 4, noise.data(), noise.size(), &payload) == Codec::kRaw);
    CHECK(EncodeChunk(Codec::kZstd, 0, noise.data(), noise.size(), &payload) == Codec::kRaw);
    CHECK(EncodeChunk(Codec::kRaw, 4, f32.data(), f32.size(), &payload) == Codec::kRaw);
  }
  // A chunk whose sample (its first kSampleBytes) is noise is kept raw
  // without compressing the rest: the price of not spending CPU on noise.
  auto mixed = RandomBytes(rng, kSampleBytes);
  mixed.resize(4 * kSampleBytes, 0);
  CHECK(EncodeChunk(Codec::kGroupedZstd, 4, mixed.data(), mixed.size(), &payload) == Codec::kRaw);
  CHECK(EncodeChunk(Codec::kZstd, 0, mixed.data(), mixed.size(), &payload) == Codec::kRaw);
  // Below the sample threshold the whole chunk decides.
  mixed.resize(2 * kSampleBytes);
  CHECK(EncodeChunk(Codec::kZstd, 0, mixed.data(), mixed.size(), &payload) == Codec::kZstd);
}

TEST_CASE("hostile grouped blocks are Corruption, never a crash", "[codec]") {
  std::mt19937_64 rng(13);
  auto f32 = TensorBytes(fb::DType::Float32, 3000, rng);
  const size_t len = f32.size();
  const std::string good = EncodeBlock(Codec::kGroupedZstd, f32.data(), len, 4);
  REQUIRE(static_cast<uint8_t>(good[0]) == 2);
  std::vector<uint8_t> out(len);
  auto decode = [&](const std::string& v) { return DecodeBlock(v, out.data(), len); };
  const std::string header = BlockHeader(Codec::kGroupedZstd, len);
  const std::string frame = good.substr(kBlockHeaderSize + 1);

  SECTION("truncated anywhere") {
    for (size_t n = 0; n < good.size(); ++n) {
      INFO("truncated to " << n);
      CHECK(decode(good.substr(0, n)).IsCorruption());
    }
  }
  SECTION("wrong element size byte") {
    for (int es : {0, 1, 3, 5, 6, 7, 9, 16, 255}) {
      std::string v = good;
      v[kBlockHeaderSize] = static_cast<char>(es);
      Status s = decode(v);
      CHECK(s.IsCorruption());
      CHECK(s.message().find("element size " + std::to_string(es)) != std::string::npos);
    }
    // 2 or 8 instead of 4 decodes (the frame is sound) to other bytes: the
    // digest, checked by every reader, tells.
    std::string v = good;
    v[kBlockHeaderSize] = 2;
    REQUIRE(decode(v).ok());
    CHECK(out != f32);
  }
  SECTION("a frame that decodes to another length") {
    std::vector<uint8_t> shorter(f32.begin(), f32.end() - 1);
    CHECK(decode(header + '\x04' + ZstdFrame(shorter)).IsCorruption());
    std::vector<uint8_t> longer = f32;
    longer.push_back(1);
    CHECK(decode(header + '\x04' + ZstdFrame(longer)).IsCorruption());
    // The header and the frame agree, the caller expects another length.
    CHECK(DecodeBlock(good, out.data(), len - 1).IsCorruption());
  }
  SECTION("a frame claiming a huge or a wrong content size") {
    for (uint64_t claim : {uint64_t{1} << 40, ~uint64_t{0} - 1, uint64_t{len}, uint64_t{len + 1}}) {
      INFO("claims " << claim);
      CHECK(decode(header + '\x04' + FrameClaiming(claim)).IsCorruption());
    }
  }
  SECTION("a frame without a content size, two frames, garbage") {
    // A frame without its content size (zstd may leave it out).
    ZSTD_CCtx* c = ZSTD_createCCtx();
    ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 0);
    std::string f(ZSTD_compressBound(len), '\0');
    const size_t fn = ZSTD_compress2(c, f.data(), f.size(), f32.data(), len);
    ZSTD_freeCCtx(c);
    REQUIRE(!ZSTD_isError(fn));
    f.resize(fn);
    REQUIRE(ZSTD_getFrameContentSize(f.data(), f.size()) == ZSTD_CONTENTSIZE_UNKNOWN);
    CHECK(decode(header + '\x04' + f).IsCorruption());
    CHECK(decode(good + frame).IsCorruption());
    CHECK(decode(good + "x").IsCorruption());
    CHECK(decode(header + '\x04' + "not a zstd frame at all").IsCorruption());
    CHECK(decode(header).IsCorruption());  // no element size byte
  }
  SECTION("random damage (seeded)") {
    const uint64_t seed = ckptkv::testing::TestSeed("hostile grouped blocks");
    std::mt19937_64 r(seed);
    for (int i = 0; i < 3000; ++i) {
      std::string v = good;
      const int flips = 1 + static_cast<int>(r() % 4);
      for (int k = 0; k < flips; ++k) {
        v[kBlockHeaderSize + r() % (v.size() - kBlockHeaderSize)] = static_cast<char>(r());
      }
      if (r() % 4 == 0) v.resize(kBlockHeaderSize + r() % (v.size() - kBlockHeaderSize));
      Status s = decode(v);  // either bytes (the digest judges) or Corruption
      CHECK((s.ok() || s.IsCorruption()));
    }
    for (int i = 0; i < 2000; ++i) {  // payloads of pure noise
      std::string v = header + static_cast<char>(2 << (r() % 3));
      if (r() % 2) v += std::string("\x28\xb5\x2f\xfd", 4);
      auto noise = RandomBytes(r, r() % 200);
      v.append(noise.begin(), noise.end());
      Status s = decode(v);
      CHECK((s.ok() || s.IsCorruption()));
    }
  }
}

TEST_CASE("every dtype round-trips through a grouped-zstd store, whole and in ranges", "[codec]") {
  const uint64_t seed = ckptkv::testing::TestSeed("grouped store round trips");
  std::mt19937_64 rng(seed);
  // 4099 and 262150 are not multiples of any element size: chunks end
  // mid-element; 262150 is above the sample threshold.
  for (uint32_t chunk : {4099u, 65536u, 262150u}) {
    DYNAMIC_SECTION("chunk " << chunk) {
      TempDir dir;
      std::vector<std::tuple<std::string, fb::DType, std::vector<uint8_t>>> tensors;
      for (fb::DType dt : AllDTypes()) {
        const size_t es = DTypeSize(dt);
        const size_t numel = (chunk * 3 + chunk / 2 + rng() % 1000) / es;
        tensors.emplace_back(std::string("t") + fb::EnumNameDType(dt), dt,
                             TensorBytes(dt, numel, rng));
      }
      std::vector<TensorRecordRef> records;
      {
        auto store = OpenStore(dir.path(), Codec::kGroupedZstd, chunk);
        TagInfo info = Save(*store, "g", tensors);
        CHECK(info.stored_new_bytes < info.new_bytes);
        for (const auto& [param, dt, bytes] : tensors) {
          INFO(param);
          CHECK(ReadBack(*store, "g", param) == bytes);
          TensorRecordRef rec = Record(*store, "g", param);
          records.push_back(rec);
          for (int k = 0; k < 8; ++k) {
            const uint64_t off = rng() % bytes.size();
            const uint64_t n = 1 + rng() % std::min<uint64_t>(bytes.size() - off, 2 * chunk + 5);
            std::vector<uint8_t> part(n);
            Status s = store->ReadTensorRange(*rec.get(), off, n, part.data(), param);
            INFO("range " << off << "+" << n << ": " << s.ToString());
            REQUIRE(s.ok());
            CHECK(std::equal(part.begin(), part.end(), bytes.begin() + off));
          }
        }
        auto report = store->Verify();
        REQUIRE(report.ok());
        CHECK(report->ok());
      }
      RawDb raw(dir.path());
      for (size_t i = 0; i < tensors.size(); ++i) {
        const fb::DType dt = std::get<1>(tensors[i]);
        INFO(std::get<0>(tensors[i]));
        std::map<uint8_t, int> codecs;
        for (const Digest& d : ChunksOf(records[i])) {
          IndexEntry e = IndexOf(raw, d);
          codecs[e.codec] += 1;
          if (e.codec == 0) CHECK(e.stored == e.raw + kBlockHeaderSize);
          if (e.codec != 0) CHECK(e.stored + e.raw / 16 < e.raw + kBlockHeaderSize);
        }
        if (GroupElementSize(dt) != 0) {
          CHECK(codecs[2] >= 3);  // every whole chunk; a short last one may stay raw
          CHECK(codecs[1] == 0);
        } else {
          CHECK(codecs[2] == 0);
          CHECK(codecs[1] >= 3);  // small integers compress plainly
        }
      }
    }
  }
}

TEST_CASE("noise is stored raw, trained-like floats grouped and smaller", "[codec]") {
  TempDir dir;
  std::mt19937_64 rng(17);
  auto noise = RandomBytes(rng, 600 * 1024);
  auto weights = TensorBytes(fb::DType::BFloat16, 300 * 1024, rng);
  std::vector<TensorRecordRef> recs;
  {
    auto store = OpenStore(dir.path(), Codec::kGroupedZstd, 256 * 1024);
    TagInfo a = Save(*store, "noise", {{"n", fb::DType::Float32, noise}});
    CHECK(a.new_blocks == 3);
    CHECK(a.stored_new_bytes == a.new_bytes + 3 * kBlockHeaderSize);  // stored == raw
    TagInfo b = Save(*store, "w", {{"w", fb::DType::BFloat16, weights}});
    CHECK(b.stored_new_bytes < b.new_bytes * 0.9);
    recs = {Record(*store, "noise", "n"), Record(*store, "w", "w")};
  }
  RawDb raw(dir.path());
  for (const Digest& d : ChunksOf(recs[0])) CHECK(IndexOf(raw, d).codec == 0);
  for (const Digest& d : ChunksOf(recs[1])) {
    IndexEntry e = IndexOf(raw, d);
    CHECK(e.codec == 2);
    CHECK(e.stored < e.raw);
    std::string block = raw.Get("blocks", PayloadKey(d));
    CHECK(block.size() == e.stored);
    CHECK(block[0] == 2);
    CHECK(block[kBlockHeaderSize] == 2);  // bf16: element size 2
    CHECK(raw.Get("blocks", PresenceKey(d)) == raw.Get("index", d.Key()));
  }
}

TEST_CASE("a save's codec overrides the store's; the header keeps the default", "[codec]") {
  TempDir dir;
  std::mt19937_64 rng(19);
  auto w1 = TensorBytes(fb::DType::Float32, 50000, rng);
  auto w2 = TensorBytes(fb::DType::Float32, 50000, rng);
  auto w3 = TensorBytes(fb::DType::Float32, 50000, rng);
  auto w4 = TensorBytes(fb::DType::Float32, 50000, rng);
  std::vector<TensorRecordRef> recs;
  {
    auto store = OpenStore(dir.path(), Codec::kRaw);
    Save(*store, "default", {{"w", fb::DType::Float32, w1}});
    BeginOptions grouped;
    grouped.codec = Codec::kGroupedZstd;
    Save(*store, "grouped", {{"w", fb::DType::Float32, w2}}, grouped);
    BeginOptions bad;
    bad.codec = static_cast<Codec>(7);
    CHECK(store->BeginTag("bad", bad).IsInvalidArgument());
    BeginOptions overwrite;
    overwrite.overwrite = true;
    CHECK(store->BeginTag("default", overwrite).ok());  // the old signature's meaning
    store->AbortTag("default");
    CHECK(store->BeginTag("default", BeginOptions()).IsAlreadyExists());
    recs = {Record(*store, "default", "w"), Record(*store, "grouped", "w")};
  }
  {
    // Reopened with other options: the header's codec (raw) stays the default.
    auto store = OpenStore(dir.path(), Codec::kGroupedZstd);
    Save(*store, "again", {{"w", fb::DType::Float32, w3}});
    recs.push_back(Record(*store, "again", "w"));
  }
  TempDir dir2;
  {
    auto store = OpenStore(dir2.path(), Codec::kGroupedZstd);
    BeginOptions raw_save;
    raw_save.codec = Codec::kRaw;
    Save(*store, "raw", {{"w", fb::DType::Float32, w4}}, raw_save);
    Save(*store, "grouped", {{"w", fb::DType::Float32, w1}});
    recs.push_back(Record(*store, "raw", "w"));
    recs.push_back(Record(*store, "grouped", "w"));
    CHECK(ReadBack(*store, "raw", "w") == w4);
    CHECK(ReadBack(*store, "grouped", "w") == w1);
  }
  auto codecs = [](RawDb& raw, const TensorRecordRef& r) {
    std::set<uint8_t> s;
    for (const Digest& d : ChunksOf(r)) s.insert(IndexOf(raw, d).codec);
    return s;
  };
  {
    RawDb raw(dir.path());
    CHECK(codecs(raw, recs[0]) == std::set<uint8_t>{0});
    CHECK(codecs(raw, recs[1]) == std::set<uint8_t>{2});
    CHECK(codecs(raw, recs[2]) == std::set<uint8_t>{0});
  }
  RawDb raw2(dir2.path());
  CHECK(codecs(raw2, recs[3]) == std::set<uint8_t>{0});
  CHECK(codecs(raw2, recs[4]) == std::set<uint8_t>{2});
}

TEST_CASE("the same bytes saved raw and grouped make one block", "[codec]") {
  TempDir dir;
  std::mt19937_64 rng(23);
  auto w = TensorBytes(fb::DType::Float32, 100000, rng);  // 400 KB: 7 chunks
  std::vector<TensorRecordRef> recs;
  {
    auto store = OpenStore(dir.path(), Codec::kRaw);
    TagInfo a = Save(*store, "raw", {{"w", fb::DType::Float32, w}});
    CHECK(a.new_blocks == 7);
    BeginOptions grouped;
    grouped.codec = Codec::kGroupedZstd;
    TagInfo b = Save(*store, "grouped", {{"w", fb::DType::Float32, w}}, grouped);
    CHECK(b.new_blocks == 0);  // the digest is of the raw bytes, whatever the codec
    // The other way round: grouped first, then a raw save reuses them.
    auto v = TensorBytes(fb::DType::Float32, 100000, rng);
    TagInfo c = Save(*store, "grouped2", {{"v", fb::DType::Float32, v}}, grouped);
    CHECK(c.new_blocks == 7);
    CHECK(c.stored_new_bytes < c.new_bytes);
    TagInfo d = Save(*store, "raw2", {{"v", fb::DType::Float32, v}});
    CHECK(d.new_blocks == 0);
    // Pending on both sides: two saves in flight dedup against each other.
    auto u = TensorBytes(fb::DType::Float32, 100000, rng);
    REQUIRE(store->BeginTag("p1", grouped).ok());
    REQUIRE(store->BeginTag("p2").ok());
    REQUIRE(PutTyped(*store, "p1", "u", fb::DType::Float32, u).ok());
    auto second = PutTyped(*store, "p2", "u", fb::DType::Float32, u);
    REQUIRE(second.ok());
    CHECK(second->new_blocks == 0);
    for (const char* t : {"p1", "p2"}) {
      REQUIRE(store->PutFile(t, kFile, EmptyTree()).ok());
      REQUIRE(store->CommitTag(t, CommitOptions()).ok());
    }
    CHECK(ReadBack(*store, "grouped", "w") == w);
    CHECK(ReadBack(*store, "raw2", "v") == v);
    CHECK(ReadBack(*store, "p2", "u") == u);
    CHECK(store->Verify()->ok());
    recs = {Record(*store, "grouped", "w"), Record(*store, "raw2", "v"), Record(*store, "p2", "u")};
  }
  RawDb raw(dir.path());
  for (const Digest& d : ChunksOf(recs[0])) CHECK(IndexOf(raw, d).codec == 0);
  for (const Digest& d : ChunksOf(recs[1])) CHECK(IndexOf(raw, d).codec == 2);
  for (const Digest& d : ChunksOf(recs[2])) CHECK(IndexOf(raw, d).codec == 2);
}

TEST_CASE("corrupt grouped blocks are found by reads and verify", "[codec]") {
  std::mt19937_64 rng(29);
  auto w = TensorBytes(fb::DType::Float32, 40000, rng);  // 160000 bytes: 3 chunks
  const uint32_t chunk = 64 * 1024;
  using Damage = std::function<std::string(const std::string&)>;
  const std::vector<std::pair<std::string, Damage>> damages = {
      {"element size 3",
       [](std::string v) {
         v[kBlockHeaderSize] = 3;
         return v;
       }},
      {"element size 8",
       [](std::string v) {
         v[kBlockHeaderSize] = 8;
         return v;
       }},
      {"truncated", [](const std::string& v) { return v.substr(0, v.size() - 9); }},
      {"frame byte flipped",
       [](std::string v) {
         v[v.size() / 2] ^= 0x40;
         return v;
       }},
      {"huge content size",
       [](const std::string& v) {
         return v.substr(0, kBlockHeaderSize + 1) + FrameClaiming(1ull << 40);
       }},
      {"unknown codec 3",
       [](std::string v) {
         v[0] = 3;
         return v;
       }},
  };
  for (const auto& [name, damage] : damages) {
    DYNAMIC_SECTION(name) {
      TempDir dir;
      std::string key;
      {
        auto store = OpenStore(dir.path(), Codec::kGroupedZstd, chunk);
        Save(*store, "t", {{"w", fb::DType::Float32, w}});
        key = PayloadKey(ChunksOf(Record(*store, "t", "w"))[1]);
      }
      {
        RawDb raw(dir.path());
        std::string v = raw.Get("blocks", key);
        REQUIRE(v[0] == 2);
        raw.Put("blocks", key, damage(v));
      }
      auto store = OpenStore(dir.path(), Codec::kGroupedZstd, chunk);
      auto report = store->Verify();
      REQUIRE(report.ok());
      CHECK(!report->ok());
      CHECK(report->damaged_tags.count("t") == 1);
      TensorRecordRef rec = Record(*store, "t", "w");
      std::vector<uint8_t> out(w.size());
      Status s = store->ReadTensor(*rec.get(), out.data(), out.size(), "t/w");
      INFO(s.ToString());
      CHECK(s.IsCorruption());
      std::vector<uint8_t> part(100);
      CHECK(store->ReadTensorRange(*rec.get(), chunk + 10, 100, part.data(), "t/w").IsCorruption());
      // The first chunk is sound and still reads.
      CHECK(store->ReadTensorRange(*rec.get(), 10, 100, part.data(), "t/w").ok());
      // Self-healing: the next save of the bytes writes the block again.
      TagInfo again = Save(*store, "t2", {{"w", fb::DType::Float32, w}});
      CHECK(again.new_blocks == 1);
      CHECK(ReadBack(*store, "t", "w") == w);
      CHECK(store->Verify()->ok());
    }
  }
}

TEST_CASE("the store header accepts codec 2 and refuses unknown codecs", "[codec]") {
  TempDir dir;
  { auto store = OpenStore(dir.path(), Codec::kGroupedZstd); }
  auto set_header_codec = [&](uint8_t codec) {
    RawDb raw(dir.path());
    raw.Put("meta", "header", BuildStoreHeader(64 * 1024, 256, static_cast<Codec>(codec), 1));
  };
  set_header_codec(2);
  CHECK(Store::Open(dir.path(), StoreOptions()).ok());
  for (uint8_t bad : {3, 7, 255}) {
    set_header_codec(bad);
    auto r = Store::Open(dir.path(), StoreOptions());
    CHECK(r.status().IsCorruption());
    CHECK(r.status().message().find("codec " + std::to_string(bad)) != std::string::npos);
  }
  TempDir fresh;
  StoreOptions o;
  o.codec = static_cast<Codec>(3);
  CHECK(Store::Open(fresh.path(), o).status().IsInvalidArgument());
}
