"""`ckptkv export`: a stored tag back out as files torch.load (Debian's torch,
also under weights_only=True for plain state), DeepSpeed and Hugging Face
read; every file re-read and checked, nothing partial left behind."""
import argparse
import collections
import dataclasses
import enum
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ckptkv

BIN = os.environ.get("CKPTKV_BIN", "")
CLI = os.path.join(BIN, "ckptkv")
needs_cli = pytest.mark.skipif(not os.path.exists(CLI), reason="needs the ckptkv program")


# Classes of the objects saved (rebuilt by torch.load from this module).
@dataclasses.dataclass
class Point:
    x: int
    y: float


class Color(enum.Enum):
    RED = 1
    GREEN = "green"


class Outer:
    class Stage(enum.IntEnum):
        ONE = 1
        TWO = 2


class Plain:
    def __init__(self, scale):
        self.cur_scale = scale
        self.history = [1, 2]


Pair = collections.namedtuple("Pair", "first second")


class Bag(dict):
    pass


class Row(list):
    pass


def same(a, b, path="/"):
    """Deep equality with types: raises AssertionError naming the path."""
    assert type(a) is type(b), "%s: %s vs %s" % (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.requires_grad == b.requires_grad, path
        assert torch.equal(a.detach(), b.detach()), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), path
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a == b, path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            same(a[k], b[k], "%s/%s" % (path, k))
        if hasattr(a, "__dict__"):
            same(dict(vars(a)), dict(vars(b)), path + "(attrs)")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, "%s/%d" % (path, i))
        if hasattr(a, "__dict__"):
            same(dict(vars(a)), dict(vars(b)), path + "(attrs)")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    elif isinstance(a, enum.Enum):
        assert a is b, path
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        same(dict(vars(a)), dict(vars(b)), path)
    else:
        assert a == b, "%s: %r vs %r" % (path, a, b)


def every_kind():
    w = torch.randn(4, 3)
    sd = collections.OrderedDict([("w", w), ("tied", w), ("b", torch.arange(5.0))])
    sd._metadata = collections.OrderedDict([("", {"version": 1})])
    return {
        "model": sd,
        "none": None, "t": True, "f": False,
        "ints": [0, 255, 256, 65535, 65536, -1, -2**31, 2**31 - 1, 2**31, 2**63 - 1, -2**63],
        "big": [2**64, -2**64, 2**100 + 7, -(2**200), 10**500],
        "floats": [0.5, -1e300, float("inf"), float("nan")],
        "complex": 1.5 - 2j,
        "str": "h\u00e9llo \u2603", "empty": "",
        "bytes": bytes(range(256)), "nob": b"",
        "nested": {"a": [(1, 2), [3, {"b": (4,)}]], 5: "five", (6, 7): [None]},
        "long_list": list(range(2500)),
        "big_tuple": tuple(range(7)),
        "bf16": torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16),
        "dtypes": [torch.zeros(2, dtype=d) for d in (torch.bool, torch.uint8, torch.int8,
                                                     torch.int16, torch.int32, torch.int64,
                                                     torch.float16, torch.float64,
                                                     torch.complex64, torch.complex128)],
        "empty_tensor": torch.zeros(0, 3),
        "scalar_tensor": torch.tensor(3.25),
        "grad": torch.ones(3, requires_grad=True),
        "param": torch.nn.Parameter(torch.full((2, 2), 0.5)),
        "frozen_param": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "set": {1, "two", (3,)},
        "frozenset": frozenset([4, 5]),
        "bytearray": bytearray(b"\x00\x01\xfe"),
        "slice": slice(1, 10, 2),
        "range": range(0, 9, 3),
        "ns": argparse.Namespace(lr=0.1, name="adam", betas=(0.9, 0.99)),
        "enum": [Color.RED, Color.GREEN, Outer.Stage.TWO],
        "point": Point(3, 0.25),
        "plain": Plain(2.0**16),
        "pair": Pair(1, "x"),
        "bag": Bag(a=1, b=[2]),
        "row": Row([1, 2, 3]),
        "np_array": np.arange(6, dtype="<f4").reshape(2, 3),
        "np_big": np.arange(40000, dtype=np.int64),
        "np_bool": np.array([True, False]),
        "np_str": np.array(["ab", "c"]),
        "np_scalar": np.float32(1.5),
        "np_int": np.int64(-7),
        "np_dtype": np.dtype("<i2"),
    }


def plain_state():
    # What torch 1.13's weights_only unpickler takes: no floats, bytes or
    # objects beyond OrderedDict, torch.Size, Parameter and some dtypes.
    w = torch.randn(3, 3)
    sd = collections.OrderedDict([("w", w), ("tied", w), ("bf16", torch.ones(4, dtype=torch.bfloat16)),
                                  ("p", torch.nn.Parameter(torch.zeros(2)))])
    sd._metadata = collections.OrderedDict([("", {"version": 1})])
    return {"model": sd, "step": 10, "neg": -5, "big": 2**40, "names": ["a", "b"],
            "tuple": (1, (2, 3)), "flag": True, "none": None, "size": torch.Size([3, 3]),
            "dtype": torch.float16, "list": [torch.arange(3)], "empty": {}}


def test_pt_round_trip_every_kind(tmp_path):
    obj = every_kind()
    ckptkv.save(obj, tmp_path / "db", "t1", "state.pt")
    r = ckptkv.export(tmp_path / "db", "t1", tmp_path / "out")
    assert r["format"] == "pt" and r["verified"] is True
    assert [f["path"] for f in r["files"]] == ["state.pt"]
    got = torch.load(tmp_path / "out" / "state.pt")
    same(obj, got)
    # Tied tensors are one tensor, one storage.
    assert got["model"]["w"] is got["model"]["tied"]
    assert got["model"]._metadata == {"": {"version": 1}}
    assert sorted(os.listdir(tmp_path / "out")) == ["state.pt"]  # no temporary file left


def test_weights_only_loads_plain_state(tmp_path):
    obj = plain_state()
    ckptkv.save(obj, tmp_path / "db", "t", "model.pt")
    ckptkv.export(tmp_path / "db", "t", tmp_path / "out")
    got = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    same(obj, got)
    assert got["model"]["w"] is got["model"]["tied"]
    # The same file under the full unpickler.
    same(obj, torch.load(tmp_path / "out" / "model.pt"))


def test_files_of_a_tag_and_nested_paths(tmp_path):
    with ckptkv.Store(tmp_path / "db") as s:
        with s.begin("t") as w:
            w.save({"a": torch.ones(2)}, "a.pt")
            w.save({"b": torch.zeros(3)}, "sub/dir/b.pt")
        r = ckptkv.export(s, "t", tmp_path / "out")
    assert sorted(f["path"] for f in r["files"]) == ["a.pt", "sub/dir/b.pt"]
    assert torch.equal(torch.load(tmp_path / "out" / "sub" / "dir" / "b.pt")["b"], torch.zeros(3))


def test_import_then_export_gives_the_saved_objects(tmp_path):
    w = torch.randn(5, 4)
    obj = {"model": collections.OrderedDict([("w", w), ("view", w[1:3]), ("h", w.half())]),
           "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5, 4)}},
                   "param_groups": [{"lr": 0.01, "params": [0]}]},
           "args": argparse.Namespace(seed=1), "size": torch.Size([5, 4]), "set": {1, 2},
           "big": 2**90, "bytes": b"\x00\xff", "bf16": torch.ones(3, dtype=torch.bfloat16)}
    src = tmp_path / "orig.pt"
    torch.save(obj, src)
    ckptkv.import_path(tmp_path / "db", src, "imp")
    ckptkv.export(tmp_path / "db", "imp", tmp_path / "out")
    got = torch.load(tmp_path / "out" / "orig.pt")
    same(obj, got)


def test_deepspeed_format_writes_latest_and_files(tmp_path):
    with ckptkv.Store(tmp_path / "db") as s:
        with s.begin("global_step5") as w:
            w.save({"module": {"w": torch.ones(2, 2)}, "global_steps": 5},
                   "mp_rank_00_model_states.pt")
            w.save({"optimizer_state_dict": {"x": torch.arange(4)}},
                   "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    r = ckptkv.export(tmp_path / "db", "global_step5", tmp_path / "ds", format="deepspeed")
    assert (tmp_path / "ds" / "latest").read_text() == "global_step5"
    assert sorted(f["path"] for f in r["files"]) == [
        "global_step5/mp_rank_00_model_states.pt",
        "global_step5/zero_pp_rank_0_mp_rank_00_optim_states.pt", "latest"]
    m = torch.load(tmp_path / "ds" / "global_step5" / "mp_rank_00_model_states.pt")
    assert m["global_steps"] == 5 and torch.equal(m["module"]["w"], torch.ones(2, 2))
    o = torch.load(tmp_path / "ds" / "global_step5" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert torch.equal(o["optimizer_state_dict"]["x"], torch.arange(4))


def test_existing_files_refused_unless_overwrite(tmp_path):
    ckptkv.save({"a": torch.ones(2)}, tmp_path / "db", "t", "state.pt")
    ckptkv.export(tmp_path / "db", "t", tmp_path / "out")
    before = (tmp_path / "out" / "state.pt").read_bytes()
    ckptkv.save({"a": torch.zeros(2)}, tmp_path / "db", "t", "state.pt", overwrite=True)
    with pytest.raises(ckptkv.AlreadyExistsError, match="overwrite"):
        ckptkv.export(tmp_path / "db", "t", tmp_path / "out")
    assert (tmp_path / "out" / "state.pt").read_bytes() == before
    r = ckptkv.export(tmp_path / "db", "t", tmp_path / "out", overwrite=True)
    assert r["replaced"] == ["state.pt"]
    assert torch.equal(torch.load(tmp_path / "out" / "state.pt")["a"], torch.zeros(2))
    assert sorted(os.listdir(tmp_path / "out")) == ["state.pt"]


def test_failed_export_leaves_no_file_and_follows_no_symlink(tmp_path):
    with ckptkv.Store(tmp_path / "db") as s:
        with s.begin("t") as w:
            w.save({"a": torch.ones(1000)}, "a.pt")
            w.save({"b": torch.ones(2)}, "sub/b.pt")
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "sub")
    with pytest.raises(ckptkv.InvalidArgumentError, match="symlink"):
        ckptkv.export(tmp_path / "db", "t", out, overwrite=True)
    assert sorted(os.listdir(out)) == ["sub"]  # a.pt was written, checked, then removed
    assert os.listdir(elsewhere) == []


def test_unknown_tag_and_format(tmp_path):
    ckptkv.save({"a": 1}, tmp_path / "db", "t")
    with pytest.raises(ckptkv.NotFoundError):
        ckptkv.export(tmp_path / "db", "nope", tmp_path / "out")
    with pytest.raises(ckptkv.InvalidArgumentError, match="pt, deepspeed"):
        ckptkv.export(tmp_path / "db", "t", tmp_path / "out", format="zip")


def test_safetensors_format_is_kv_browsers_export(tmp_path):
    ckptkv.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)},
                tmp_path / "db", "t", "model.pt")
    r = ckptkv.export(tmp_path / "db", "t", tmp_path / "st", format="safetensors")
    assert r["verified"] is True and r["tensors"] == 2
    assert (tmp_path / "st" / "model.safetensors").exists()


@needs_cli
def test_cli_export_json(tmp_path):
    ckptkv.save({"w": torch.ones(3, 3), "step": 7}, tmp_path / "db", "t", "state.pt")
    cmd = [CLI, "export", "--db", str(tmp_path / "db"), "t", "--format", "deepspeed",
           "--out", str(tmp_path / "out"), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    j = json.loads(p.stdout)
    assert j["tag"] == "t" and j["format"] == "deepspeed" and j["verified"] is True
    assert [f["path"] for f in j["files"]] == ["t/state.pt", "latest"]
    assert j["tensors"] == 1 and j["tensor_bytes"] == 36
    assert torch.load(tmp_path / "out" / "t" / "state.pt")["step"] == 7
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 1 and "--overwrite" in p.stderr
    p = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True)
    assert p.returncode == 0 and json.loads(p.stdout)["replaced"] == ["t/state.pt", "latest"]
    # "latest" names the store's latest tag.
    p = subprocess.run([CLI, "export", "--db", str(tmp_path / "db"), "latest", "--out",
                        str(tmp_path / "pt"), "--json"], capture_output=True, text=True)
    assert p.returncode == 0 and json.loads(p.stdout)["tag"] == "t"
    assert (tmp_path / "pt" / "state.pt").exists()


@needs_cli
def test_universal_export_of_a_synthetic_deepspeed_tag(tmp_path):
    db = str(tmp_path / "db")
    synth = [CLI, "synth", "--db", db, "--tag", "src", "--tp", "2", "--pp", "1", "--dp", "2",
             "--zero-stage", "1"]
    p = subprocess.run(synth, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    # The store's own universal tag: the merged tensors to compare with.
    p = subprocess.run([CLI, "export-universal", "--db", db, "--tag", "src", "--out-tag", "ref"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with ckptkv.Store(db) as s:
        tags_before = [t["tag"] for t in s.tags()]
        ref_files = s.files("ref")
    out = tmp_path / "uni"
    r = ckptkv.export(db, "src", out, format="universal")
    assert r["converted"] is True
    assert (out / "latest_universal").read_text() == "src"
    with ckptkv.Store(db) as s:
        assert [t["tag"] for t in s.tags()] == tags_before  # no temporary tag left
        fp32 = [f for f in ref_files if f.endswith("/fp32.pt")]
        assert fp32 and "zero/optimizer_state.pt" in ref_files
        for f in ref_files:
            same(s.load("ref", f), torch.load(out / "src" / f))
    # A tag that already is universal is exported as it is.
    r = ckptkv.export(db, "ref", tmp_path / "uni2", format="universal")
    assert r["converted"] is False
    assert sorted(f["path"] for f in r["files"]) == sorted(
        ["ref/" + f for f in ref_files] + ["latest_universal"])


@needs_cli
def test_deepspeed_export_of_a_synthetic_tag(tmp_path):
    # DeepSpeed's files hold floats (lr, loss scale), which torch 1.13's
    # weights_only unpickler has no opcode for (newer torch's has): they
    # load with the full unpickler, and name only globals both allow.
    import pickletools
    import zipfile
    db = str(tmp_path / "db")
    p = subprocess.run([CLI, "synth", "--db", db, "--tag", "global_step3", "--tp", "2", "--pp",
                        "2", "--dp", "2", "--zero-stage", "2"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "save_dir"
    r = ckptkv.export(db, "global_step3", out, format="deepspeed")
    assert (out / "latest").read_text() == "global_step3"
    with ckptkv.Store(db, read_only=True) as s:
        files = s.files("global_step3")
        assert sorted(f["path"] for f in r["files"]) == sorted(
            ["global_step3/" + f for f in files] + ["latest"])
        for f in files:
            same(s.load("global_step3", f), torch.load(out / "global_step3" / f))
            with zipfile.ZipFile(out / "global_step3" / f) as z:
                assert z.testzip() is None  # every CRC-32 right
                names = {arg for op, arg, _ in pickletools.genops(z.read("archive/data.pkl"))
                         if op.name == "GLOBAL"}
            assert names <= {"collections OrderedDict", "torch._utils _rebuild_tensor_v2",
                             "torch FloatStorage", "torch BFloat16Storage", "torch LongStorage"}, names


@needs_cli
def test_interrupted_cli_export_leaves_no_file(tmp_path):
    import signal
    import time
    sd = {"t%d" % i: torch.randn(1024, 1024) for i in range(96)}  # 384 MiB
    ckptkv.save(sd, tmp_path / "db", "t", "state.pt")
    out = tmp_path / "out"
    proc = subprocess.Popen([CLI, "export", "--db", str(tmp_path / "db"), "t", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (
            out.exists() and any(n.endswith(".partial") for n in os.listdir(out))):
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the export finished before it was interrupted")
    assert proc.returncode == 1 and "interrupted" in err
    assert os.listdir(out) == []


def test_a_killed_exports_temporary_files_are_removed_by_the_next(tmp_path):
    """SIGKILL leaves `.ckptkv-export-<pid>-...partial` files; the next
    export into those directories removes the ones whose process is gone
    and keeps a live process's."""
    ckptkv.save({"w": torch.ones(4)}, tmp_path / "db", "t", "sub/state.pt")
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    stale = [out / (".ckptkv-export-%d-0-state.pt.partial" % dead.pid),
             out / "sub" / (".ckptkv-export-%d-3-state.pt.partial" % dead.pid)]
    live = out / "sub" / (".ckptkv-export-%d-0-state.pt.partial" % os.getppid())
    other = out / ".ckptkv-export-notapid.partial"
    for p in stale + [live, other]:
        p.write_bytes(b"partial")
    ckptkv.export(tmp_path / "db", "t", out)
    assert torch.equal(torch.load(out / "sub" / "state.pt")["w"], torch.ones(4))
    assert not any(p.exists() for p in stale)
    assert live.exists() and other.exists()


def test_deepspeed_classes_imported_then_exported(tmp_path, fake_deepspeed):
    ds = fake_deepspeed
    scaler = ds.DynamicLossScaler(2.0**16)
    obj = {"zero_stage": ds.ZeroStageEnum.optimizer_states,
           "loss_scaler": scaler,
           "param_slice_mappings": [collections.OrderedDict(
               [("w", ds.fragment_address(numel=12, start=0))])],
           "module": collections.OrderedDict([("w", torch.ones(3, 4, dtype=torch.bfloat16))])}
    src = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(obj, src)
    ckptkv.import_path(tmp_path / "db", src, "imp")
    ckptkv.export(tmp_path / "db", "imp", tmp_path / "out")
    got = torch.load(tmp_path / "out" / "mp_rank_00_model_states.pt")
    same(obj, got)
    assert got["zero_stage"] is ds.ZeroStageEnum.optimizer_states
