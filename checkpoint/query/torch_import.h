// Import of torch.save files into a store, without running pickle.
//
// The file's pickle is read by the symbolic machine (checkpoint/core/
// pickle_machine.h) and its inert tree is interpreted against an allowlist
// of (module, name), after Python 2 name mapping, into the records the
// Python package writes (docs/format.md "Python objects"):
//
//   torch._utils._rebuild_tensor_v2 / _rebuild_tensor   a tensor (a view of a storage)
//   torch._utils._rebuild_parameter                     torch.nn.Parameter
//   collections.OrderedDict (+ items, + _metadata)      OrderedDict
//   builtins.set / frozenset, torch.Size, torch.device, torch dtypes,
//   _codecs.encode (bytes), builtins.bytearray, argparse.Namespace,
//   DeepSpeed's ZeroStageEnum (both pickled forms), fragment_address,
//   LossScaler, DynamicLossScaler (NEWOBJ + BUILD), numpy arrays
//   (numpy.core / numpy._core .multiarray._reconstruct + BUILD, and
//   .numeric._frombuffer), scalars (.multiarray.scalar) and dtypes
//   (numpy.dtype + BUILD), except object, structured and subarray dtypes
//
// Anything else — os.system, builtins.eval, any class not listed — is
// refused with the file, the byte offset of the opcode and module.name.
// Both container formats are read: the zip (torch >= 1.6) and the legacy
// one (checkpoint/core/legacy_archive.h), one interpreter reading their
// storages through one source. Tensor bytes stream from their storage's
// zip entry or legacy record (checked: one dtype per storage, numel *
// itemsize equal to it, a legacy view inside its root, the view's offset,
// sizes and strides in range); a view saves only its own elements, two
// references to one view are one tensor. TorchScript archives and pre-0.4
// tar files are refused saying what they are.
#ifndef CKPTKV_CHECKPOINT_QUERY_TORCH_IMPORT_H_
#define CKPTKV_CHECKPOINT_QUERY_TORCH_IMPORT_H_

#include <functional>
#include <string>

#include "engine/kv_checkpoint_engine.h"
#include "store/store.h"

namespace ckptkv::checkpoint {

struct ImportReport {
  uint64_t files = 0;
  uint64_t tensors = 0;
  uint64_t logical_bytes = 0;
  uint64_t new_bytes = 0;
};

// Called as tensor bytes are read (`bytes` more of them).
using ImportBytesRead = std::function<void(uint64_t bytes)>;

// Saves the torch.save file at `path` as `file` of the pending `tag`, with
// the placements `placer` gives (none when null). Errors name the path.
Result<SaveReport> ImportTorchFile(Store& store, const std::string& tag, const std::string& file,
                                   const std::string& path, TensorPlacer* placer,
                                   const ImportBytesRead& on_read = nullptr);

// Progress of an import: `done` of `total` bytes of the tag's files read.
using ImportProgress = std::function<void(const std::string& tag, uint64_t done, uint64_t total)>;

// `ckptkv import`: a .pt file (tag = `tag`, or the file's stem), or a
// directory: a DeepSpeed save_dir (its `latest` names the tag directory) or
// a tag directory itself; every file below it is imported under its
// relative path, with DeepSpeed placements: model-state files first, so
// that layer and optimizer files are placed from them (PlacedBefore). One
// atomic commit.
Result<TagInfo> ImportPath(Store& store, const std::string& path, const std::string& tag,
                           bool overwrite, ImportReport* report,
                           const ImportProgress& progress = nullptr);

// One imported tag of ImportSaveDir.
struct ImportedTag {
  TagInfo info;
  ImportReport report;
};

// Every tag directory of a DeepSpeed save_dir (each subdirectory that holds
// a file), each as its own tag of that name through ImportPath, one commit
// per tag: in natural order (global_step9 before global_step10), the one
// `latest` names last, so that the store's latest ends on it. Fails on the
// first tag that does not import (the tags before it stay committed; the
// error names them); a tag the store holds is AlreadyExists unless
// `overwrite` (importing it again writes only what changed).
Result<std::vector<ImportedTag>> ImportSaveDir(Store& store, const std::string& save_dir,
                                               bool overwrite,
                                               const ImportProgress& progress = nullptr);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_QUERY_TORCH_IMPORT_H_
