"""``python3 -m ckptkv.bench_files``: entering and leaving a store, side by
side in one run: ``ckptkv.import_path`` of a DeepSpeed checkpoint directory
against ``torch.load`` of the same files, and ``ckptkv.export`` of the
imported tag back to files against ``torch.save`` of the same objects.

    PYTHONPATH=build/python /usr/bin/python3 -m ckptkv.bench_files            # ~1 GiB, a table
    PYTHONPATH=build/python /usr/bin/python3 -m ckptkv.bench_files --json --repeat 2

The directory is a ZeRO-1 save at tp=1, pp=1, dp=2 of the GPT-like model of
``python3 -m ckptkv.bench`` (same shapes and values for a ``--size-mib`` and
``--seed``): ``global_step1000/mp_rank_00_model_states.pt`` holds the bf16
weights (``module``) and ``param_shapes``;
``zero_pp_rank_{0,1}_mp_rank_00_optim_states.pt`` hold each rank's half of
the flat fp32 master weights and of Adam's two moments; ``latest`` names
the tag. 14 bytes per parameter, values uniform random.

Rows, in this order, each on fresh files:

=============================  ===============================================
``raw_write``                  the write ceiling: every tensor's bytes of the
                               three files into one file, fsync file + dir
``torch_save_dir``             ``torch.save`` of the three files' objects (how
                               DeepSpeed writes them), fsync files + dirs
``raw_read``                   the read ceiling: the raw file into new
                               tensors, cold page cache
``torch_load_dir``             ``torch.load`` of the three files, cold
``ckptkv_import``              ``ckptkv.import_path(store, save_dir)`` into a
                               fresh store: reads the files without pickle,
                               stores them as one tag (durable commit), cold
``ckptkv_reimport_unchanged``  the same directory again as another tag, cold:
                               every file is read and hashed, only
                               ``new_bytes`` are written
``ckptkv_export_pt``           ``ckptkv.export(store, tag, out, format="pt")``
                               from a cold store: the tag's files as
                               torch.save files, each synced, re-read and
                               digest-checked
``ckptkv_export_deepspeed``    the same with ``format="deepspeed"``
                               (``<tag>/`` and ``latest``)
=============================  ===============================================

After the timed rows (untimed): the imported tag loads equal to the objects
written, and ``torch.load`` of each exported file equals them too; the exit
code is 2 when one differs. Figures per row as in ``ckptkv.bench``
(seconds, MiB/s of tensor bytes, written/read bytes of /proc/self/io, peak
RSS growth); ``import_vs_torch_load`` and ``export_vs_torch_save`` are time
ratios within one repeat (below 1: ckptkv faster), medians over repeats.

Nothing here asserts a speed.
"""
import argparse
import collections
import dataclasses
import datetime
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import types

import torch

import ckptkv
from ckptkv.bench import (MiB, Meter, Params, Row, byte_view, default_parent, difference,
                          drop_cache, fsync_path, gpt_shape, log, machine_info, nbytes,
                          param_shapes, read_into, reset_peak_rss, tensors_of, tree_bytes,
                          write_all)

TAG = "global_step1000"
MODEL_FILE = "mp_rank_00_model_states.pt"
DP = 2

ROWS = ["raw_write", "torch_save_dir", "raw_read", "torch_load_dir", "ckptkv_import",
        "ckptkv_reimport_unchanged", "ckptkv_export_pt", "ckptkv_export_deepspeed"]


def fragment_address_class():
    """DeepSpeed's ``fragment_address`` (a dataclass of numel and start),
    defined here under DeepSpeed's module name so that torch.save writes
    what DeepSpeed writes, without DeepSpeed installed (DeepSpeed's own
    when it is)."""
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        return fragment_address
    except ImportError:
        pass
    name = "deepspeed.utils.tensor_fragment"
    if name not in sys.modules:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        mod = sys.modules[name]

        @dataclasses.dataclass
        class fragment_address:  # noqa: N801 - DeepSpeed's name
            numel: int
            start: int
        fragment_address.__module__ = name
        fragment_address.__qualname__ = "fragment_address"
        mod.fragment_address = fragment_address
    return sys.modules[name].fragment_address


def zero_file(name):
    return "zero_pp_rank_%d_mp_rank_00_optim_states.pt" % name


def deepspeed_files(params, step):
    """{file name: object} of a ZeRO-1 tag at dp=2, DeepSpeed's layout."""
    names = params.names
    module = collections.OrderedDict((n, params.weight[n]) for n in names)
    files = {MODEL_FILE: {
        "module": module, "buffer_names": [], "optimizer": None,
        "param_shapes": [collections.OrderedDict((n, params.weight[n].shape) for n in names)],
        "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
        "lr_scheduler": {"last_epoch": step, "base_lrs": [1e-4]},
        "sparse_tensor_module_names": set(), "skipped_steps": 0, "global_steps": step,
        "global_samples": step * 512, "dp_world_size": DP, "mp_world_size": 1,
        "ds_config": {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}},
        "ds_version": "0.16.5"}}
    flats = [torch.cat([d[n].reshape(-1) for n in names])
             for d in (params.master, params.exp_avg, params.exp_avg_sq)]
    total = flats[0].numel()
    part = (total + DP - 1) // DP
    pad = part * DP - total
    if pad:
        flats = [torch.cat([f, f.new_zeros(pad)]) for f in flats]
    fragment_address = fragment_address_class()
    for r in range(DP):
        # Each parameter's piece of this rank's partition, as DeepSpeed's
        # param_slice_mappings records it.
        mappings, start = collections.OrderedDict(), 0
        for n in names:
            lo, hi = max(start, r * part), min(start + params.weight[n].numel(), (r + 1) * part)
            if lo < hi:
                mappings[n] = fragment_address(numel=hi - lo, start=lo - r * part)
            start += params.weight[n].numel()
        master, m, v = (f[r * part:(r + 1) * part].clone() for f in flats)
        files[zero_file(r)] = {
            "optimizer_state_dict": {
                "zero_stage": 1, "loss_scaler": None, "dynamic_loss_scale": False,
                "overflow": False, "clip_grad": 1.0, "partition_count": [DP],
                "group_paddings": [pad if r == DP - 1 else 0],
                "single_partition_of_fp32_groups": [master],
                "base_optimizer_state": {
                    "state": {0: {"step": torch.tensor(float(step)), "exp_avg": m,
                                  "exp_avg_sq": v}},
                    "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8,
                                      "weight_decay": 0.1, "amsgrad": False, "params": [0]}]},
                "param_slice_mappings": [mappings]},
            "ds_config": {"zero_optimization": {"stage": 1}}, "ds_version": "0.16.5"}
    return files


class Bench:
    def __init__(self, args, files, root):
        self.a = args
        self.files = files
        self.root = root
        self.rows = {}
        self.cache_methods = set()
        self.differences = []
        self.rss_reset = reset_peak_rss()
        self.logical = sum(nbytes(t) for t in tensors_of(list(files.values())))
        self.raw_path = os.path.join(root, "raw", "state.bin")
        self.save_dir = os.path.join(root, "ds")
        self.store = os.path.join(root, "kv")
        self.loaded = None

    def measure(self, name, body, settle=False):
        log("  %-28s ..." % name, end="")
        row = Row(name)
        row.f["logical_bytes"] = self.logical
        m = Meter(row, self.rss_reset)
        body(row)
        m.stop()
        if settle:
            m.settle()
        self.rows[name] = row.f
        log(" %.3f s" % row.f["seconds"])

    def cold(self, path):
        self.cache_methods.add(drop_cache([path], self.a.cache_drop))

    def check(self, name, loaded):
        for f, obj in self.files.items():
            d = difference(obj, loaded.get(f), f)
            if d:
                log("error: %s: %s" % (name, d))
                self.differences.append("%s: %s" % (name, d))
                return

    def raw_write(self, row):
        os.makedirs(os.path.dirname(self.raw_path))
        fd = os.open(self.raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for t in tensors_of(list(self.files.values())):
                write_all(fd, byte_view(t))
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_path(os.path.dirname(self.raw_path), directory=True)

    def torch_save_dir(self, row):
        tag_dir = os.path.join(self.save_dir, TAG)
        os.makedirs(tag_dir)
        for f, obj in self.files.items():
            torch.save(obj, os.path.join(tag_dir, f))
            fsync_path(os.path.join(tag_dir, f))
        with open(os.path.join(self.save_dir, "latest"), "w") as f:
            f.write(TAG)
        fsync_path(tag_dir, directory=True)
        fsync_path(self.save_dir, directory=True)

    def raw_read(self, row):
        out = []
        with open(self.raw_path, "rb", buffering=0) as f:
            for t in tensors_of(list(self.files.values())):
                dst = torch.empty(t.shape, dtype=t.dtype)
                read_into(f, byte_view(dst))
                out.append(dst)
        del out

    def torch_load_dir(self, row):
        # torch.load of files this run has just written itself.
        self.loaded = {f: torch.load(os.path.join(self.save_dir, TAG, f), map_location="cpu")
                       for f in self.files}

    def importer(self, tag):
        def body(row):
            with ckptkv.Store(self.store) as s:
                r = ckptkv.import_path(s, self.save_dir, tag=tag)
            row.f["new_bytes"] = r["new_bytes"]
        return body

    def exporter(self, fmt):
        def body(row):
            out = os.path.join(self.root, "export-" + fmt)
            with ckptkv.Store(self.store, read_only=True) as s:
                ckptkv.export(s, TAG, out, format=fmt)
        return body

    def exported(self, fmt):
        base = os.path.join(self.root, "export-" + fmt)
        if fmt == "deepspeed":
            base = os.path.join(base, TAG)
        return {f: torch.load(os.path.join(base, f), map_location="cpu") for f in self.files}

    def run(self):
        self.measure("raw_write", self.raw_write)
        self.rows["raw_write"]["disk_bytes"] = tree_bytes(self.raw_path)
        self.measure("torch_save_dir", self.torch_save_dir)
        self.rows["torch_save_dir"]["disk_bytes"] = tree_bytes(self.save_dir)
        self.cold(self.raw_path)
        self.measure("raw_read", self.raw_read)
        self.cold(self.save_dir)
        self.measure("torch_load_dir", self.torch_load_dir)
        self.check("torch_load_dir", self.loaded)
        self.loaded = None
        gc.collect()
        self.cold(self.save_dir)
        self.measure("ckptkv_import", self.importer(TAG), settle=True)
        self.rows["ckptkv_import"]["disk_bytes"] = tree_bytes(self.store)
        self.cold(self.save_dir)
        self.measure("ckptkv_reimport_unchanged", self.importer("again"), settle=True)
        self.rows["ckptkv_reimport_unchanged"]["disk_bytes"] = tree_bytes(self.store)
        with ckptkv.Store(self.store, read_only=True) as s:
            self.check("ckptkv_import", {f: ckptkv.load(s, TAG, f) for f in self.files})
        for fmt in ("pt", "deepspeed"):
            name = "ckptkv_export_" + fmt
            self.cold(self.store)
            self.measure(name, self.exporter(fmt))
            self.rows[name]["disk_bytes"] = tree_bytes(os.path.join(self.root, "export-" + fmt))
            self.check(name, self.exported(fmt))
            gc.collect()
        for f in self.rows.values():
            f["mib_s"] = f["logical_bytes"] / MiB / f["seconds"] if f["seconds"] > 0 else None
        return self.rows


def ratios(rows):
    r = rows

    def div(a, b):
        return a / b if b else None
    return {
        "import_vs_torch_load": div(r["ckptkv_import"]["seconds"], r["torch_load_dir"]["seconds"]),
        "import_vs_raw_read": div(r["ckptkv_import"]["seconds"], r["raw_read"]["seconds"]),
        "reimport_new_bytes": r["ckptkv_reimport_unchanged"]["new_bytes"],
        "reimport_written_bytes": r["ckptkv_reimport_unchanged"]["written_bytes"],
        "export_pt_vs_torch_save": div(r["ckptkv_export_pt"]["seconds"],
                                       r["torch_save_dir"]["seconds"]),
        "export_deepspeed_vs_torch_save": div(r["ckptkv_export_deepspeed"]["seconds"],
                                              r["torch_save_dir"]["seconds"]),
        "export_pt_vs_raw_write": div(r["ckptkv_export_pt"]["seconds"],
                                      r["raw_write"]["seconds"]),
    }


def median(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    m = statistics.median(vals)
    return int(m) if all(isinstance(v, int) for v in vals) else m


def print_table(doc, out=sys.stdout):
    m = doc["machine"]
    w = out.write
    w("machine: %s, %d cores, %.1f GiB RAM, %s, %s on %s\n" % (
        m["cpu_model"], m["cores"], m["mem_total_bytes"] / 2**30, m["kernel"], m["filesystem"],
        m["disk"]))
    w("python %s, torch %s, ckptkv %s; %d tensors, %.1f MiB; page cache: %s; %s\n\n" % (
        m["python"], m["torch"], m["ckptkv"], doc["tensors"], doc["logical_bytes"] / MiB,
        doc["cache_drop"], "median of %d repeats" % doc["options"]["repeat"]
        if doc["options"]["repeat"] > 1 else "one run"))
    w("%-28s %8s %8s %11s %9s %9s %11s %10s\n" % ("row", "seconds", "MiB/s", "written MiB",
                                                   "new MiB", "read MiB", "on disk MiB",
                                                   "RSS +MiB"))

    def fmt(v, spec, scale=1.0):
        return "-" if v is None else format(v / scale, spec)
    for name in ROWS:
        f = doc["rows"][name]
        w("%-28s %8.3f %8s %11s %9s %9s %11s %10s\n" % (
            name, f["seconds"], fmt(f["mib_s"], ".1f"), fmt(f["written_bytes"], ".1f", MiB),
            fmt(f["new_bytes"], ".1f", MiB), fmt(f["read_bytes"], ".1f", MiB),
            fmt(f["disk_bytes"], ".1f", MiB), fmt(f["peak_rss_delta_bytes"], ".1f", MiB)))
    w("\n")
    for k, v in doc["ratios"].items():
        w("  %-34s %s\n" % (k, fmt(v, ".0f" if k.endswith("bytes") else ".3f")))
    w("imported and exported values equal the objects written: %s\n" % (
        "yes" if doc["equal"] else "NO: " + "; ".join(doc["differences"])))


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python3 -m ckptkv.bench_files",
        description="ckptkv import/export of a DeepSpeed directory vs torch.load/torch.save "
                    "of the same files, side by side.")
    p.add_argument("--size-mib", type=int, default=1024,
                   help="about how many MiB of tensors the directory holds (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tensors' values (default 0)")
    p.add_argument("--repeat", type=int, default=1, help="repeats; figures are medians")
    p.add_argument("--dir", default=None, help="parent of the work directory (removed after)")
    p.add_argument("--cache-drop", choices=["auto", "drop_caches", "fadvise", "none"],
                   default="auto", help="how the page cache is emptied before reads")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    a = p.parse_args(argv)
    if a.size_mib < 1 or a.repeat < 1:
        p.error("--size-mib and --repeat must be at least 1")
    return a


def main(argv=None):
    a = parse_args(argv)
    parent = os.path.abspath(a.dir) if a.dir else default_parent()
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="ckptkv-filebench-", dir=parent)
    try:
        shapes = param_shapes(*gpt_shape(a.size_mib << 20))
        files = deepspeed_files(Params.generate(shapes, a.seed), 1000)
        tensors = sum(1 for _ in tensors_of(list(files.values())))
        runs, methods, differences = [], set(), []
        for k in range(a.repeat):
            log("repeat %d of %d, work dir %s" % (k + 1, a.repeat, root))
            run_dir = os.path.join(root, "run%d" % k)
            os.makedirs(run_dir)
            b = Bench(a, files, run_dir)
            runs.append(b.run())
            methods |= b.cache_methods
            differences += b.differences
            logical = b.logical
            del b
            gc.collect()
            shutil.rmtree(run_dir, ignore_errors=True)
        rows = {n: {k: median([r[n].get(k) for r in runs]) for k in runs[0][n]} for n in ROWS}
        doc = {
            "bench": "ckptkv.bench_files",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(root),
            "options": {"size_mib": a.size_mib, "seed": a.seed, "repeat": a.repeat},
            "tensors": tensors, "logical_bytes": logical,
            "cache_drop": "+".join(sorted(methods)),
            "rows": rows,
            "ratios": {k: median([ratios(r)[k] for r in runs]) for k in ratios(runs[0])},
            "runs": runs,
            "equal": not differences, "differences": differences,
        }
        if a.json:
            json.dump(doc, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print_table(doc)
        return 0 if not differences else 2
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
