"""`ckptkv import`: torch.save files written here by Debian's torch come into
a store with exactly their values and types, without running pickle;
hostile files are refused naming what they hold, and nothing runs."""
import argparse
import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

import ckptkv

BIN = os.environ.get("CKPTKV_BIN", "")
CLI = os.path.join(BIN, "ckptkv")
pytestmark = pytest.mark.skipif(not os.path.exists(CLI), reason="needs the ckptkv program")

def run_import(*args):
    return subprocess.run([CLI, "import", *map(str, args)], capture_output=True, text=True)


def import_json(*args):
    r = run_import(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_same(a, b, path="/"):
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
        assert a.tobytes() == b.tobytes() and b.flags.writeable, path
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (path, a, b)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
        assert a.requires_grad == b.requires_grad, path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], "%s%s/" % (path, k))
        assert vars(a) == vars(b) if hasattr(a, "__dict__") else True
    elif isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, "%s%d/" % (path, i))
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert_same(vars(a), vars(b), path)
    else:
        assert a == b, path


def test_every_object_kind_imports_as_itself(tmp_path, fake_deepspeed):
    ds = fake_deepspeed
    base = torch.arange(24, dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    sd = {
        "module": model.state_dict(), "view": base[2:5], "transposed": base.view(4, 6).t(),
        "bf16": torch.randn(3, 5).to(torch.bfloat16), "half": torch.ones(2, dtype=torch.float16),
        "long": torch.arange(4), "bool": torch.tensor([True, False]), "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5), "grad": torch.ones(2, requires_grad=True),
        "p": torch.nn.Parameter(torch.zeros(2)), "size": torch.Size([3, 4]), "dt": torch.bfloat16,
        "set": {1, 2}, "frozenset": frozenset(["a"]), "bytes": b"\x00\xff\x80", "bytearray": bytearray(b"z"),
        "big": 2 ** 80, "neg": -2 ** 70, "float": 0.1, "ns": argparse.Namespace(lr=0.1, name="gpt"),
        "dev": torch.device("cpu"), "int_keys": {0: "a", 3: "b"}, "tuple": (1, "x", None, True),
        "zero_stage": ds.ZeroStageEnum.gradients,
        "scaler": ds.DynamicLossScaler(65536.0),
        "mappings": [collections.OrderedDict(w=ds.fragment_address(numel=12, start=0))],
        "s": "h\u00e9llo",
    }
    sd["tied"] = sd["view"]
    pt = tmp_path / "sd.pt"
    torch.save(sd, pt)
    store = tmp_path / "store"
    r = import_json("--db", store, pt)
    assert r["tag"] == "sd" and r["files"] == 1
    got = ckptkv.load(store, "sd", "sd.pt")
    assert_same(torch.load(pt), got)
    assert got["tied"] is got["view"]
    assert got["module"]._metadata == model.state_dict()._metadata
    with ckptkv.Store(store, read_only=True) as s:
        assert s.verify()["ok"]
    # Import -> load -> torch.save -> torch.load gives equal objects again.
    again = tmp_path / "again.pt"
    torch.save(got, again)
    assert_same(torch.load(again), got)
    # An unchanged file imported again writes nothing new; from Python too.
    assert import_json("--db", store, pt, "--tag", "sd2")["new_bytes"] == 0
    r = ckptkv.import_path(store, pt, "sd3")
    assert r == {"tag": "sd3", "files": 1, "tensors": r["tensors"], "logical_bytes": r["logical_bytes"],
                 "new_bytes": 0}
    assert_same(got, ckptkv.load(store, "sd3", "sd.pt"))


def test_pickle_protocol_4_and_the_getattr_enum_form(tmp_path, fake_deepspeed):
    ds = fake_deepspeed
    sd = {"w": torch.randn(3), "zero_stage": ds.ZeroStageEnum.weights}
    pt = tmp_path / "p4.pt"
    torch.save(sd, pt, pickle_protocol=4)
    import_json("--db", tmp_path / "store", pt)
    got = ckptkv.load(tmp_path / "store", "p4", "p4.pt")
    assert got["zero_stage"] is ds.ZeroStageEnum.weights and torch.equal(got["w"], sd["w"])


def deepspeed_dir(root, ds, tp=2):
    """A ZeRO-1 DeepSpeed tag directory at tp x dp=1, and the global tensors."""
    torch.manual_seed(0)
    glob = {"word_embeddings.weight": torch.randn(8 * tp, 4), "mlp.dense_4h_to_h.weight": torch.randn(6, 4 * tp)}
    tag = root / "global_step7"
    tag.mkdir(parents=True)
    for r in range(tp):
        module = collections.OrderedDict(
            [("word_embeddings.weight", glob["word_embeddings.weight"].chunk(tp, 0)[r].clone()),
             ("mlp.dense_4h_to_h.weight", glob["mlp.dense_4h_to_h.weight"].chunk(tp, 1)[r].clone())])
        shapes = collections.OrderedDict((k, v.shape) for k, v in module.items())
        torch.save({"module": module, "buffer_names": [], "optimizer": None, "param_shapes": [shapes],
                    "sparse_tensor_module_names": set(), "dp_world_size": 1, "mp_world_size": tp,
                    "global_steps": 7, "ds_version": "0.16.5", "ds_config": {}},
                   tag / ("mp_rank_%02d_model_states.pt" % r))
        flat = torch.cat([v.reshape(-1).float() for v in module.values()])
        torch.save({"optimizer_state_dict": {
            "zero_stage": ds.ZeroStageEnum.optimizer_states, "loss_scaler": ds.LossScaler(1.0),
            "dynamic_loss_scale": False, "overflow": False, "partition_count": [1], "group_paddings": [0],
            "single_partition_of_fp32_groups": [flat],
            "base_optimizer_state": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": flat * 0.5,
                                                   "exp_avg_sq": flat * 0.25}},
                                     "param_groups": [{"lr": 0.1, "params": [0]}]},
            "param_slice_mappings": [collections.OrderedDict(
                (k, ds.fragment_address(numel=v.numel(), start=s)) for (k, v), s in
                zip(module.items(), [0, module["word_embeddings.weight"].numel()]))]},
            "ds_config": {}, "ds_version": "0.16.5"},
            tag / ("zero_pp_rank_0_mp_rank_%02d_optim_states.pt" % r))
    (root / "latest").write_text("global_step7")
    return glob


def test_a_deepspeed_directory_imports_with_placements_and_reshapes(tmp_path, fake_deepspeed):
    save_dir = tmp_path / "ckpt"
    glob = deepspeed_dir(save_dir, fake_deepspeed)
    store = tmp_path / "store"
    r = import_json("--db", store, save_dir)
    assert r["tag"] == "global_step7" and r["files"] == 4
    with ckptkv.Store(store, read_only=True) as s:
        for f in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"):
            placed = [s._s.tensor_info("global_step7", f, p)["placed"] for p in s._s.params("global_step7", f)]
            assert any(placed), f
    # The store's reshape plans from those placements: tp 2 -> 1 gives the global tensors.
    out = subprocess.run([CLI, "reshape", "--db", str(store), "--tag", "global_step7", "--tp", "1",
                          "--pp", "1", "--dp", "1", "--out-tag", "tp1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    merged = ckptkv.load(store, "tp1", "mp_rank_00_model_states.pt")["module"]
    for k, v in glob.items():
        assert torch.equal(merged[k], v), k
    # Importing the unchanged directory again writes (almost) nothing.
    assert import_json("--db", store, save_dir, "--tag", "again")["new_bytes"] == 0


class Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def laughs():
    """Lists of 10 references to the list below, 9 deep: a pickle of a few
    hundred bytes that names 10^9 values (memo abuse)."""
    a = ["x" * 100] * 10
    for _ in range(8):
        a = [a] * 10
    return a


def test_hostile_files_are_refused_and_run_nothing(tmp_path):
    sentinel = tmp_path / "pwned"
    store = tmp_path / "store"
    storage = torch.arange(10, dtype=torch.float32)
    cases = {
        "system": ({"x": Evil(os.system, "touch %s" % sentinel)}, "system is not allowed"),
        "eval": ({"x": Evil(eval, "open(%r, 'w')" % str(sentinel))}, "builtins.eval is not allowed"),
        "popen": ({"x": Evil(subprocess.Popen, ["touch", str(sentinel)])}, "subprocess.Popen is not allowed"),
        "range": ({"x": Evil(torch._utils._rebuild_tensor_v2, storage.storage(), 10 ** 6, (10,), (1,),
                             False, collections.OrderedDict())}, "a view reaching element"),
        "expand": ({"x": Evil(torch._utils._rebuild_tensor_v2, storage.storage(), 0, (10 ** 12,), (0,),
                              False, collections.OrderedDict())}, "an expanded view"),
        "import": ({"x": Evil(__import__, "os")}, "builtins.__import__ is not allowed"),
        "getattr": ({"x": Evil(getattr, Evil, "__init__")}, "builtins.getattr is not allowed"),
        "laughs": ({"x": laughs()}, "values shared through the memo expand"),
    }
    for name, (obj, what) in cases.items():
        pt = tmp_path / ("%s.pt" % name)
        torch.save(obj, pt)
        r = run_import("--db", store, pt)
        assert r.returncode != 0 and what in r.stderr, (name, r.stderr)
        assert "pickle at byte " in r.stderr, r.stderr
    assert not sentinel.exists()
    with ckptkv.Store(store, read_only=True) as s:
        assert s.tags() == []  # nothing of a refused import is visible


def test_other_formats_say_what_they_are(tmp_path):
    store = tmp_path / "store"
    # torch < 0.4's tar format: its members as torch wrote them.
    tar = tmp_path / "old.pt"
    with tarfile.open(tar, "w") as t:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            data = pickle.dumps({}, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    r = run_import("--db", store, tar)
    assert r.returncode == 1 and "pre-0.4 torch.save format" in r.stderr, r.stderr
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    r = run_import("--db", store, script)
    assert r.returncode == 1 and "TorchScript" in r.stderr, r.stderr
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good)
    data = good.read_bytes()
    for n, cut in enumerate((len(data) // 2, len(data) - 30, 100)):
        p = tmp_path / ("cut%d.pt" % n)
        p.write_bytes(data[:cut])
        r = run_import("--db", store, p)
        assert r.returncode != 0 and r.stderr, (cut, r.stderr)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    r = run_import("--db", store, text)
    assert r.returncode == 1 and "not a torch.save file" in r.stderr, r.stderr
    with ckptkv.Store(store, read_only=True) as s:
        assert s.tags() == []


def test_a_chain_of_parameter_rebuilds_is_refused_not_recursed(tmp_path):
    # _rebuild_parameter(_rebuild_parameter(...)) 100000 deep: an error, not
    # the stack overflow it was (the interpreter recursed into each).
    import zipfile
    inner = b"ctorch._utils\n_rebuild_parameter\n"
    body = b"\x80\x02" + inner * 100000 + b"N" + (b"\x88}\x87R") * 100000 + b"."
    path = tmp_path / "chain.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("chain/data.pkl", body)
        z.writestr("chain/version", "3\n")
    r = run_import("--db", tmp_path / "store", path)
    assert r.returncode != 0 and "parameter rebuild without" in r.stderr, r.stderr


def test_all_tags_of_a_save_dir_import_in_order_with_latest_last(tmp_path):
    save = tmp_path / "ckpts"
    steps = {"global_step2": 2, "global_step10": 10, "global_step9": 9}
    for tag, step in steps.items():
        (save / tag).mkdir(parents=True)
        frozen = torch.arange(70000, dtype=torch.float32)  # the same in every tag
        torch.save({"module": {"w": torch.full((300,), float(step)), "frozen": frozen},
                    "global_steps": step}, save / tag / "mp_rank_00_model_states.pt")
    (save / "latest").write_text("global_step9\n")
    (save / "zero_to_fp32.py").write_text("# a script DeepSpeed copies here\n")
    store = tmp_path / "store"
    out = import_json("--db", store, save, "--all-tags")
    assert [t["tag"] for t in out["tags"]] == ["global_step2", "global_step10", "global_step9"]
    assert out["tags"][0]["new_bytes"] >= 70000 * 4
    assert out["tags"][1]["new_bytes"] < 70000 * 4  # the frozen tensor dedups across tags
    with ckptkv.Store(store, read_only=True) as s:
        assert s.latest() == "global_step9"
        for tag, step in steps.items():
            sd = s.load(tag, "mp_rank_00_model_states.pt")
            assert sd["global_steps"] == step
            assert torch.equal(sd["module"]["w"], torch.full((300,), float(step)))
    # Again: every tag exists; with --overwrite nothing new is written.
    again = run_import("--db", store, save, "--all-tags")
    assert again.returncode != 0 and "global_step2" in again.stderr, again.stderr
    out = import_json("--db", store, save, "--all-tags", "--overwrite")
    assert [t["new_bytes"] for t in out["tags"]] == [0, 0, 0]
    bad = run_import("--db", store, save, "--all-tags", "--tag", "x")
    assert bad.returncode != 0 and "drop --tag" in bad.stderr
    # From Python, the same.
    got = ckptkv.import_path(tmp_path / "py-store", save, all_tags=True)
    assert [t["tag"] for t in got] == ["global_step2", "global_step10", "global_step9"]
    with ckptkv.Store(tmp_path / "py-store", read_only=True) as s:
        assert s.latest() == "global_step9"
    with pytest.raises(ckptkv.InvalidArgumentError, match="drop tag"):
        ckptkv.import_path(tmp_path / "py-store", save, "x", all_tags=True)
    (save / "latest").write_text("global_step11\n")
    bad = run_import("--db", tmp_path / "s2", save, "--all-tags")
    assert bad.returncode != 0 and "global_step11" in bad.stderr, bad.stderr
    with pytest.raises(ckptkv.InvalidArgumentError, match="global_step11"):
        ckptkv.import_path(tmp_path / "s3", save, all_tags=True)


def rich_state(ds=None):
    """Tensors of many dtypes, views sharing one storage, a state dict with
    _metadata, nested containers, and numpy values as state dicts hold them."""
    torch.manual_seed(1)
    base = torch.arange(24, dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    rs = np.random.RandomState(5)
    sd = {
        "module": model.state_dict(), "view": base[2:5], "transposed": base.view(4, 6).t(),
        "whole": base.view(2, 12), "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "half": torch.ones(2, dtype=torch.float16), "double": torch.randn(3, dtype=torch.float64),
        "int8": torch.tensor([-3, 4], dtype=torch.int8), "uint8": torch.tensor([250, 1], dtype=torch.uint8),
        "int16": torch.tensor([-300], dtype=torch.int16), "int32": torch.tensor([1 << 30], dtype=torch.int32),
        "long": torch.arange(4), "bool": torch.tensor([True, False]), "complex": torch.randn(2, dtype=torch.complex64),
        "empty": torch.empty(0, 3), "scalar": torch.tensor(2.5), "grad": torch.ones(2, requires_grad=True),
        "p": torch.nn.Parameter(torch.zeros(2)), "size": torch.Size([3, 4]), "dt": torch.bfloat16,
        "nested": {"a": [1, (2.5, None, {"b": [torch.ones(1)]})], "s": {"x"}, "f": frozenset([3])},
        "ns": argparse.Namespace(lr=0.1), "big": 2 ** 80, "bytes": b"\x00\xff",
        "np": {
            "f64": np.float64(2.5), "f32": np.float32(-1.25), "i64": np.int64(-7), "i32": np.int32(3),
            "u8": np.uint8(200), "bool": np.bool_(True), "c128": np.complex128(1 - 2j),
            "str": np.str_("h\u00e9"), "bytes": np.bytes_(b"ab"), "date": np.datetime64("2024-01-02T03:04"),
            "arr": np.arange(6, dtype=np.int16).reshape(2, 3), "big_arr": rs.standard_normal(20000),
            "fortran": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
            "zero_d": np.array(4.5), "empty": np.zeros((0, 2), dtype=np.int8),
            "be": np.arange(3, dtype=">i4"), "strs": np.array(["ab", "c"]), "bs": np.array([b"x", b"yz"]),
            "bools": np.array([True, False]), "dates": np.array(["2020-01-01", "2021-06-01"], dtype="M8[D]"),
            "deltas": np.array([1, 2], dtype="m8[10s]"), "half_arr": np.ones(3, dtype=np.float16),
            "dtypes": [np.dtype("f4"), np.dtype(">u2"), np.dtype("<M8[10s]"), np.dtype("U3"), np.dtype("b1")],
            "rng": np.random.get_state(), "rs_rng": rs.get_state(),
        },
    }
    sd["tied"] = sd["view"]
    if ds is not None:
        sd["zero_stage"] = ds.ZeroStageEnum.gradients
        sd["mappings"] = [collections.OrderedDict(w=ds.fragment_address(numel=12, start=0))]
    return sd


@pytest.mark.parametrize("proto", [2, 4, 5])
@pytest.mark.parametrize("legacy", [True, False])
def test_legacy_files_and_numpy_values_import_as_themselves(tmp_path, fake_deepspeed, legacy, proto):
    sd = rich_state(fake_deepspeed)
    pt = tmp_path / "sd.pt"
    torch.save(sd, pt, _use_new_zipfile_serialization=not legacy, pickle_protocol=proto)
    store = tmp_path / "store"
    r = import_json("--db", store, pt)
    assert r["tag"] == "sd" and r["files"] == 1
    got = ckptkv.load(store, "sd", "sd.pt")
    want = torch.load(pt)
    assert_same(want, got)
    assert got["tied"] is got["view"]
    assert got["module"]._metadata == sd["module"]._metadata
    assert got["np"]["dtypes"] == sd["np"]["dtypes"]
    with ckptkv.Store(store, read_only=True) as s:
        assert s.verify()["ok"]
    # The legacy file of the same values is the same import (tensor bytes dedup).
    if legacy:
        zpt = tmp_path / "zip.pt"
        torch.save(sd, zpt, pickle_protocol=proto)
        assert import_json("--db", store, zpt)["new_bytes"] == 0
        assert_same(ckptkv.load(store, "zip", "zip.pt"), got)


def test_numpy_2_module_names_import_too(tmp_path):
    # numpy 2 pickles numpy._core.multiarray; Debian's numpy writes numpy.core.
    sd = {"a": np.arange(5, dtype=np.int32), "s": np.float64(0.5), "rng": np.random.get_state()}
    for legacy in (True, False):
        pt = tmp_path / ("new%d.pt" % legacy)
        torch.save(sd, pt, _use_new_zipfile_serialization=not legacy)
        data = pt.read_bytes()
        if legacy:  # protocol 2 writes GLOBALs as lines: the name can grow in place
            renamed = data.replace(b"numpy.core.multiarray", b"numpy._core.multiarray")
        else:  # same length inside the zip (the CRC is the zip's business): a test-only rename
            import zipfile
            renamed_path = tmp_path / "renamed.pt"
            with zipfile.ZipFile(pt) as z, zipfile.ZipFile(renamed_path, "w") as out:
                for info in z.infolist():
                    body = z.read(info)
                    if info.filename.endswith("data.pkl"):
                        body = body.replace(b"numpy.core.multiarray", b"numpy._core.multiarray")
                    out.writestr(info, body)
            renamed = renamed_path.read_bytes()
        assert b"numpy._core.multiarray" in renamed
        pt.write_bytes(renamed)
        store = tmp_path / "store"
        import_json("--db", store, pt)
        assert_same(sd, ckptkv.load(store, pt.stem, pt.name))


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
def test_numpy_objects_that_are_not_plain_data_are_refused(tmp_path):
    store = tmp_path / "store"
    cases = {
        "object": (np.array([1, "a"], dtype=object), "object dtype"),
        "structured": (np.zeros(2, dtype=[("a", "i4"), ("b", "f8")]), "structured dtype"),
        "subarray": (np.dtype(("i4", (2,))), "subarray dtype"),
        "matrix": (np.matrix([[1, 2]]), "numpy.matrix (an ndarray subclass)"),
        "metadata": (np.dtype(float, metadata={"a": 1}), "metadata"),
        "empty_str": (np.str_(""), "itemsize 0"),
    }
    for legacy in (True, False):
        for name, (obj, what) in cases.items():
            pt = tmp_path / ("%s.pt" % name)
            torch.save({"x": obj, "w": torch.ones(3)}, pt, _use_new_zipfile_serialization=not legacy)
            r = run_import("--db", store, pt)
            assert r.returncode != 0 and what in r.stderr, (name, r.stderr)
            assert "pickle at byte " in r.stderr and str(pt) in r.stderr, r.stderr
            assert "numpy" in r.stderr, r.stderr
    with ckptkv.Store(store, read_only=True) as s:
        assert s.tags() == []


def legacy_file(path, obj, ids, keys, records):
    """A legacy torch.save file written by hand: the pickle of `obj` whose
    Storage placeholders persist as the ids in `ids`, the storage list
    `keys`, then `records` [(count, bytes)] as they are."""
    class Storage:
        def __init__(self, i):
            self.i = i

    class P(pickle.Pickler):
        def persistent_id(self, o):
            return ids[o.i] if isinstance(o, Storage) else None

    f = io.BytesIO()
    pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
    p = P(f, protocol=2)
    p.dump(obj(Storage))
    pickle.dump(keys, f, protocol=2)
    for count, data in records:
        f.write(struct.pack("<q", count) + data)
    path.write_bytes(f.getvalue())


def test_hostile_legacy_files_are_clear_errors_and_commit_nothing(tmp_path):
    store = tmp_path / "store"
    floats = struct.pack("<4f", 1, 2, 3, 4)
    fs = torch.FloatStorage

    class Rebuild:  # pickles as _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())
        def __init__(self, s, offset=0, size=(4,), stride=(1,)):
            self.args = (s, offset, size, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, self.args)

    def obj(**kw):
        return lambda Storage: {"w": Rebuild(Storage(0), **kw)}

    sid = ("storage", fs, "k", "cpu", 4, None)
    good = tmp_path / "good.pt"
    legacy_file(good, obj(), [sid], ["k"], [(4, floats)])
    import_json("--db", store, good, "--tag", "good")
    assert torch.equal(ckptkv.load(store, "good", "good.pt")["w"], torch.tensor([1.0, 2, 3, 4]))
    cases = {
        "truncated": (obj(), [sid], ["k"], [(4, floats[:10])], "runs past the end"),
        "beyond": (obj(), [("storage", fs, "k", "cpu", 10 ** 9, None)], ["k"], [(10 ** 9, floats)],
                   "runs past the end"),
        "huge": (obj(), [("storage", fs, "k", "cpu", 2 ** 62, None)], ["k"], [(2 ** 62, floats)],
                 "runs past the end"),
        "count": (obj(), [sid], ["k"], [(3, floats)], "holds 3 elements; its id"),
        "unknown_key": (obj(), [sid], ["k", "ghost"], [(4, floats), (4, floats)],
                        "no storage id of the pickle names"),
        "unlisted": (obj(), [sid], [], [], "not in the storage list"),
        "view_outside": (obj(), [("storage", fs, "k", "cpu", 4, ("v", 2, 3))], ["k"], [(4, floats)],
                         "a view [2, +3) of storage k"),
        "offset_outside": (obj(offset=3), [sid], ["k"], [(4, floats)], "a view reaching element"),
        "huge_numel": (obj(size=(2 ** 40,), stride=(0,)), [sid], ["k"], [(4, floats)], "an expanded view"),
        "laughs": (lambda Storage: {"w": Rebuild(Storage(0)), "l": laughs()}, [sid], ["k"], [(4, floats)],
                   "values shared through the memo expand"),
    }
    for name, (o, ids, keys, records, what) in cases.items():
        pt = tmp_path / ("%s.pt" % name)
        legacy_file(pt, o, ids, keys, records)
        r = run_import("--db", store, pt)
        assert r.returncode != 0 and what in r.stderr, (name, r.stderr)
        assert "at byte " in r.stderr and str(pt) in r.stderr, (name, r.stderr)
    # A legacy view inside its root reads the view's elements.
    pt = tmp_path / "view.pt"
    legacy_file(pt, obj(size=(2,)), [("storage", fs, "k", "cpu", 4, ("v", 1, 3))], ["k"], [(4, floats)])
    import_json("--db", store, pt)
    assert torch.equal(ckptkv.load(store, "view", "view.pt")["w"], torch.tensor([2.0, 3]))
    assert torch.equal(torch.load(pt)["w"], torch.tensor([2.0, 3]))
    with ckptkv.Store(store, read_only=True) as s:
        assert sorted(t["tag"] for t in s.tags()) == ["good", "view"]  # nothing of a refused file


def test_a_progress_bar_on_a_terminal_only_and_logs_off_stdout(tmp_path):
    """On a terminal the import draws a bar naming the tag; piped, stderr
    has no bar. Log lines (here: an optimizer file the placer cannot
    place) go to stderr, so --json's stdout stays one JSON document."""
    tag_dir = tmp_path / "ckpt" / "global_step3"
    tag_dir.mkdir(parents=True)
    w = torch.arange(1 << 20, dtype=torch.float32)
    torch.save({"module": {"w": w}, "param_shapes": [{"w": w.shape}], "dp_world_size": 1,
                "mp_world_size": 1}, tag_dir / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"single_partition_of_fp32_groups": [w.clone()],
                                         "partition_count": [1]}},
               tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tmp_path / "ckpt" / "latest").write_text("global_step3")
    r = run_import("--db", tmp_path / "s1", tmp_path / "ckpt", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"] == 2  # nothing but the document
    assert "without fragment placements" in r.stderr
    assert "import global_step3 [" not in r.stderr
    cmd = "%s import --db %s %s" % (CLI, tmp_path / "s2", tmp_path / "ckpt")
    tty = subprocess.run(["script", "-qfec", cmd, "/dev/null"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    assert tty.returncode == 0, tty.stdout
    assert "import global_step3 [" in tty.stdout and "100.0%" in tty.stdout
    assert "imported %s as tag global_step3" % (tmp_path / "ckpt") in tty.stdout


def test_a_numpy_array_referenced_twice_is_one_tensor(tmp_path):
    """A large array the pickle memoizes and references three times is
    read, held and stored once (a hostile file cannot multiply it)."""
    import numpy as np
    arr = np.arange(1 << 15, dtype=np.float64)  # 256 KiB: stored as a tensor
    sd = {"a": arr, "b": arr, "c": [arr]}
    torch.save(sd, tmp_path / "np.pt")
    r = import_json("--db", tmp_path / "s", tmp_path / "np.pt")
    assert r["tensors"] == 1 and r["logical_bytes"] == arr.nbytes
    got = ckptkv.load(tmp_path / "s", "np", "np.pt")
    for v in (got["a"], got["b"], got["c"][0]):
        assert isinstance(v, np.ndarray) and np.array_equal(v, arr)
