// export: a tag's tensors as Hugging Face safetensors files.
//
// Files are written into one directory, sharded by size
// (model-00001-of-00003.safetensors, or model.safetensors when one shard
// holds everything) with model.safetensors.index.json. Each file is written
// beside its final name and renamed when complete, then re-read and checked
// against the stored chunk digests. Nothing is written outside the
// directory: names are generated, existing files are not replaced unless
// asked, and symlinks are never followed.
#ifndef CKPTKV_TOOLS_KV_BROWSER_SAFETENSORS_H_
#define CKPTKV_TOOLS_KV_BROWSER_SAFETENSORS_H_

#include <string>
#include <vector>

#include "tools/kv_browser/analysis.h"

namespace ckptkv::kvb {

struct ExportOptions {
  std::string out_dir;
  std::vector<std::string> include;  // globs over the tensor name; empty = all
  std::vector<std::string> exclude;
  std::string file;  // only this file of the tag
  uint64_t max_shard_bytes = 5ull << 30;
  bool overwrite = false;
};

// safetensors dtype code ("F32", "BF16", ...), or nullptr when safetensors
// has none (complex types).
const char* SafetensorsDType(fb::DType dtype);

Result<json> ExportSafetensors(Browser& b, const std::string& tag, const ExportOptions& options);

}  // namespace ckptkv::kvb

#endif  // CKPTKV_TOOLS_KV_BROWSER_SAFETENSORS_H_
