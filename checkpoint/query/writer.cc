#include "checkpoint/query/writer.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <chrono>

#include "engine/state_codec.h"
#include "engine/torch_call.h"
#include "store/names.h"

namespace ckptkv::checkpoint {

Status CheckDevice(const std::string& device) {
  if (std::optional<c10::Device> parsed = ParseDevice(device)) {
    const c10::Device& d = *parsed;
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
  }
  return Status::InvalidArgument("device '" + device + "' is not valid; give cpu, cuda or cuda:N");
}

namespace {

Result<WriteStats> PutHost(Store& store, const std::string& tag, const std::string& file,
                           const std::string& param, const at::Tensor& tensor,
                           const std::optional<Placement>& placement) {
  const std::string where = TensorName(tag, file, param);
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

// A tensor `placement` describes, assembled from `source` chunk by chunk as
// the store asks for its bytes.
Result<WriteStats> PutStreamed(Store& store, const std::string& tag, const std::string& file,
                               const std::string& param, const ModelSpec& spec,
                               const Placement& placement, FragmentSource& source,
                               const std::vector<int64_t>& shape, c10::ScalarType dtype) {
  const std::string where = TensorName(tag, file, param);
  TensorMeta meta;
  ASSIGN_OR_RETURN(meta.dtype, ToDType(dtype, where));
  meta.shape = shape;
  meta.placement = placement;
  const auto options = at::TensorOptions().dtype(dtype);
  const uint64_t es = c10::elementSize(dtype);
  ByteSource src;
  src.length = static_cast<uint64_t>(Numel(shape)) * es;
  src.fill = [&](uint64_t offset, uint64_t len, uint8_t* dst) -> Status {
    if (offset % es != 0 || len % es != 0) {
      return Status::InvalidArgument(where + ": a byte range [" + std::to_string(offset) + ", +" +
                                     std::to_string(len) + ") that splits an element of " +
                                     std::to_string(es) + " bytes");
    }
    const auto begin = static_cast<int64_t>(offset / es);
    const auto n = static_cast<int64_t>(len / es);
    return TorchCall(TorchErrorKind::kUserValue, where, [&] {
      at::Tensor piece = at::from_blob(dst, {n}, options);
      return FillRangeFromPlacement(spec, placement, source, shape, begin, begin + n, piece)
          .WithContext(where);
    });
  };
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
    const std::string where = FileName(tag, f.name);
    auto encoded = EncodeState(f.state, where);
    if (!encoded.ok()) return fail(encoded.status());
    for (const StateTensor& st : encoded->tensors) {
      auto it = f.placements.find(st.tensor.unsafeGetTensorImpl());
      Result<WriteStats> stats = WriteStats();
      if (it == f.placements.end()) {
        if (st.tensor.is_meta()) {
          return fail(Status::InvalidArgument(TensorName(tag, f.name, st.param) +
                                              " is planned without a placement"));
        }
        stats = PutHost(store, tag, f.name, st.param, st.tensor, std::nullopt);
      } else {
        auto dtype = ToDType(st.tensor.scalar_type(), where);
        if (!dtype.ok()) return fail(dtype.status());
        const fb::TensorRecord* same = source.Exact(it->second, *dtype);
        if (same != nullptr) {
          stats = store.LinkTensor(tag, f.name, st.param, *same, it->second);
          report.linked_tensors++;
        } else if (device.is_cpu() && store.chunk_size() % st.tensor.element_size() == 0) {
          // Streamed: the store asks for one chunk at a time, in order, and
          // each is assembled straight into its staging buffer, so no
          // output tensor is ever held whole. (A store whose chunks split
          // elements takes the whole-tensor path below.)
          stats = PutStreamed(store, tag, f.name, st.param, spec, it->second, source,
                              st.tensor.sizes().vec(), st.tensor.scalar_type());
        } else {
          // Assembled whole on the device, then copied to the host. LibTorch
          // reports device trouble (out of memory, a lost GPU) by throwing:
          // the pending tag is dropped and the error returned.
          Status s = TorchCall(TorchErrorKind::kDevice, "on " + options.device, [&] {
            at::Tensor out =
                at::empty(st.tensor.sizes(),
                          at::TensorOptions().dtype(st.tensor.scalar_type()).device(device));
            Status fill = FillFromPlacement(spec, it->second, source, out);
            if (fill.ok()) stats = PutHost(store, tag, f.name, st.param, out, it->second);
            return fill;
          });
          if (!s.ok()) return fail(s.WithContext(TensorName(tag, f.name, st.param)));
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
