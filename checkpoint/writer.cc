#include "checkpoint/writer.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <chrono>

#include "engine/state_codec.h"

namespace ckptkv::checkpoint {

Status CheckDevice(const std::string& device) {
  try {
    c10::Device d(device);
    if (d.is_cpu()) return Status::OK();
    if (d.is_cuda()) {
      if (!at::hasCUDA()) {
        return Status::NotSupported("device '" + device +
                                    "' asked for, but this LibTorch has no CUDA support or no "
                                    "GPU is present; use --device cpu");
      }
      const int n = static_cast<int>(at::getNumGPUs());
      if (d.has_index() && d.index() >= n) {
        return Status::InvalidArgument(
            "device '" + device + "' does not exist: " + std::to_string(n) +
            " CUDA device(s) present, cuda:0 to cuda:" + std::to_string(n - 1));
      }
      return Status::OK();
    }
  } catch (const c10::Error&) {
  }
  return Status::InvalidArgument("device '" + device + "' is not valid; give cpu, cuda or cuda:N");
}

namespace {

Result<WriteStats> PutHost(Store& store, const std::string& tag, const std::string& file,
                           const std::string& param, const at::Tensor& tensor,
                           const std::optional<Placement>& placement) {
  const std::string where = tag + "/" + file + ":" + param;
  at::Tensor host = tensor.is_cpu() ? tensor.contiguous() : tensor.cpu().contiguous();
  TensorMeta meta;
  ASSIGN_OR_RETURN(meta.dtype, ToDType(host.scalar_type(), where));
  meta.shape = host.sizes().vec();
  meta.placement = placement;
  ByteSource src;
  src.length = static_cast<uint64_t>(host.numel()) * host.element_size();
  src.data = static_cast<const uint8_t*>(host.data_ptr());
  return store.PutTensor(tag, file, param, meta, src);
}

}  // namespace

Result<WriteReport> WriteTag(Store& store, const std::string& tag, const ModelSpec& spec,
                             const std::vector<PlannedFile>& files, FragmentSource& source,
                             const WriteOptions& options) {
  RETURN_IF_ERROR(CheckDevice(options.device));
  const auto t0 = std::chrono::steady_clock::now();
  const c10::Device device(options.device);
  RETURN_IF_ERROR(store.BeginTag(tag, options.overwrite));
  WriteReport report;
  auto fail = [&](Status s) {
    store.AbortTag(tag);
    return s;
  };
  for (const PlannedFile& f : files) {
    const std::string where = tag + "/" + f.name;
    auto encoded = EncodeState(f.state, where);
    if (!encoded.ok()) return fail(encoded.status());
    for (const StateTensor& st : encoded->tensors) {
      auto it = f.placements.find(st.tensor.unsafeGetTensorImpl());
      Result<WriteStats> stats = WriteStats();
      if (it == f.placements.end()) {
        if (st.tensor.is_meta()) {
          return fail(
              Status::InvalidArgument(where + ":" + st.param + " is planned without a placement"));
        }
        stats = PutHost(store, tag, f.name, st.param, st.tensor, std::nullopt);
      } else {
        auto dtype = ToDType(st.tensor.scalar_type(), where);
        if (!dtype.ok()) return fail(dtype.status());
        const fb::TensorRecord* same = source.Exact(it->second, *dtype);
        if (same != nullptr) {
          stats = store.LinkTensor(tag, f.name, st.param, *same, it->second);
          report.linked_tensors++;
        } else {
          // LibTorch reports device trouble (out of memory, a lost GPU) by
          // throwing: the pending tag is dropped and the error returned.
          Status s;
          try {
            at::Tensor out =
                at::empty(st.tensor.sizes(),
                          at::TensorOptions().dtype(st.tensor.scalar_type()).device(device));
            s = FillFromPlacement(spec, it->second, source, out);
            if (s.ok()) stats = PutHost(store, tag, f.name, st.param, out, it->second);
          } catch (const c10::Error& e) {
            s = Status::IOError(std::string("on ") + options.device + ": " +
                                e.what_without_backtrace());
          }
          if (!s.ok()) return fail(s.WithContext(where + ":" + st.param));
        }
      }
      if (!stats.ok()) return fail(stats.status());
      report.tensors++;
      report.logical_bytes += stats->logical_bytes;
      report.new_bytes += stats->new_bytes;
    }
    Status s = store.PutFile(tag, f.name, std::move(encoded->tree));
    if (!s.ok()) return fail(s);
    report.files++;
  }
  CommitOptions co;
  co.overwrite = options.overwrite;
  co.set_latest = options.set_latest;
  co.layout = options.layout;
  auto info = store.CommitTag(tag, co);
  if (!info.ok()) return fail(info.status());
  report.info = *info;
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

}  // namespace ckptkv::checkpoint
