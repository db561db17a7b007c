"""`ckptkv import`: torch.save files written here by Debian's torch come into
a store with exactly their values and types, without running pickle;
hostile files are refused naming what they hold, and nothing runs."""
import argparse
import collections
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ckptkv

BIN = os.environ.get("CKPTKV_BIN", "")
CLI = os.path.join(BIN, "ckptkv")
pytestmark = pytest.mark.skipif(not os.path.exists(CLI), reason="needs the ckptkv program")

FAKE_DEEPSPEED = {
    "deepspeed/__init__.py": "",
    "deepspeed/runtime/__init__.py": "",
    "deepspeed/runtime/zero/__init__.py": "",
    "deepspeed/runtime/zero/config.py": textwrap.dedent("""
        import enum
        class ZeroStageEnum(int, enum.Enum):
            disabled = 0
            optimizer_states = 1
            gradients = 2
            weights = 3
            max_stage = 4
    """),
    "deepspeed/runtime/fp16/__init__.py": "",
    "deepspeed/runtime/fp16/loss_scaler.py": textwrap.dedent("""
        class LossScaler:
            def __init__(self, scale):
                self.cur_scale = scale
        class DynamicLossScaler(LossScaler):
            pass
    """),
    "deepspeed/utils/__init__.py": "",
    "deepspeed/utils/tensor_fragment.py": textwrap.dedent("""
        import dataclasses
        @dataclasses.dataclass
        class fragment_address:
            numel: int
            start: int
    """),
}


@pytest.fixture(scope="module")
def fake_deepspeed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_ds")
    for name, text in FAKE_DEEPSPEED.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    sys.path.insert(0, str(root))
    import deepspeed.runtime.fp16.loss_scaler as ls
    import deepspeed.runtime.zero.config as zc
    import deepspeed.utils.tensor_fragment as tf
    yield types_of(zc, ls, tf)
    sys.path.remove(str(root))
    for m in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")]:
        del sys.modules[m]


def types_of(zc, ls, tf):
    return argparse.Namespace(ZeroStageEnum=zc.ZeroStageEnum, LossScaler=ls.LossScaler,
                              DynamicLossScaler=ls.DynamicLossScaler,
                              fragment_address=tf.fragment_address)


def run_import(*args):
    return subprocess.run([CLI, "import", *map(str, args)], capture_output=True, text=True)


def import_json(*args):
    r = run_import(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_same(a, b, path="/"):
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
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
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    r = run_import("--db", store, legacy)
    assert r.returncode == 1 and "legacy format" in r.stderr, r.stderr
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
    assert r.returncode == 1 and "not a torch.save zip file" in r.stderr, r.stderr


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
