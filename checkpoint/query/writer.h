// Writes planned files into a store as one tag: every placeholder tensor is
// filled from a FragmentSource on the chosen device, copied to the host and
// stored before the next one is made, so memory stays near the largest
// tensor. Tensors a source has verbatim are linked, not copied.
#ifndef CKPTKV_CHECKPOINT_QUERY_WRITER_H_
#define CKPTKV_CHECKPOINT_QUERY_WRITER_H_

#include <string>
#include <vector>

#include "checkpoint/query/fragments.h"
#include "checkpoint/query/layout.h"
#include "store/store.h"

namespace ckptkv::checkpoint {

struct WriteOptions {
  std::string device = "cpu";  // "cpu", "cuda", "cuda:N"
  bool overwrite = false;
  bool set_latest = false;
  std::optional<Layout> layout;
};

struct WriteReport {
  size_t files = 0;
  uint64_t tensors = 0;
  uint64_t linked_tensors = 0;  // stored by reference to existing blocks
  uint64_t logical_bytes = 0;
  uint64_t new_bytes = 0;  // bytes of blocks the store did not have
  double seconds = 0;
  TagInfo info;
};

// Checks that `device` names a usable device: InvalidArgument for a bad
// name, NotSupported for CUDA without a CUDA build or GPU.
Status CheckDevice(const std::string& device);

Result<WriteReport> WriteTag(Store& store, const std::string& tag, const ModelSpec& spec,
                             const std::vector<PlannedFile>& files, FragmentSource& source,
                             const WriteOptions& options);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_QUERY_WRITER_H_
