// `ckptkv codec-stats`: what the block codecs would make of a tag's
// tensors. Reads every chunked tensor of the tag (read-only), groups them by
// kind (weights, exp_avg, exp_avg_sq, by dtype; plus random bytes made
// here), and encodes and decodes their chunks on one thread with zstd
// (codec 1) and grouped zstd (codec 2) exactly as a save would
// (EncodeChunk). Prints stored/raw and encode / decode MiB/s per core.
// docs/architecture.md, "Block codecs", has figures it measured.
#ifndef CKPTKV_TOOLS_CODEC_STATS_H_
#define CKPTKV_TOOLS_CODEC_STATS_H_

#include <cstdint>
#include <optional>
#include <string>

namespace ckptkv::tools {

struct CodecStatsOptions {
  std::string db;
  std::string tag;           // empty = latest
  std::optional<int> level;  // zstd level; unset = each codec's own
  uint32_t chunk_kb = 0;     // chunk size to cut the tensors into; 0 = their own
  double min_seconds = 0.5;  // time each measurement for at least this long
  uint64_t random_mb = 32;   // MiB of random bytes (as fp32) measured beside; 0 = none
  bool json = false;
};

// Returns the process exit code (0, 1 for a missing store or tag, 2 for a
// corrupt block).
int RunCodecStats(const CodecStatsOptions& options);

}  // namespace ckptkv::tools

#endif  // CKPTKV_TOOLS_CODEC_STATS_H_
