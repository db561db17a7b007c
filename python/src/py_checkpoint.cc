// ckptkv._ckptkv.checkpoint: DeepSpeed's reshape maps (checkpoint/core/
// reshape_maps.h), the layout of a stored tag (checkpoint/core/tag_layout.h)
// and the reshape / universal queries (checkpoint/query/reshape.h) for
// ckptkv/checkpoint.py, which gives them DeepSpeed's Python names and
// signatures. Store work runs without the GIL; reports come back as dicts
// with the keys of the CLI's --json output.
#include "python/src/py_checkpoint.h"

#include <pybind11/stl.h>

#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "checkpoint/core/reshape_maps.h"
#include "checkpoint/query/torch_export.h"
#include "checkpoint/query/torch_import.h"
#include "checkpoint/core/tag_layout.h"
#include "checkpoint/query/reshape.h"
#include "checkpoint/query/synth.h"
#include "python/src/py_store.h"
#include "tools/json_text.h"
#include "tools/kv_browser/safetensors.h"

namespace ckptkv::py {
namespace {

// What ckptkv.import_path returns for one imported tag.
pyb::dict ImportDict(const std::string& tag, const checkpoint::ImportReport& r) {
  pyb::dict d;
  d["tag"] = tag;
  d["files"] = r.files;
  d["tensors"] = r.tensors;
  d["logical_bytes"] = r.logical_bytes;
  d["new_bytes"] = r.new_bytes;
  return d;
}

using checkpoint::DeepSpeedFiles;
using checkpoint::Meg2dParallelMap;
using checkpoint::Model3dDesc;
using checkpoint::TrainLayout;

pyb::dict LayoutDict(const TrainLayout& l) {
  pyb::dict d;
  d["tp"] = l.tp;
  d["pp"] = l.pp;
  d["dp"] = l.dp;
  d["zero_stage"] = l.zero_stage;
  d["dtype"] = l.bf16 ? "bf16" : "fp32";
  return d;
}

pyb::dict FilesDict(const DeepSpeedFiles& f) {
  pyb::dict d;
  d["all"] = f.all;
  d["model"] = f.model;
  d["zero_model"] = f.zero_model;
  d["zero"] = f.zero;
  d["layer"] = f.layer;
  d["model_by_mp"] = f.model_by_mp;
  d["all_model"] = f.all_model;
  d["optim_by_rank"] = f.optim_by_rank;
  d["universal_optim"] = f.universal_optim.empty() ? pyb::object(pyb::none())
                                                   : pyb::object(pyb::str(f.universal_optim));
  return d;
}

pyb::dict ReportDict(const checkpoint::ReshapeReport& r) {
  pyb::dict d;
  d["from"] = LayoutDict(r.from);
  d["to"] = LayoutDict(r.to);
  d["out_tag"] = r.out_tag;
  d["files"] = r.write.files;
  d["tensors"] = r.write.tensors;
  d["linked_tensors"] = r.write.linked_tensors;
  d["bytes_read"] = r.bytes_read;
  d["logical_bytes"] = r.write.logical_bytes;
  d["new_bytes"] = r.write.new_bytes;
  d["seconds"] = r.seconds;
  d["tag"] = TagInfoDict(r.write.info);
  return d;
}

checkpoint::WriteOptions Write(const std::string& device, bool overwrite, bool set_latest) {
  checkpoint::WriteOptions w;
  w.device = device;
  w.overwrite = overwrite;
  w.set_latest = set_latest;
  return w;
}

// A query must not begin a tag this handle has pending: BeginTag would
// discard what the caller saved into it.
void CheckNotPending(Store& s, const std::string& out_tag) {
  if (s.IsPending(out_tag)) {
    ThrowIfError(
        Status::FailedPrecondition("tag " + Quote(out_tag) +
                                   " is begun on this store and not committed; commit or abort "
                                   "it, or write to another out_tag"));
  }
}

template <typename F>
pyb::dict RunQuery(PyStore& ps, const std::string& out_tag, F&& query) {
  auto held = ps.Hold();
  Store& s = held->store();
  CheckNotPending(s, out_tag);
  checkpoint::ReshapeReport r;
  {
    pyb::gil_scoped_release nogil;
    r = ValueOrThrow(query(s));
  }
  ps.Invalidate();  // Store.tags() lists the new tag
  return ReportDict(r);
}

void BindMaps(pyb::module_& m) {
  pyb::class_<Meg2dParallelMap>(m, "Meg2dParallelMap")
      .def(pyb::init<int, int>(), pyb::arg("pp_degree"), pyb::arg("tp_degree"))
      .def_property_readonly("pp_degree", &Meg2dParallelMap::pp_degree)
      .def_property_readonly("tp_degree", &Meg2dParallelMap::tp_degree)
      .def("simple_init", &Meg2dParallelMap::SimpleInit)
      .def("add_data",
           [](Meg2dParallelMap& map, int pp, int tp, const std::vector<int>& data) {
             ThrowIfError(map.AddData(pp, tp, data));
           })
      .def(
          "get_data",
          [](const Meg2dParallelMap& map, std::optional<int> pp, std::optional<int> tp) {
            return ValueOrThrow(map.GetData(pp, tp));
          },
          pyb::arg("pp") = std::nullopt, pyb::arg("tp") = std::nullopt)
      .def("cells",
           [](const Meg2dParallelMap& map) {
             std::vector<std::tuple<int, int, std::vector<int>>> out;
             for (const auto& c : map.Cells()) out.emplace_back(c.pp, c.tp, c.indices);
             return out;
           })
      .def("__eq__", &Meg2dParallelMap::operator==)
      .def("__repr__", &Meg2dParallelMap::ToString);
  m.def(
      "reshape_meg_2d_parallel",
      [](int old_pp, int old_tp, int new_pp, int new_tp) {
        return ValueOrThrow(checkpoint::ReshapeMeg2dParallel(old_pp, old_tp, new_pp, new_tp));
      },
      pyb::arg("old_pp_degree"), pyb::arg("old_tp_degree"), pyb::arg("new_pp_degree"),
      pyb::arg("new_tp_degree"));
  m.def(
      "partition_data",
      [](const std::vector<int>& list, int n) {
        return ValueOrThrow(checkpoint::PartitionData(list, n));
      },
      pyb::arg("data_list"), pyb::arg("num_partitions"));
  pyb::class_<Model3dDesc>(m, "Model3dDesc")
      .def(pyb::init([](int pp, int tp, int dp) {
             return Model3dDesc{pp, tp, dp};
           }),
           pyb::arg("pp_degree") = 1, pyb::arg("tp_degree") = 1, pyb::arg("dp_degree") = 1)
      .def_readwrite("pp", &Model3dDesc::pp)
      .def_readwrite("tp", &Model3dDesc::tp)
      .def_readwrite("dp", &Model3dDesc::dp)
      .def("world_size", &Model3dDesc::WorldSize)
      .def("get_desc", &Model3dDesc::Desc)
      .def("is_valid", &Model3dDesc::IsValid)
      .def("can_reshape", &Model3dDesc::CanReshape)
      .def("reshape", [](const Model3dDesc& d,
                         const Model3dDesc& target) { return ValueOrThrow(d.Reshape(target)); })
      .def("__eq__", &Model3dDesc::operator==);
}

void BindLayout(pyb::module_& m) {
  m.def("get_files_with_prefix", &checkpoint::GetFilesWithPrefix, pyb::arg("files"),
        pyb::arg("prefix"));
  m.def("get_zero_files", &checkpoint::GetZeroFiles, pyb::arg("files"));
  m.def(
      "classify_files",
      [](const std::vector<std::string>& files) {
        return FilesDict(checkpoint::ClassifyFiles(files));
      },
      pyb::arg("files"));
  m.def(
      "get_model_3d_descriptor",
      [](PyStore& ps, const std::string& tag) {
        auto held = ps.Hold();
        Store& s = held->store();
        pyb::gil_scoped_release nogil;
        return ValueOrThrow(checkpoint::GetModel3dDescriptor(s, tag));
      },
      pyb::arg("store"), pyb::arg("tag"));
  m.def(
      "discover_tag_layout",
      [](PyStore& ps, const std::string& tag) {
        auto held = ps.Hold();
        Store& s = held->store();
        checkpoint::TagLayout tl;
        {
          pyb::gil_scoped_release nogil;
          tl = ValueOrThrow(checkpoint::DiscoverTagLayout(s, tag));
        }
        pyb::dict d;
        d["files"] = FilesDict(tl.files);
        d["degrees"] = tl.degrees;
        d["universal"] = tl.universal;
        return d;
      },
      pyb::arg("store"), pyb::arg("tag"));
}

void BindQueries(pyb::module_& m) {
  m.def(
      "reshape",
      [](PyStore& ps, const std::string& tag, int tp, int pp, int dp, const std::string& out_tag,
         const std::string& device, bool overwrite, bool set_latest) {
        checkpoint::ReshapeOptions o;
        o.tp = tp;
        o.pp = pp;
        o.dp = dp;
        // The query's own default name, spelled here for the pending check.
        o.out_tag = out_tag.empty() ? tag + "_tp" + std::to_string(tp) + "_pp" +
                                          std::to_string(pp) + "_dp" + std::to_string(dp)
                                    : out_tag;
        o.write = Write(device, overwrite, set_latest);
        return RunQuery(ps, o.out_tag, [&](Store& s) { return checkpoint::Reshape(s, tag, o); });
      },
      pyb::arg("store"), pyb::arg("tag"), pyb::arg("tp"), pyb::arg("pp"), pyb::arg("dp"),
      pyb::arg("out_tag") = "", pyb::arg("device") = "cpu", pyb::arg("overwrite") = false,
      pyb::arg("set_latest") = false);
  m.def(
      "plan_reshape",
      [](PyStore& ps, const std::string& tag, int tp, int pp, int dp) {
        auto held = ps.Hold();
        Store& s = held->store();
        checkpoint::ReshapePlan plan;
        {
          pyb::gil_scoped_release nogil;
          plan = ValueOrThrow(checkpoint::PlanReshape(s, tag, tp, pp, dp));
        }
        pyb::dict d;
        d["from"] = LayoutDict(plan.from);
        d["to"] = LayoutDict(plan.to);
        d["model_files"] = plan.model_files;
        d["zero_files"] = plan.zero_files;
        d["bytes_to_read"] = plan.bytes_to_read;
        d["tensors_linked"] = plan.tensors_linked;
        return d;
      },
      pyb::arg("store"), pyb::arg("tag"), pyb::arg("tp"), pyb::arg("pp"), pyb::arg("dp"));
  m.def(
      "import_path",
      [](PyStore& ps, const std::string& path, const std::string& tag, bool overwrite) {
        auto held = ps.Hold();
        Store& s = held->store();
        checkpoint::ImportReport r;
        TagInfo info;
        {
          pyb::gil_scoped_release nogil;
          info = ValueOrThrow(checkpoint::ImportPath(s, path, tag, overwrite, &r));
        }
        ps.Invalidate();  // Store.tags() lists the new tag
        return ImportDict(info.tag, r);
      },
      pyb::arg("store"), pyb::arg("path"), pyb::arg("tag") = "", pyb::arg("overwrite") = false);
  m.def(
      "export_tag",
      [](PyStore& ps, const std::string& tag, const std::string& out, const std::string& format,
         bool overwrite) {
        auto held = ps.Hold();
        std::string text;
        bool converted = false;
        {
          pyb::gil_scoped_release nogil;
          if (format == "safetensors") {
            kvb::ExportOptions eo;  // kv-browser's export, the same code
            eo.out_dir = out;
            eo.overwrite = overwrite;
            text = tools::JsonText(ValueOrThrow(kvb::ExportSafetensors(*held, tag, eo)), -1);
          } else {
            checkpoint::TorchExportOptions eo;
            eo.out_dir = out;
            eo.format = format;
            eo.overwrite = overwrite;
            auto r = ValueOrThrow(checkpoint::ExportTorch(held->store(), tag, eo));
            converted = r.converted;
            text = checkpoint::TorchExportJson(r);
          }
        }
        if (converted) ps.Invalidate();  // a temporary universal tag came and went
        return text;
      },
      pyb::arg("store"), pyb::arg("tag"), pyb::arg("out"), pyb::arg("format") = "pt",
      pyb::arg("overwrite") = false);
  m.def(
      "import_save_dir",
      [](PyStore& ps, const std::string& path, bool overwrite) {
        auto held = ps.Hold();
        Store& s = held->store();
        std::vector<checkpoint::ImportedTag> tags;
        {
          pyb::gil_scoped_release nogil;
          tags = ValueOrThrow(checkpoint::ImportSaveDir(s, path, overwrite));
        }
        ps.Invalidate();
        pyb::list out;
        for (const auto& t : tags) out.append(ImportDict(t.info.tag, t.report));
        return out;
      },
      pyb::arg("store"), pyb::arg("path"), pyb::arg("overwrite") = false);
  m.def(
      "export_universal",
      [](PyStore& ps, const std::string& tag, const std::string& out_tag, const std::string& device,
         bool overwrite, bool set_latest) {
        const std::string out = out_tag.empty() ? tag + "_universal" : out_tag;
        const checkpoint::WriteOptions w = Write(device, overwrite, set_latest);
        return RunQuery(ps, out,
                        [&](Store& s) { return checkpoint::ExportUniversal(s, tag, out, w); });
      },
      pyb::arg("store"), pyb::arg("tag"), pyb::arg("out_tag") = "", pyb::arg("device") = "cpu",
      pyb::arg("overwrite") = false, pyb::arg("set_latest") = false);
  m.def(
      "import_universal",
      [](PyStore& ps, const std::string& tag, int tp, int pp, int dp, int zero_stage, bool bf16,
         const std::string& out_tag, const std::string& device, bool overwrite, bool set_latest) {
        if (out_tag.empty()) {
          ThrowIfError(
              Status::InvalidArgument("import_universal of " + Quote(tag) + " needs an out_tag"));
        }
        const TrainLayout to{tp, pp, dp, zero_stage, bf16};
        const checkpoint::WriteOptions w = Write(device, overwrite, set_latest);
        return RunQuery(ps, out_tag, [&](Store& s) {
          return checkpoint::ImportUniversal(s, tag, to, out_tag, w);
        });
      },
      pyb::arg("store"), pyb::arg("tag"), pyb::arg("tp"), pyb::arg("pp"), pyb::arg("dp"),
      pyb::arg("zero_stage"), pyb::arg("bf16"), pyb::arg("out_tag"), pyb::arg("device") = "cpu",
      pyb::arg("overwrite") = false, pyb::arg("set_latest") = false);
  m.def(
      "synth",
      [](PyStore& ps, const std::string& tag, int tp, int pp, int dp, int zero_stage, bool bf16,
         int layers, int64_t hidden, int64_t vocab, int64_t vocab_multiple, int64_t max_positions,
         uint64_t seed, int64_t iteration, bool overwrite, bool set_latest) {
        auto held = ps.Hold();
        Store& s = held->store();
        CheckNotPending(s, tag);
        checkpoint::SynthOptions o;
        o.model.layers = layers;
        o.model.hidden = hidden;
        o.model.vocab = vocab;
        o.model.vocab_multiple = vocab_multiple;
        o.model.max_positions = max_positions;
        o.layout = TrainLayout{tp, pp, dp, zero_stage, bf16};
        o.seed = seed;
        o.iteration = iteration;
        checkpoint::WriteReport r;
        {
          pyb::gil_scoped_release nogil;
          r = ValueOrThrow(checkpoint::Synth(s, tag, o, Write("cpu", overwrite, set_latest)));
        }
        ps.Invalidate();  // Store.tags() lists the new tag
        pyb::dict d;
        d["tag"] = tag;
        d["layout"] = LayoutDict(o.layout);
        d["files"] = r.files;
        d["tensors"] = r.tensors;
        d["logical_bytes"] = r.logical_bytes;
        d["new_bytes"] = r.new_bytes;
        d["seconds"] = r.seconds;
        return d;
      },
      pyb::arg("store"), pyb::arg("tag"), pyb::arg("tp"), pyb::arg("pp"), pyb::arg("dp"),
      pyb::arg("zero_stage"), pyb::arg("bf16"), pyb::arg("layers"), pyb::arg("hidden"),
      pyb::arg("vocab"), pyb::arg("vocab_multiple"), pyb::arg("max_positions"), pyb::arg("seed"),
      pyb::arg("iteration"), pyb::arg("overwrite") = false, pyb::arg("set_latest") = true);
}

}  // namespace

void BindCheckpoint(pyb::module_& parent) {
  pyb::module_ m = parent.def_submodule(
      "checkpoint", "reshape maps, tag layouts and reshape queries of checkpoint/");
  BindMaps(m);
  BindLayout(m);
  BindQueries(m);
}

}  // namespace ckptkv::py
