// Export of a stored tag as files torch.load and DeepSpeed read
// (docs/export.md): `ckptkv export --format pt|deepspeed|universal`.
//
// Every file of the tag becomes a torch.save zip file written by ckptkv's
// own protocol-2 pickle writer (checkpoint/core/pickle_writer.h), its
// tensors streamed from the store a window at a time. Each file is written
// under a temporary name in the output directory, synced, re-read with the
// project's zip reader and pickle machine (the pickle re-parsed, every
// storage's bytes checked against the stored chunk digests) and renamed
// into place only when every file of the export is complete; a failed
// export removes its temporary files. Paths are checked and directories
// opened without following symlinks (checkpoint/core/zip_writer.h).
// Torch-free header.
#ifndef CKPTKV_CHECKPOINT_QUERY_TORCH_EXPORT_H_
#define CKPTKV_CHECKPOINT_QUERY_TORCH_EXPORT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "store/status.h"
#include "store/store.h"

namespace ckptkv::checkpoint {

struct TorchExportOptions {
  std::string out_dir;
  // "pt": DIR/<file> for each file of the tag. "deepspeed": DIR/<tag>/<file>
  // and DIR/latest. "universal": DeepSpeed's universal folder DIR/<tag>/
  // (zero/<param>/*.pt, zero/optimizer_state.pt, the model files) and
  // DIR/latest_universal.
  std::string format = "pt";
  bool overwrite = false;  // replace files that exist; else AlreadyExists
  // Called with the tensor bytes written so far and the total.
  std::function<void(uint64_t done, uint64_t total)> progress;
  // Checked between windows; when set, the export stops (Aborted as
  // FailedPrecondition) and removes what it wrote.
  const std::atomic<bool>* cancel = nullptr;
};

struct ExportedFile {
  std::string path;  // relative to the output directory
  uint64_t bytes = 0;
  uint64_t tensors = 0;
};

struct TorchExportReport {
  std::string tag, format, out_dir;
  std::vector<ExportedFile> files;
  uint64_t tensors = 0;
  uint64_t tensor_bytes = 0;
  uint64_t bytes_written = 0;
  std::vector<std::string> replaced;  // files that existed and were overwritten
  // universal: the tag was converted to a temporary universal tag first
  // (deleted afterwards), or it already was universal.
  bool converted = false;
  double seconds = 0;
};

// `tag` "latest" names the store's latest tag unless a tag has that name.
// A universal export of a non-universal tag writes a temporary universal
// tag into the store (so `store` must be writable) and deletes it after.
Result<TorchExportReport> ExportTorch(Store& store, const std::string& tag,
                                      const TorchExportOptions& options);

// The report as the CLI's --json prints it (and ckptkv.export returns):
// {tag, format, out, files: [{path, bytes, tensors}], tensors, tensor_bytes,
// bytes_written, verified, converted, replaced, seconds}.
std::string TorchExportJson(const TorchExportReport& r, int indent = -1);

// The formats ExportTorch writes.
inline constexpr const char* kTorchExportFormats[] = {"pt", "deepspeed", "universal"};

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_QUERY_TORCH_EXPORT_H_
