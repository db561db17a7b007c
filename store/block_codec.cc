#include "store/block_codec.h"

#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_c_literalCompressionMode (negative levels)
#include <zstd.h>

#include <algorithm>
#include <cstring>
#include <memory>

namespace ckptkv {

namespace {

struct CCtxFree {
  void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
};
struct DCtxFree {
  void operator()(ZSTD_DCtx* d) const { ZSTD_freeDCtx(d); }
};

// One compression and one decompression context per thread: creating a
// context per chunk costs more than compressing a small one.
ZSTD_CCtx* ThreadCCtx() {
  thread_local std::unique_ptr<ZSTD_CCtx, CCtxFree> cctx(ZSTD_createCCtx());
  return cctx.get();
}
ZSTD_DCtx* ThreadDCtx() {
  thread_local std::unique_ptr<ZSTD_DCtx, DCtxFree> dctx(ZSTD_createDCtx());
  return dctx.get();
}

// A buffer of n bytes, uninitialised: one of the calling thread's own
// (`which` of two), kept for its next chunk, when n is at most
// kKeptScratch; above that one of its own, freed with it, so a thread
// never keeps more than 2 x kKeptScratch.
constexpr size_t kKeptScratch = 4u << 20;
class Scratch {
 public:
  Scratch(int which, size_t n) {
    struct Buf {
      std::unique_ptr<uint8_t[]> p;
      size_t size = 0;
    };
    thread_local Buf bufs[2];
    if (n > kKeptScratch) {
      own_.reset(new uint8_t[n]);
      data_ = own_.get();
      return;
    }
    Buf& b = bufs[which];
    if (b.size < n || !b.p) {
      b.p.reset(new uint8_t[std::max<size_t>(n, 1)]);
      b.size = n;
    }
    data_ = b.p.get();
  }
  uint8_t* data() const { return data_; }

 private:
  std::unique_ptr<uint8_t[]> own_;
  uint8_t* data_ = nullptr;
};

// Compresses [src, src+len) at `level` into dst (capacity `cap`); 0 when
// the result does not fit in cap (or zstd fails).
size_t Compress(const uint8_t* src, size_t len, uint8_t* dst, size_t cap, int level) {
  ZSTD_CCtx* c = ThreadCCtx();
  if (c == nullptr || cap == 0) return 0;
  ZSTD_CCtx_reset(c, ZSTD_reset_session_and_parameters);
  ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level);
  // Negative levels leave literals unencoded by default; the gain of
  // grouped floats is mostly Huffman coding of the exponent bytes.
  if (level < 0) ZSTD_CCtx_setParameter(c, ZSTD_c_literalCompressionMode, ZSTD_ps_enable);
  size_t n = ZSTD_compress2(c, dst, cap, src, len);
  return ZSTD_isError(n) ? 0 : n;
}

// Compresses grouped bytes as one frame in which every byte stream starts
// a new zstd block: zstd codes the literals of a block with one Huffman
// table, so streams sharing a block (chunks of less than es x 128 KiB)
// would mix the exponent bytes' skewed statistics with the mantissas'
// flat ones and save little. Same contract as Compress.
size_t CompressGrouped(const uint8_t* src, size_t len, uint32_t es, uint8_t* dst, size_t cap,
                       int level) {
  ZSTD_CCtx* c = ThreadCCtx();
  if (c == nullptr || cap == 0) return 0;
  ZSTD_CCtx_reset(c, ZSTD_reset_session_and_parameters);
  ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level);
  if (level < 0) ZSTD_CCtx_setParameter(c, ZSTD_c_literalCompressionMode, ZSTD_ps_enable);
  ZSTD_CCtx_setPledgedSrcSize(c, len);  // the frame states its content size
  // Stable buffers: zstd compresses straight from src into dst, without
  // copying through its own (a quarter of the time otherwise); the input's
  // size grows by one stream per flush.
  ZSTD_CCtx_setParameter(c, ZSTD_c_stableInBuffer, 1);
  ZSTD_CCtx_setParameter(c, ZSTD_c_stableOutBuffer, 1);
  const size_t n = len / es;
  ZSTD_outBuffer out{dst, cap, 0};
  ZSTD_inBuffer in{src, 0, 0};
  for (uint32_t k = 0; k < es; ++k) {
    const bool last = k + 1 == es;
    // The last stream carries the tail (len % es bytes).
    in.size = last ? len : (k + 1) * n;
    const ZSTD_EndDirective mode = last ? ZSTD_e_end : ZSTD_e_flush;
    for (;;) {
      const size_t left = ZSTD_compressStream2(c, &out, &in, mode);
      if (ZSTD_isError(left)) return 0;   // also: does not fit in cap
      if (left == 0) break;               // this stream is all out
      if (out.pos == out.size) return 0;  // does not fit in cap
    }
  }
  return out.pos;
}

template <int ES>
void GroupN(const uint8_t* __restrict src, size_t n, uint8_t* __restrict dst) {
  for (size_t j = 0; j < n; ++j) {
    for (int k = 0; k < ES; ++k) dst[k * n + j] = src[j * ES + k];
  }
}

template <int ES>
void UngroupN(const uint8_t* __restrict src, size_t n, uint8_t* __restrict dst) {
  for (size_t j = 0; j < n; ++j) {
    for (int k = 0; k < ES; ++k) dst[j * ES + k] = src[k * n + j];
  }
}

bool ValidElementSize(uint32_t es) { return es == 2 || es == 4 || es == 8; }

}  // namespace

std::string CodecName(uint8_t codec) {
  switch (codec) {
    case 0:
      return "raw";
    case 1:
      return "zstd";
    case 2:
      return "grouped-zstd";
  }
  return "codec " + std::to_string(codec);
}

std::optional<Codec> ParseCodec(std::string_view name) {
  for (uint8_t c = 0; c <= kMaxCodec; ++c) {
    if (name == CodecName(c)) return static_cast<Codec>(c);
  }
  return std::nullopt;
}

std::string ValidCodecs() { return "valid: 0 (raw), 1 (zstd) or 2 (grouped-zstd)"; }

uint32_t GroupElementSize(fb::DType dtype) {
  switch (dtype) {
    case fb::DType::Float16:
    case fb::DType::BFloat16:
      return 2;
    case fb::DType::Float32:
    case fb::DType::ComplexFloat:
      return 4;
    case fb::DType::Float64:
    case fb::DType::ComplexDouble:
      return 8;
    default:
      return 0;
  }
}

void GroupBytes(const uint8_t* src, size_t len, uint32_t es, uint8_t* dst) {
  const size_t n = len / es;
  switch (es) {
    case 2:
      GroupN<2>(src, n, dst);
      break;
    case 4:
      GroupN<4>(src, n, dst);
      break;
    case 8:
      GroupN<8>(src, n, dst);
      break;
    default:
      std::memcpy(dst, src, len);
      return;
  }
  if (len % es) std::memcpy(dst + n * es, src + n * es, len % es);
}

void UngroupBytes(const uint8_t* src, size_t len, uint32_t es, uint8_t* dst) {
  const size_t n = len / es;
  switch (es) {
    case 2:
      UngroupN<2>(src, n, dst);
      break;
    case 4:
      UngroupN<4>(src, n, dst);
      break;
    case 8:
      UngroupN<8>(src, n, dst);
      break;
    default:
      std::memcpy(dst, src, len);
      return;
  }
  if (len % es) std::memcpy(dst + n * es, src + n * es, len % es);
}

std::string BlockHeader(Codec codec, size_t raw_len) {
  std::string h(kBlockHeaderSize, '\0');
  h[0] = static_cast<char>(codec);
  for (int i = 0; i < 4; ++i) h[1 + i] = static_cast<char>((raw_len >> (8 * i)) & 0xff);
  return h;
}

bool CompressBlock(const uint8_t* data, size_t len, std::string* out) {
  size_t bound = ZSTD_compressBound(len);
  out->resize(bound);
  size_t n = ZSTD_compress(out->data(), bound, data, len, 1);
  if (ZSTD_isError(n) || n + len / 16 >= len) return false;
  out->resize(n);
  return true;
}

Codec EncodeChunk(Codec preferred, uint32_t element_size, const uint8_t* data, size_t len,
                  std::string* payload, std::optional<int> level_override) {
  if (preferred == Codec::kRaw || len == 0) return Codec::kRaw;
  const bool grouped = preferred == Codec::kGroupedZstd && ValidElementSize(element_size);
  const int level = level_override.value_or(grouped ? kGroupedZstdLevel : kZstdLevel);
  const uint32_t es = grouped ? element_size : 1;
  // The sample: the leading kSampleBytes (whole elements), grouped alike.
  if (len > 2 * kSampleBytes) {
    const size_t s = kSampleBytes - kSampleBytes % es;
    Scratch g(0, grouped ? s : 0);
    const uint8_t* src = data;
    if (grouped) {
      GroupBytes(data, s, es, g.data());
      src = g.data();
    }
    const size_t cap = s - s / 32 - 1;
    Scratch out(1, cap);
    const size_t got = grouped ? CompressGrouped(src, s, es, out.data(), cap, level)
                               : Compress(src, s, out.data(), cap, level);
    if (got == 0) return Codec::kRaw;
  }
  Scratch g(0, grouped ? len : 0);
  const uint8_t* src = data;
  if (grouped) {
    GroupBytes(data, len, es, g.data());
    src = g.data();
  }
  // Kept only when payload + len/16 < len: what does not fit is not kept.
  const size_t prefix = grouped ? 1 : 0;
  const size_t keep_below = len - len / 16;  // payload must be smaller
  if (keep_below <= prefix + 1) return Codec::kRaw;
  const size_t cap = keep_below - prefix - 1;
  payload->resize(prefix + cap);
  auto* dst = reinterpret_cast<uint8_t*>(payload->data());
  if (grouped) dst[0] = static_cast<uint8_t>(es);
  const size_t n = grouped ? CompressGrouped(src, len, es, dst + prefix, cap, level)
                           : Compress(src, len, dst + prefix, cap, level);
  if (n == 0) return Codec::kRaw;
  payload->resize(prefix + n);
  return grouped ? Codec::kGroupedZstd : Codec::kZstd;
}

std::string EncodeBlock(Codec codec, const uint8_t* data, size_t len, uint32_t element_size) {
  std::string payload;
  Codec used = EncodeChunk(codec, element_size, data, len, &payload);
  if (used != Codec::kRaw) return BlockHeader(used, len) + payload;
  std::string out = BlockHeader(Codec::kRaw, len);
  out.append(reinterpret_cast<const char*>(data), len);
  return out;
}

bool PeekBlockHeader(std::string_view value, Codec* codec, uint32_t* raw_len) {
  if (value.size() < kBlockHeaderSize) return false;
  uint8_t c = static_cast<uint8_t>(value[0]);
  if (!IsKnownCodec(c)) return false;
  uint32_t n = 0;
  for (int i = 0; i < 4; ++i)
    n |= static_cast<uint32_t>(static_cast<uint8_t>(value[1 + i])) << (8 * i);
  *codec = static_cast<Codec>(c);
  *raw_len = n;
  return true;
}

Status DecodeBlock(std::string_view value, uint8_t* out, size_t raw_len,
                   std::vector<uint8_t>* scratch) {
  Codec codec;
  uint32_t len;
  if (!PeekBlockHeader(value, &codec, &len)) {
    return Status::Corruption(
        "block header is malformed (" + std::to_string(value.size()) + " bytes, codec byte " +
        (value.empty() ? std::string("none") : std::to_string(static_cast<uint8_t>(value[0]))) +
        "; " + ValidCodecs() + ")");
  }
  // Before any buffer is sized: the header must hold what the caller expects.
  if (len != raw_len) {
    return Status::Corruption("block holds " + std::to_string(len) + " bytes but " +
                              std::to_string(raw_len) + " were expected");
  }
  std::string_view payload = value.substr(kBlockHeaderSize);
  if (codec == Codec::kRaw) {
    if (payload.size() != raw_len) {
      return Status::Corruption("raw block payload is " + std::to_string(payload.size()) +
                                " bytes, header says " + std::to_string(raw_len));
    }
    if (raw_len) std::memcpy(out, payload.data(), raw_len);
    return Status::OK();
  }
  ZSTD_DCtx* dctx = ThreadDCtx();
  if (dctx == nullptr) return Status::ResourceExhausted("cannot allocate a zstd context");
  if (codec == Codec::kZstd) {
    size_t n = ZSTD_decompressDCtx(dctx, out, raw_len, payload.data(), payload.size());
    if (ZSTD_isError(n) || n != raw_len) {
      return Status::Corruption(std::string("zstd block does not decode: ") +
                                (ZSTD_isError(n) ? ZSTD_getErrorName(n) : "wrong length"));
    }
    return Status::OK();
  }
  // Grouped zstd: element size, then exactly one frame of raw_len bytes.
  if (payload.empty()) {
    return Status::Corruption("grouped-zstd block has no element size byte");
  }
  const uint32_t es = static_cast<uint8_t>(payload[0]);
  if (!ValidElementSize(es)) {
    return Status::Corruption("grouped-zstd block has element size " + std::to_string(es) +
                              "; valid: 2, 4 or 8");
  }
  std::string_view frame = payload.substr(1);
  const unsigned long long content = ZSTD_getFrameContentSize(frame.data(), frame.size());
  if (content == ZSTD_CONTENTSIZE_ERROR) {
    return Status::Corruption("grouped-zstd block does not hold a zstd frame");
  }
  if (content == ZSTD_CONTENTSIZE_UNKNOWN) {
    return Status::Corruption("grouped-zstd block's frame does not state its content size");
  }
  if (content != raw_len) {
    return Status::Corruption("grouped-zstd block's frame holds " + std::to_string(content) +
                              " bytes, header says " + std::to_string(raw_len));
  }
  const size_t frame_len = ZSTD_findFrameCompressedSize(frame.data(), frame.size());
  if (ZSTD_isError(frame_len) || frame_len != frame.size()) {
    return Status::Corruption(
        "grouped-zstd block payload is not one zstd frame" +
        (ZSTD_isError(frame_len)
             ? std::string(": ") + ZSTD_getErrorName(frame_len)
             : " (" + std::to_string(frame.size() - frame_len) + " bytes follow it)"));
  }
  // raw_len was checked against what the caller expects: at most a chunk.
  Scratch own(0, scratch ? 0 : raw_len);
  uint8_t* buf = own.data();
  if (scratch) {
    if (scratch->size() < raw_len) scratch->resize(raw_len);
    buf = scratch->data();
  }
  size_t n = ZSTD_decompressDCtx(dctx, buf, raw_len, frame.data(), frame.size());
  if (ZSTD_isError(n) || n != raw_len) {
    return Status::Corruption(std::string("grouped-zstd block does not decode: ") +
                              (ZSTD_isError(n) ? ZSTD_getErrorName(n) : "wrong length"));
  }
  UngroupBytes(buf, raw_len, es, out);
  return Status::OK();
}

}  // namespace ckptkv
