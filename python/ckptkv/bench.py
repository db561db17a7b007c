"""``python3 -m ckptkv.bench``: ckptkv.save / ckptkv.load against
torch.save / torch.load on one state dict, side by side in one run.

    PYTHONPATH=build/python /usr/bin/python3 -m ckptkv.bench              # 1 GiB, a table
    PYTHONPATH=build/python /usr/bin/python3 -m ckptkv.bench --json       # one JSON document
    PYTHONPATH=build/python /usr/bin/python3 -m ckptkv.bench --size-mib 256 --repeat 3

The state dict is GPT-like and deterministic from ``--seed``: the bf16
weights of a transformer (embeddings, layers of fused QKV, attention
projection, MLP and layer norms; Megatron's names) under ``"module"``, and
under ``"optimizer"`` an Adam state per parameter (fp32 ``exp_avg``,
``exp_avg_sq``, a ``step`` tensor), the fp32 master weights and
``param_groups``, plus a few scalars. That is 14 bytes per parameter (2 of
them the bf16 weight); the hidden size and layer count are picked to give
about ``--size-mib`` MiB. Values are uniform random, so nothing deduplicates
or compresses by accident.

Rows, each repeat into fresh files under one work directory; the memcpy
floor, then the saves, then the loads, in this order in the first repeat.
Later repeats rotate the order of the six full saves (raw, torch, ckptkv
with its two re-saves, DeepSpeed engine, the two background saves, the
compressed save) and of the four loads by one place per repeat (``orders`` in the JSON), because on a virtual disk a 1 GiB
write right after another one can be much slower than the first, and a
fixed order would favour whatever comes first:

==========================  ================================================
``raw_write``               the write ceiling: every tensor's bytes, in
                            order, written into one file; fsync of the file
                            and of its directory
``torch_save``              ``torch.save(sd, path)``, then fsync of the file
                            and of its directory
``ckptkv_save``             ``ckptkv.save(sd, store, tag)`` into a fresh
                            store (open, save, durable commit, close)
``ckptkv_resave_unchanged`` the same dict again under a new tag
``ckptkv_resave_10pct``     a new tag where whole parameters holding about
                            10% of the bytes changed (weight, master,
                            exp_avg and exp_avg_sq each +1)
``deepspeed_engine_save``   ``ckptkv.deepspeed.KvCheckpointEngine`` in
                            DeepSpeed's call sequence into a fresh store:
                            makedirs(save_dir), create(tag),
                            makedirs(save_dir/tag),
                            save(state_dict=sd, path=.../mp_rank_00_model_states.pt),
                            commit(tag); the engine's cleanup (closing the
                            store) comes after the timed region, as
                            DeepSpeed keeps its engine open across saves
``ckptkv_save_background``  ``Store.begin(tag, background=True)``: save
                            returns after the snapshot, commit waits for
                            the writes; fresh store, first save (the
                            snapshot buffers are new); ``blocked_seconds``
                            is the time save() held the caller, ``seconds``
                            the time to the durable commit
``ckptkv_save_background_warm``  the 10%-changed dict as the next tag of
                            that store: the snapshot reuses the buffers
``ckptkv_save_compressed``  ``ckptkv.save(..., compress=True)`` (grouped
                            zstd) into a fresh store
``memcpy``                  the snapshot floor: every tensor copied into
                            buffers allocated and written once before
``raw_read``                the read ceiling: the raw file read back into
                            newly allocated tensors, cold page cache
``torch_load``              ``torch.load(path, map_location="cpu")``, cold
``ckptkv_load``             ``ckptkv.load(store, tag)`` of the full save
                            (opens the store read-only), cold
``ckptkv_load_compressed``  the same of the compressed save, cold
==========================  ================================================

The page cache is dropped before every load (and the raw read) as the C++
bench (``ckptkv bench``) does: ``sync`` and ``3 > /proc/sys/vm/drop_caches``
when that file is writable (root), else ``posix_fadvise(DONTNEED)`` on every
file the load will read (the .pt file, the raw file, every file of the
store) after a ``sync``. The output says which was used
(``--cache-drop`` chooses). Every load is compared with the saved dict
(outside the timed region); the exit code is 2 if one differs.

Figures per row: ``seconds`` (wall time of the timed region), ``mib_s``
(logical tensor bytes / 2^20 / seconds; for re-saves an effective rate),
``time_vs_torch`` (seconds over torch_save's for saves, over torch_load's
for loads), ``throughput_vs_raw`` (mib_s over raw_write's or raw_read's),
``written_bytes`` (``write_bytes`` of /proc/self/io over the timed region,
every thread of the process, plus what background work wrote until the
process was quiet for 0.5 s: ``background_write_bytes``), ``new_bytes``
(chunks the store did not hold, from the commit), ``read_bytes`` (from
the device), ``disk_bytes`` (the file / the whole store directory after
the row), ``disk_vs_pt`` (that over the .pt file's size), and peak RSS:
VmHWM reset through /proc/self/clear_refs at the start of the row (after
garbage collection and glibc's malloc_trim), reported as growth over the
RSS at the start (``peak_rss_delta_bytes``); where the
reset is refused, ``resource.getrusage``'s process-lifetime ``ru_maxrss``
(no delta). Ratios are taken within one repeat (side by side); with
``--repeat N`` every figure and ratio is the median over the repeats
(``runs`` in the JSON holds each repeat's).

``targets`` in the JSON (and the table's last lines) hold issue 12's
ratios, each the median of its per-repeat values: load vs the raw read and
vs torch.load, the background save's blocked time vs the memcpy floor and
vs torch.save, its time to durable commit vs the synchronous save, the full
save vs the raw write, and the compressed save's time vs torch.save and
store size vs the .pt file.

Nothing here asserts a speed.
"""
import argparse
import collections
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

import torch

import ckptkv
import ckptkv.deepspeed as ckds

MiB = float(1 << 20)
BYTES_PER_PARAM = 2 + 4 + 4 + 4  # bf16 weight, fp32 master, exp_avg, exp_avg_sq
DS_FILE = "mp_rank_00_model_states.pt"

SAVE_ROWS = ["memcpy", "raw_write", "torch_save", "ckptkv_save", "ckptkv_resave_unchanged",
             "ckptkv_resave_10pct", "deepspeed_engine_save", "ckptkv_save_background",
             "ckptkv_save_background_warm", "ckptkv_save_compressed"]
LOAD_ROWS = ["raw_read", "torch_load", "ckptkv_load", "ckptkv_load_compressed"]
ROWS = SAVE_ROWS + LOAD_ROWS

WHAT = {
    "memcpy": "copy of every tensor into buffers allocated and touched before (warm)",
    "raw_write": "write ceiling: tensor bytes into one file, fsync file + dir",
    "torch_save": "torch.save(sd, path), fsync file + dir",
    "ckptkv_save": "ckptkv.save(sd, store, tag) into a fresh store",
    "ckptkv_resave_unchanged": "ckptkv.save of the same dict, new tag",
    "ckptkv_resave_10pct": "ckptkv.save, ~10% of the bytes changed, new tag",
    "deepspeed_engine_save": "KvCheckpointEngine makedirs/create/save/commit, fresh store",
    "ckptkv_save_background": "Store.begin(background=True): save (snapshot) + commit, "
                              "fresh store, first save (snapshot buffers new)",
    "ckptkv_save_background_warm": "the same for the 10%-changed dict, next tag, buffers reused",
    "ckptkv_save_compressed": "ckptkv.save into a fresh store with compress=True "
                              "(grouped-zstd)",
    "raw_read": "read ceiling: the raw file into new tensors, cold cache",
    "torch_load": "torch.load(path, map_location='cpu'), cold cache",
    "ckptkv_load": "ckptkv.load(store, tag) of the full save, cold cache",
    "ckptkv_load_compressed": "ckptkv.load of the compressed save, cold cache",
}


def log(msg, end="\n"):
    """Progress goes to stderr: stdout carries only the table or the JSON."""
    sys.stderr.write(msg + end)
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# The synthetic state dict.

def layer_params(hidden):
    """Parameters of one transformer layer: QKV 3H^2 + 3H, projection H^2 + H,
    MLP 8H^2 + 5H, two layer norms 4H."""
    return 12 * hidden * hidden + 13 * hidden


def gpt_shape(size_bytes):
    """(hidden, layers, vocab, positions) for a state dict of about
    ``size_bytes``: the hidden size is the largest power of two from 64 to
    2048 that still allows 4 layers of twice it, about 85% of the parameters
    are in the layers, the rest is the word embedding (vocab a multiple of
    64, at least 64)."""
    params = max(1, size_bytes // BYTES_PER_PARAM)
    hidden = 64
    while hidden < 2048 and 4 * layer_params(hidden * 2) <= params:
        hidden *= 2
    layers = max(1, round(0.85 * params / layer_params(hidden)))
    positions = min(1024, hidden)
    rest = params - layers * layer_params(hidden) - positions * hidden - 2 * hidden
    vocab = max(64, rest // hidden // 64 * 64)
    return hidden, layers, vocab, positions


def param_shapes(hidden, layers, vocab, positions):
    """[(name, shape)] of the model's parameters, Megatron's names and order."""
    h = hidden
    out = [("word_embeddings.weight", (vocab, h)), ("position_embeddings.weight", (positions, h))]
    for i in range(layers):
        p = "layers.%d." % i
        out += [
            (p + "input_layernorm.weight", (h,)), (p + "input_layernorm.bias", (h,)),
            (p + "self_attention.query_key_value.weight", (3 * h, h)),
            (p + "self_attention.query_key_value.bias", (3 * h,)),
            (p + "self_attention.dense.weight", (h, h)), (p + "self_attention.dense.bias", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.bias", (h,)),
            (p + "mlp.dense_h_to_4h.weight", (4 * h, h)), (p + "mlp.dense_h_to_4h.bias", (4 * h,)),
            (p + "mlp.dense_4h_to_h.weight", (h, 4 * h)), (p + "mlp.dense_4h_to_h.bias", (h,)),
        ]
    out += [("final_layernorm.weight", (h,)), ("final_layernorm.bias", (h,))]
    return out


class Params:
    """The flat tensors of the state dict, per parameter name: the bf16
    weight, the fp32 master and Adam's two moments. ``state_dict`` builds
    the nested dict from them, so two dicts can share unchanged tensors."""

    def __init__(self, names, weight, master, exp_avg, exp_avg_sq):
        self.names = names
        self.weight, self.master = weight, master
        self.exp_avg, self.exp_avg_sq = exp_avg, exp_avg_sq

    @classmethod
    def generate(cls, shapes, seed):
        g = torch.Generator().manual_seed(seed)

        def uniform(shape, scale):
            return torch.rand(shape, generator=g).sub_(0.5).mul_(scale)

        weight, master, exp_avg, exp_avg_sq = {}, {}, {}, {}
        for name, shape in shapes:
            master[name] = uniform(shape, 0.04)
            weight[name] = master[name].to(torch.bfloat16)
            exp_avg[name] = uniform(shape, 2e-3)
            exp_avg_sq[name] = torch.rand(shape, generator=g).mul_(1e-6)
        return cls([n for n, _ in shapes], weight, master, exp_avg, exp_avg_sq)

    def param_bytes(self, name):
        return sum(nbytes(d[name]) for d in (self.weight, self.master, self.exp_avg,
                                            self.exp_avg_sq))

    def changed(self, fraction):
        """A copy in which whole parameters holding about ``fraction`` of the
        bytes have every one of their four tensors +1. Parameters are taken
        with a stride of 7 over the list (spread over the model), skipping
        any that would pass ``fraction``, until 95% of it is reached (or
        the list ends; the first parameter if none fits). Returns (Params,
        changed bytes, changed names)."""
        total = sum(self.param_bytes(n) for n in self.names)
        goal = fraction * total
        picked, changed = [], 0
        for start in range(7):
            for i in range(start, len(self.names), 7):
                size = self.param_bytes(self.names[i])
                if changed >= 0.95 * goal or changed + size > goal:
                    continue
                picked.append(self.names[i])
                changed += size
        if not picked:
            picked, changed = [self.names[0]], self.param_bytes(self.names[0])
        dicts = [dict(d) for d in (self.weight, self.master, self.exp_avg, self.exp_avg_sq)]
        for d in dicts:
            for n in picked:
                d[n] = d[n].add(1)
        return Params(self.names, *dicts), changed, picked

    def state_dict(self, step):
        """The nested state dict, DeepSpeed-like: module, optimizer (Adam
        state by parameter index, fp32 master weights, param_groups),
        scalars."""
        state = {}
        for i, n in enumerate(self.names):
            state[i] = {"step": torch.tensor(float(step)), "exp_avg": self.exp_avg[n],
                        "exp_avg_sq": self.exp_avg_sq[n]}
        return {
            "module": collections.OrderedDict((n, self.weight[n]) for n in self.names),
            "optimizer": {
                "state": state,
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8,
                                  "weight_decay": 0.1, "amsgrad": False, "maximize": False,
                                  "foreach": None, "capturable": False,
                                  "params": list(range(len(self.names)))}],
                "fp32_master_weights": collections.OrderedDict(
                    (n, self.master[n]) for n in self.names),
            },
            "global_steps": step,
            "global_samples": step * 512,
            "lr_scheduler": {"last_epoch": step, "base_lrs": [1e-4]},
            "ds_version": "0.16.0",
            "dp_world_size": 1,
            "mp_world_size": 1,
        }


def nbytes(t):
    """A tensor's bytes (torch 1.13 has no Tensor.nbytes)."""
    return t.numel() * t.element_size()


def tensors_of(obj):
    """Every tensor of a nested value, in a fixed order (dicts in insertion
    order)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_of(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_of(v)


def difference(a, b, path=""):
    """None when ``a`` and ``b`` are equal (tensors: dtype, shape and every
    element), else where and how they first differ."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return "%s: tensor vs %s" % (path, type(b).__name__)
        if a.dtype != b.dtype or a.shape != b.shape:
            return "%s: %s%s vs %s%s" % (path, a.dtype, list(a.shape), b.dtype, list(b.shape))
        return None if torch.equal(a, b) else "%s: tensor values differ" % path
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a.keys()) != list(b.keys()):
            return "%s: keys differ" % path
        for k in a:
            d = difference(a[k], b[k], "%s/%s" % (path, k))
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return "%s: %s of %d vs %s of %d" % (path, type(a).__name__, len(a),
                                                 type(b).__name__, len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            d = difference(x, y, "%s[%d]" % (path, i))
            if d:
                return d
        return None
    if type(a) is not type(b) or a != b:
        return "%s: %r vs %r" % (path, a, b)
    return None


# ---------------------------------------------------------------------------
# Process and machine figures.

def io_counters(pid="self"):
    """(read_bytes, write_bytes) of /proc/<pid>/io: what the process (all of
    its threads) fetched from / sent to the block layer; None if unreadable."""
    try:
        with open("/proc/%s/io" % pid) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["read_bytes"]), int(fields["write_bytes"])
    except (OSError, KeyError, ValueError):
        return None


def status_bytes(key, pid="self"):
    """A "Key:  123 kB" line of /proc/<pid>/status in bytes, or None."""
    try:
        with open("/proc/%s/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss():
    """Restarts VmHWM from the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _libc_malloc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_memory():
    """Collects garbage and hands freed heap memory back to the kernel
    (glibc's malloc_trim), so that a row's RSS growth does not depend on
    what earlier rows freed into the allocator."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def tree_bytes(path):
    """Bytes of the regular files under ``path`` (or of the file)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def files_under(path):
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, f) for d, _, files in os.walk(path) for f in files]


def drop_cache(paths, mode):
    """Empties the page cache of ``paths`` before a load; returns the method
    used: "drop_caches" (sync; 3 > /proc/sys/vm/drop_caches), "fadvise"
    (sync; posix_fadvise(DONTNEED) on every file under paths) or "none".
    ``mode`` is auto (drop_caches where writable, else fadvise),
    drop_caches, fadvise or none."""
    if mode == "none":
        return "none"
    os.sync()  # dirty pages cannot be dropped
    if mode in ("auto", "drop_caches"):
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")
            return "drop_caches"
        except OSError:
            if mode == "drop_caches":
                raise
    for p in paths:
        for f in files_under(p):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "fadvise"


def fsync_path(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def machine_info(path):
    """CPU, cores, memory, kernel, the device and file system of ``path``."""
    info = {"cpu_model": "", "cores": os.cpu_count(), "mem_total_bytes": 0,
            "kernel": "%s %s" % (platform.system(), platform.release()),
            "disk": "", "filesystem": "",
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "ckptkv": ckptkv.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_total_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        dev = os.stat(path).st_dev
        majmin = "%d:%d" % (os.major(dev), os.minor(dev))
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == majmin and " - " in line:
                    rest = line.split(" - ", 1)[1].split()
                    info["filesystem"], info["disk"] = rest[0], rest[1]
                    break
        sysdir = "/sys/dev/block/" + majmin
        for sub in ("", "/.."):
            rot = sysdir + sub + "/queue/rotational"
            if os.path.exists(rot):
                with open(rot) as f:
                    info["disk"] += " [rotational]" if f.read().strip() == "1" \
                        else " [non-rotational]"
                break
    except (OSError, IndexError):
        pass
    return info


def default_parent():
    """The temp directory, unless it is in memory (tmpfs), then the current
    directory: the bench must measure a disk."""
    tmp = tempfile.gettempdir()
    fs = machine_info(tmp)["filesystem"]
    return os.getcwd() if fs in ("tmpfs", "ramfs") else tmp


# ---------------------------------------------------------------------------
# Measurement.

class Row:
    """One row's figures in one repeat, filled by a Meter."""

    def __init__(self, name):
        self.name = name
        self.f = {"seconds": 0.0, "logical_bytes": 0, "written_bytes": None,
                  "background_write_bytes": None, "read_bytes": None, "new_bytes": None,
                  "disk_bytes": None, "peak_rss_bytes": None, "peak_rss_delta_bytes": None}


class Meter:
    """Brackets a timed region: sync, reset peak RSS, counters; stop() takes
    the deltas, settle() charges background writes that follow."""

    def __init__(self, row, rss_reset):
        self.row = row
        self.rss_reset = rss_reset
        release_memory()
        os.sync()  # earlier rows' write-back does not land in this one
        self.rss0 = status_bytes("VmRSS")
        if rss_reset:
            reset_peak_rss()
        self.io0 = io_counters()
        self.t0 = time.perf_counter()

    def stop(self):
        f = self.row.f
        f["seconds"] = time.perf_counter() - self.t0
        io = io_counters()
        if io is not None and self.io0 is not None:
            f["read_bytes"] = io[0] - self.io0[0]
            f["written_bytes"] = io[1] - self.io0[1]
            self.w_stop = io[1]
        if self.rss_reset:
            peak = status_bytes("VmHWM")
            f["peak_rss_bytes"] = peak
            if peak is not None and self.rss0 is not None:
                f["peak_rss_delta_bytes"] = max(0, peak - self.rss0)
        else:
            f["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def settle(self, limit=60.0):
        """Waits until the process wrote nothing for 0.5 s (at most
        ``limit``) and adds what it wrote meanwhile (RocksDB's background
        flushes and compactions) to the row's written bytes."""
        f = self.row.f
        if f["written_bytes"] is None:
            return
        t0, last, quiet = time.perf_counter(), io_counters()[1], 0
        while quiet < 5 and time.perf_counter() - t0 < limit:
            time.sleep(0.1)
            now = io_counters()[1]
            quiet, last = (quiet + 1, last) if now == last else (0, now)
        f["background_write_bytes"] = last - self.w_stop
        f["written_bytes"] += last - self.w_stop


def write_all(fd, buf):
    view = memoryview(buf).cast("B")
    while view:
        n = os.write(fd, view[:1 << 30])
        view = view[n:]


def read_into(f, buf):
    view = memoryview(buf).cast("B")
    while view:
        n = f.readinto(view)
        if not n:
            raise EOFError("short read of %s" % f.name)
        view = view[n:]


def byte_view(t):
    """A writable numpy uint8 view of a contiguous CPU tensor's bytes."""
    return t.reshape(-1).view(torch.uint8).numpy()


class Bench:
    """The rows of one repeat under ``root``; figures into ``self.rows``."""

    def __init__(self, args, params, changed, root):
        self.a = args
        self.sd = params.state_dict(1000)
        self.sd10 = changed.state_dict(1002)
        self.root = root
        self.rows = {}
        self.cache_methods = set()
        self.differences = []
        self.loaded = None  # what the last load returned, until it is checked
        self.order = []  # row names in the order they ran
        self.rss_reset = reset_peak_rss()
        self.raw_path = os.path.join(root, "raw", "state.bin")
        self.pt_path = os.path.join(root, "torch", "state.pt")
        self.kv_path = os.path.join(root, "kv")
        self.ds_dir = os.path.join(root, "ds")
        self.bg_path = os.path.join(root, "kv-background")
        self.zkv_path = os.path.join(root, "kv-compressed")
        self.logical = sum(nbytes(t) for t in tensors_of(self.sd))

    def measure(self, name, body, settle=False):
        """Runs ``body(row)`` as the timed region of row ``name``."""
        log("  %-24s ..." % name, end="")
        row = Row(name)
        row.f["logical_bytes"] = self.logical
        m = Meter(row, self.rss_reset)
        after = body(row)
        m.stop()
        if settle:
            m.settle()
        if after is not None:
            after()  # untimed work that must follow the settle (closing)
        self.rows[name] = row.f
        log(" %.3f s" % row.f["seconds"])
        return row

    def check(self, name, loaded, expected):
        d = difference(expected, loaded)
        if d:
            log("error: %s: the loaded value differs from the saved one: %s" % (name, d))
            self.differences.append("%s: %s" % (name, d))

    def cold(self, path):
        self.cache_methods.add(drop_cache([path], self.a.cache_drop))

    # ---- saves
    def raw_write(self, row):
        os.makedirs(os.path.dirname(self.raw_path))
        fd = os.open(self.raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for t in tensors_of(self.sd):
                write_all(fd, byte_view(t))
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_path(os.path.dirname(self.raw_path), directory=True)

    def torch_save(self, row):
        os.makedirs(os.path.dirname(self.pt_path))
        torch.save(self.sd, self.pt_path)  # the path form: LibTorch's own file writer
        fsync_path(self.pt_path)
        fsync_path(os.path.dirname(self.pt_path), directory=True)

    def kv_save(self, sd, tag):
        def body(row):
            info = ckptkv.save(sd, self.kv_path, tag)
            row.f["logical_bytes"] = info["logical_bytes"]
            row.f["new_bytes"] = info["new_bytes"]
        return body

    def ds_save(self, row):
        engine = ckds.KvCheckpointEngine()
        tag = "global_step1000"
        engine.makedirs(self.ds_dir, exist_ok=True)
        engine.create(tag)
        engine.makedirs(os.path.join(self.ds_dir, tag), exist_ok=True)
        engine.save(state_dict=self.sd, path=os.path.join(self.ds_dir, tag, DS_FILE))
        engine.commit(tag)
        row.f["logical_bytes"] = engine.last_commit["logical_bytes"]
        row.f["new_bytes"] = engine.last_commit["new_bytes"]
        return engine.cleanup

    def memcpy(self, row):
        # The floor of any snapshot: the same bytes into buffers that exist
        # and were written once before (no page faults in the timed region).
        pairs = [(torch.empty_like(t), t) for t in tensors_of(self.sd)]
        for dst, src in pairs:
            dst.copy_(src)
        t0 = time.perf_counter()
        for dst, src in pairs:
            dst.copy_(src)
        row.f["copy_seconds"] = time.perf_counter() - t0
        del pairs

    def background_saves(self):
        """Two background saves through one Store (its snapshot pool): the
        first into new buffers, the second reusing them; seconds are to the
        durable commit, ``blocked_seconds`` the time save() held the caller."""
        store = ckptkv.Store(self.bg_path)
        try:
            for name, sd, tag in (("ckptkv_save_background", self.sd, "step1000"),
                                  ("ckptkv_save_background_warm", self.sd10, "step1002")):
                def body(row, sd=sd, tag=tag):
                    w = store.begin(tag, background=True)
                    r = w.save(sd)
                    row.f["blocked_seconds"] = r["blocked_seconds"]
                    row.f["background"] = r["background"]
                    info = w.commit()
                    row.f["logical_bytes"] = info["logical_bytes"]
                    row.f["new_bytes"] = info["new_bytes"]
                self.measure(name, body, settle=True)
                self.rows[name]["disk_bytes"] = tree_bytes(self.bg_path)
        finally:
            store.close()

    def save_compressed(self):
        def body(row):
            info = ckptkv.save(self.sd, self.zkv_path, "step1000", compress=True)
            row.f["logical_bytes"] = info["logical_bytes"]
            row.f["new_bytes"] = info["new_bytes"]
            row.f["stored_new_bytes"] = info["stored_new_bytes"]
        self.measure("ckptkv_save_compressed", body, settle=True)
        self.rows["ckptkv_save_compressed"]["disk_bytes"] = tree_bytes(self.zkv_path)

    # ---- loads
    def raw_read(self, row):
        out = []
        with open(self.raw_path, "rb", buffering=0) as f:
            for t in tensors_of(self.sd):
                dst = torch.empty(t.shape, dtype=t.dtype)
                read_into(f, byte_view(dst))
                out.append(dst)
        self.loaded = out

    def torch_load(self, row):
        # The reference users run: torch.load of the file this run has just
        # written with torch.save (Debian's torch 1.13 weights_only unpickler
        # cannot read its floats). The only unpickling in ckptkv's code, of
        # bytes it made itself; the package never unpickles.
        self.loaded = torch.load(self.pt_path, map_location="cpu")

    def kv_load(self, row):
        self.loaded = ckptkv.load(self.kv_path, "step1000")

    def zkv_load(self, row):
        self.loaded = ckptkv.load(self.zkv_path, "step1000")

    def save_raw(self):
        self.measure("raw_write", self.raw_write)
        self.rows["raw_write"]["disk_bytes"] = tree_bytes(self.raw_path)

    def save_torch(self):
        self.measure("torch_save", self.torch_save)
        self.rows["torch_save"]["disk_bytes"] = tree_bytes(self.pt_path)

    def save_kv(self):
        """The full save and the two re-saves into the same store."""
        for name, sd, tag in (("ckptkv_save", self.sd, "step1000"),
                              ("ckptkv_resave_unchanged", self.sd, "step1001"),
                              ("ckptkv_resave_10pct", self.sd10, "step1002")):
            self.measure(name, self.kv_save(sd, tag), settle=True)
            self.rows[name]["disk_bytes"] = tree_bytes(self.kv_path)

    def save_ds(self):
        self.measure("deepspeed_engine_save", self.ds_save, settle=True)
        self.rows["deepspeed_engine_save"]["disk_bytes"] = tree_bytes(self.ds_dir)

    def load(self, name, path, body):
        """One load from a cold page cache, then compared with what was saved."""
        self.cold(path)
        self.measure(name, body)
        self.rows[name]["disk_bytes"] = tree_bytes(path)
        expected = list(tensors_of(self.sd)) if name == "raw_read" else self.sd
        self.check(name, self.loaded, expected)
        self.loaded = None

    def run(self, rotate=0):
        """Every row, the saves first, then the loads. ``rotate`` shifts the
        order of the full saves and of the loads, so that over repeats no
        row always runs first: on a disk whose speed depends on what was
        just written (a virtual disk's write-back or burst budget), a fixed
        order favours whatever comes first."""
        self.measure("memcpy", self.memcpy)
        self.rows["memcpy"]["seconds"] = self.rows["memcpy"]["copy_seconds"]
        self.rows["memcpy"]["disk_bytes"] = 0
        saves = [self.save_raw, self.save_torch, self.save_kv, self.save_ds,
                 self.background_saves, self.save_compressed]
        loads = [("raw_read", self.raw_path, self.raw_read),
                 ("torch_load", self.pt_path, self.torch_load),
                 ("ckptkv_load", self.kv_path, self.kv_load),
                 ("ckptkv_load_compressed", self.zkv_path, self.zkv_load)]
        n, m = len(saves), len(loads)
        for step in saves[rotate % n:] + saves[:rotate % n]:
            step()
        for entry in loads[rotate % m:] + loads[:rotate % m]:
            self.load(*entry)
        self.order = list(self.rows)
        pt_bytes = self.rows["torch_save"]["disk_bytes"]
        for f in self.rows.values():
            f["disk_vs_pt"] = f["disk_bytes"] / pt_bytes if pt_bytes else None
        add_ratios(self.rows)
        return {name: self.rows[name] for name in ROWS}


def add_ratios(rows):
    """Per row: mib_s, time_vs_torch and throughput_vs_raw (one repeat)."""
    for name, f in rows.items():
        f["mib_s"] = f["logical_bytes"] / MiB / f["seconds"] if f["seconds"] > 0 else None
    for name, f in rows.items():
        torch_row = rows["torch_save" if name in SAVE_ROWS else "torch_load"]
        raw_row = rows["raw_write" if name in SAVE_ROWS else "raw_read"]
        f["time_vs_torch"] = f["seconds"] / torch_row["seconds"] if torch_row["seconds"] else None
        f["throughput_vs_raw"] = (f["mib_s"] / raw_row["mib_s"]
                                  if f["mib_s"] and raw_row["mib_s"] else None)


# The issue-12 targets, as (name, figure, comparison, bound); figures are
# taken within one repeat (side by side), then the median over repeats.
TARGETS = [
    ("load_vs_raw_read_throughput", ">=", 0.9),
    ("torch_load_vs_load_time", ">=", 1.3),
    ("background_blocked_vs_memcpy", "<=", 1.5),
    ("background_blocked_vs_memcpy_first_save", "<=", 1.5),
    ("torch_save_vs_background_blocked", ">=", 5.0),
    ("background_durable_vs_sync_save_time", "<=", 1.0),
    ("full_save_vs_raw_write_throughput", ">=", 0.9),
    ("torch_save_vs_compressed_save_time", ">=", 1.2),
    ("compressed_store_vs_pt_size", "<=", 0.8),
]


def target_figures(rows):
    """The target figures of one repeat's rows."""
    r = rows

    def div(a, b):
        return a / b if a is not None and b else None
    return {
        "load_vs_raw_read_throughput": r["ckptkv_load"]["throughput_vs_raw"],
        "torch_load_vs_load_time": div(r["torch_load"]["seconds"], r["ckptkv_load"]["seconds"]),
        "background_blocked_vs_memcpy": div(r["ckptkv_save_background_warm"]["blocked_seconds"],
                                            r["memcpy"]["seconds"]),
        "background_blocked_vs_memcpy_first_save": div(
            r["ckptkv_save_background"]["blocked_seconds"], r["memcpy"]["seconds"]),
        "torch_save_vs_background_blocked": div(
            r["torch_save"]["seconds"], r["ckptkv_save_background_warm"]["blocked_seconds"]),
        "background_durable_vs_sync_save_time": div(r["ckptkv_save_background"]["seconds"],
                                                    r["ckptkv_save"]["seconds"]),
        "full_save_vs_raw_write_throughput": r["ckptkv_save"]["throughput_vs_raw"],
        "torch_save_vs_compressed_save_time": div(r["torch_save"]["seconds"],
                                                  r["ckptkv_save_compressed"]["seconds"]),
        "compressed_store_vs_pt_size": r["ckptkv_save_compressed"]["disk_vs_pt"],
    }


def median_targets(runs):
    out = {}
    for name, op, bound in TARGETS:
        vals = [target_figures(r)[name] for r in runs]
        vals = [v for v in vals if v is not None]
        v = statistics.median(vals) if vals else None
        out[name] = {"value": v, "target": "%s %g" % (op, bound),
                     "met": None if v is None else (v >= bound if op == ">=" else v <= bound)}
    return out


def median_rows(runs):
    """Each numeric figure of each row: the median over the repeats."""
    out = {}
    for name in ROWS:
        out[name] = {"what": WHAT[name]}
        for key in runs[0][name]:
            vals = [r[name].get(key) for r in runs if r[name].get(key) is not None]
            if not vals:
                out[name][key] = None
            else:
                m = statistics.median(vals)
                out[name][key] = int(m) if all(isinstance(v, int) for v in vals) else m
        if len(runs) > 1:
            secs = [r[name]["seconds"] for r in runs]
            out[name]["seconds_min"], out[name]["seconds_max"] = min(secs), max(secs)
    return out


# ---------------------------------------------------------------------------
# Output.

def fmt(v, spec, scale=1.0):
    return "-" if v is None else format(v / scale, spec)


def print_table(doc, out=sys.stdout):
    m, o, sdi = doc["machine"], doc["options"], doc["state_dict"]
    w = out.write
    w("machine: %s, %d cores, %.1f GiB RAM, %s, %s on %s\n" % (
        m["cpu_model"], m["cores"], m["mem_total_bytes"] / 2**30, m["kernel"], m["filesystem"],
        m["disk"]))
    w("python %s, torch %s (%d threads), ckptkv %s\n" % (m["python"], m["torch"],
                                                         m["torch_threads"], m["ckptkv"]))
    w("state dict: %d tensors, %.1f MiB (hidden %d, %d layers, vocab %d; %d params); seed %d\n" % (
        sdi["tensors"], sdi["logical_bytes"] / MiB, sdi["hidden"], sdi["layers"], sdi["vocab"],
        sdi["params"], o["seed"]))
    w("10%%-changed re-save: %d of %d parameters changed, %.1f MiB (%.1f%% of the bytes)\n" % (
        sdi["changed_params"], sdi["params_tensors"], sdi["changed_bytes"] / MiB,
        100.0 * sdi["changed_bytes"] / sdi["logical_bytes"]))
    w("page cache before loads: %s; work dir %s\n" % (doc["cache_drop"], o["dir"]))
    w("%s\n\n" % ("median of %d repeats (seconds min-max in brackets); the order of the "
                  "full saves and of the loads rotates by one place per repeat" % o["repeat"]
                  if o["repeat"] > 1 else "one run"))
    head = ("%-28s %8s %15s %8s %9s %8s %11s %9s %9s %11s %8s %10s\n" % (
        "row", "seconds", "(min-max)", "MiB/s", "vs torch", "vs raw", "written MiB", "new MiB",
        "read MiB", "on disk MiB", "disk/.pt", "RSS +MiB"))
    w(head)
    for name in ROWS:
        f = doc["rows"][name]
        rng = ("%.2f-%.2f" % (f["seconds_min"], f["seconds_max"])) if "seconds_min" in f else ""
        rss = f["peak_rss_delta_bytes"]
        if rss is None and f["peak_rss_bytes"] is not None:
            rss_s = "peak %s" % fmt(f["peak_rss_bytes"], ".0f", MiB)
        else:
            rss_s = fmt(rss, ".1f", MiB)
        w("%-28s %8.3f %15s %8s %9s %8s %11s %9s %9s %11s %8s %10s\n" % (
            name, f["seconds"], rng, fmt(f["mib_s"], ".1f"), fmt(f["time_vs_torch"], ".3f"),
            fmt(f["throughput_vs_raw"], ".3f"), fmt(f["written_bytes"], ".1f", MiB),
            fmt(f["new_bytes"], ".1f", MiB), fmt(f["read_bytes"], ".1f", MiB),
            fmt(f["disk_bytes"], ".1f", MiB), fmt(f["disk_vs_pt"], ".3f"), rss_s))
    w("\nvs torch: seconds / torch_save's (saves) or torch_load's (loads), below 1 is faster;\n"
      "vs raw: MiB/s / raw_write's or raw_read's; written: /proc/self/io write_bytes, background\n"
      "writes after the row included; on disk: the file, or the whole store after the row.\n")
    r = doc["rows"]
    w("\nckptkv.save / torch.save time: %s   ckptkv.load / torch.load time: %s\n" % (
        fmt(r["ckptkv_save"]["time_vs_torch"], ".3f"), fmt(r["ckptkv_load"]["time_vs_torch"],
                                                           ".3f")))
    w("\ntargets (median of the per-repeat ratios):\n")
    for name, t in doc["targets"].items():
        w("  %-42s %8s  %-7s %s\n" % (name, fmt(t["value"], ".3f"), t["target"],
                                       {True: "met", False: "NOT met", None: "-"}[t["met"]]))
    bg = doc["rows"]["ckptkv_save_background_warm"]
    w("background save: caller blocked %s s (first save %s s), memcpy %s s\n" % (
        fmt(bg.get("blocked_seconds"), ".3f"),
        fmt(doc["rows"]["ckptkv_save_background"].get("blocked_seconds"), ".3f"),
        fmt(doc["rows"]["memcpy"]["seconds"], ".3f")))
    w("loaded values equal the saved state dict: %s\n" % ("yes" if doc["equal"] else
                                                          "NO: " + "; ".join(doc["differences"])))


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python3 -m ckptkv.bench",
        description="ckptkv.save/load vs torch.save/load on one GPT-like state dict, side by "
                    "side (raw sequential write/read as ceilings, re-saves, DeepSpeed engine).")
    p.add_argument("--size-mib", type=int, default=1024,
                   help="about how many MiB of tensors the state dict holds (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tensors' values (default 0)")
    p.add_argument("--repeat", type=int, default=1,
                   help="repeats, each on fresh files; figures are medians (default 1)")
    p.add_argument("--dir", default=None,
                   help="parent of the work directory (default: the temp dir, or the current "
                        "directory when the temp dir is tmpfs); it is removed afterwards")
    p.add_argument("--cache-drop", choices=["auto", "drop_caches", "fadvise", "none"],
                   default="auto",
                   help="how the page cache is emptied before each load: auto (drop_caches "
                        "when writable, else fadvise), drop_caches, fadvise, none (warm loads)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args(argv)
    if a.size_mib < 1 or a.repeat < 1:
        p.error("--size-mib and --repeat must be at least 1")
    return a


def main(argv=None):
    a = parse_args(argv)
    parent = os.path.abspath(a.dir) if a.dir else default_parent()
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="ckptkv-pybench-", dir=parent)
    try:
        hidden, layers, vocab, positions = gpt_shape(a.size_mib << 20)
        shapes = param_shapes(hidden, layers, vocab, positions)
        log("ckptkv.bench: ~%d MiB state dict (hidden %d, %d layers, vocab %d), work dir %s"
            % (a.size_mib, hidden, layers, vocab, root))
        t0 = time.perf_counter()
        params = Params.generate(shapes, a.seed)
        changed, changed_bytes, changed_names = params.changed(0.10)
        sd = params.state_dict(1000)
        logical = sum(nbytes(t) for t in tensors_of(sd))
        n_tensors = sum(1 for _ in tensors_of(sd))
        log("generated %d tensors, %.1f MiB in %.1f s" % (n_tensors, logical / MiB,
                                                          time.perf_counter() - t0))
        del sd
        runs, orders, methods, differences = [], [], set(), []
        for k in range(a.repeat):
            log("repeat %d of %d" % (k + 1, a.repeat))
            run_dir = os.path.join(root, "run%d" % k)
            os.makedirs(run_dir)
            b = Bench(a, params, changed, run_dir)
            runs.append(b.run(rotate=k))
            orders.append(b.order)
            methods |= b.cache_methods
            differences += b.differences
            del b
            gc.collect()
            if not a.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
        doc = {
            "bench": "ckptkv.bench",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(root),
            "options": {"size_mib": a.size_mib, "seed": a.seed, "repeat": a.repeat,
                        "dir": root, "cache_drop_option": a.cache_drop},
            "state_dict": {"hidden": hidden, "layers": layers, "vocab": vocab,
                           "positions": positions, "params": sum(
                               params.weight[n].numel() for n in params.names),
                           "params_tensors": len(params.names), "tensors": n_tensors,
                           "logical_bytes": logical, "changed_params": len(changed_names),
                           "changed_bytes": changed_bytes},
            "cache_drop": "+".join(sorted(methods)),
            "peak_rss": ("VmHWM reset through /proc/self/clear_refs at each row"
                         if reset_peak_rss() else "ru_maxrss (process peak, not reset)"),
            "rows": median_rows(runs),
            "targets": median_targets(runs),
            "runs": runs,
            "orders": orders,
            "equal": not differences,
            "differences": differences,
        }
        if a.json:
            json.dump(doc, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print_table(doc)
        return 0 if not differences else 2
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
