// export: a tag's tensors as Hugging Face safetensors files.
//
// Files are written into one directory, sharded by size
// (model-00001-of-00003.safetensors, or model.safetensors when one shard
// holds everything) with model.safetensors.index.json. Every file is written
// under a temporary name in the directory, synced, re-read and checked (the
// header against the safetensors format and the tensors written, the bytes
// against the stored chunk digests); only when all of them are complete are
// they renamed into place, the index last. A failed export removes its
// temporary files and leaves the directory as it was. A directory that
// already holds safetensors files or an index is refused unless `overwrite`,
// and then the files of the earlier export that this one does not replace are
// removed, so the directory never mixes two exports. Nothing is written
// outside the directory: names are generated, and symlinks are never
// followed (the files are checkpoint/core/zip_writer.h's ExportDir and
// TempFile, which `ckptkv export` writes its torch files with too).
// `ckptkv export --format safetensors` and ckptkv.export(...,
// format="safetensors") run this same function.
#ifndef CKPTKV_TOOLS_KV_BROWSER_SAFETENSORS_H_
#define CKPTKV_TOOLS_KV_BROWSER_SAFETENSORS_H_

#include <string>
#include <string_view>
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

// Size in bytes of a safetensors dtype ("F32" -> 4), 0 for an unknown one.
uint64_t SafetensorsDTypeSize(const std::string& dtype);

inline constexpr const char* kSafetensorsIndex = "model.safetensors.index.json";
// The format's limit on the header's length.
inline constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

// One tensor of a safetensors header.
struct SafetensorsTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // data_offsets, relative to the data buffer
};

// Checks a safetensors header (the JSON text after the 8-byte length, with
// its padding) for a file whose data buffer is `data_bytes` long: a JSON
// object with no duplicate names; "__metadata__", if present, maps strings
// to strings; every other entry has exactly dtype (a safetensors dtype),
// shape (non-negative integers) and data_offsets [begin, end] holding
// exactly shape x dtype bytes; the tensors tile the data buffer without gap
// or overlap. `tensors` gets them in offset order. Corruption otherwise.
Status ParseSafetensorsHeader(std::string_view header, uint64_t data_bytes,
                              std::vector<SafetensorsTensor>* tensors);

Result<json> ExportSafetensors(Browser& b, const std::string& tag, const ExportOptions& options);

}  // namespace ckptkv::kvb

#endif  // CKPTKV_TOOLS_KV_BROWSER_SAFETENSORS_H_
