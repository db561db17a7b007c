"""Every kind of Python object a training script saves round-trips with its
type, without pickle; classes that are not allowed never run code."""
import argparse
import collections
import dataclasses
import enum
import os
import random
import sys
import types

import numpy as np
import pytest
import torch

import ckptkv


@pytest.fixture
def store(tmp_path):
    with ckptkv.Store(tmp_path / "store") as s:
        yield s


def roundtrip(store, obj, tag="t", **load_kw):
    with store.begin(tag) as w:
        w.save(obj, "f.pt")
    return store.load(tag, "f.pt", **load_kw)


def test_builtin_kinds_keep_their_types(store):
    od = collections.OrderedDict([("w", torch.randn(2, 3)), ("b", torch.zeros(3))])
    od._metadata = collections.OrderedDict([("", {"version": 1}), ("sub", {"version": 2})])
    value = {
        "none": None, "true": True, "int": -7, "float": 1.5, "nan": float("nan"),
        "complex": 1 - 2j, "str": "h\u00e9llo", "bytes": b"\x00\xffab", "bytearray": bytearray(b"xy"),
        "big": 2 ** 64, "neg_big": -(3 ** 200), "int64_min": -2 ** 63, "int64_max": 2 ** 63 - 1,
        "list": [1, "a", None], "tuple": (1, (2, 3)), "set": {1, 2, 3}, "frozenset": frozenset("ab"),
        "od": od, "size": torch.Size([4, 5]), "device": torch.device("cpu"),
        "slice": slice(1, None, 2), "range": range(3, 10, 3),
        "ns": argparse.Namespace(lr=0.001, name="gpt", layers=[1, 2]),
        "int_keys": {0: "a", 5: "b"}, "tuple_keys": {(1, 2): "x"}, "mixed": {1: "i", "1": "s"},
        "dtypes": [getattr(torch, n) for n in ("float32", "bfloat16", "float16", "int8", "bool",
                                              "complex64", "uint8", "float64")],
    }
    back = roundtrip(store, value)
    assert list(back) == list(value)
    for k, v in value.items():
        b = back[k]
        assert type(b) is type(v), k
        if k == "nan":
            assert b != b
        elif k == "od":
            assert list(b) == ["w", "b"] and torch.equal(b["w"], v["w"])
            assert b._metadata == v._metadata and type(b._metadata) is collections.OrderedDict
        else:
            assert b == v, k


def test_tensors_views_parameters_and_ties(store):
    base = torch.arange(100, dtype=torch.float32)
    p = torch.nn.Parameter(torch.randn(3, 3))
    value = {
        "bf16": torch.randn(5, 7).to(torch.bfloat16), "view": base[10:20],
        "strided": base.view(10, 10)[:, 1], "p": p, "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "empty": torch.empty(0, 3), "scalar": torch.tensor(3.5), "grad": torch.ones(2, requires_grad=True),
        "long": torch.arange(5), "complex": torch.randn(2, dtype=torch.complex64),
    }
    value["tied_a"] = value["tied_b"] = torch.randn(4)
    back = roundtrip(store, value)
    for k, v in value.items():
        assert type(back[k]) is type(v), k
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].detach(), v.detach()), k
        assert back[k].requires_grad == v.requires_grad, k
    assert back["tied_a"] is back["tied_b"]
    # A view is stored as its own bytes, not its whole storage.
    info = store.tag("t")
    assert info["logical_bytes"] < base.numel() * 4 + 4096 * 4


@dataclasses.dataclass
class FragmentAddress:
    numel: int
    start: int


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: int
    b: list


class ZeroStage(enum.IntEnum):
    disabled = 0
    optimizer_states = 1
    gradients = 2


class Color(enum.Enum):
    red = "r"
    green = "g"


class LossScaler:
    def __init__(self, scale):
        self.cur_scale = scale
        self.cur_iter = 0
        self.history = [scale]


class Slotted:
    __slots__ = ("x", "__hidden")

    def __init__(self):
        self.x = 1
        self.__hidden = 2


Point = collections.namedtuple("Point", "x y")


class TaggedDict(dict):
    pass


ALL = (FragmentAddress, Frozen, ZeroStage, Color, LossScaler, Slotted, Point, TaggedDict)


@pytest.fixture
def allowed():
    ckptkv.allow(*ALL)
    yield
    ckptkv.disallow(*ALL)


def user_objects():
    td = TaggedDict(a=1)
    td.note = "n"
    return {
        "frag": collections.OrderedDict([("w", FragmentAddress(numel=12, start=0))]),
        "frozen": Frozen(1, [2]), "stage": ZeroStage.gradients, "color": Color.green,
        "scaler": LossScaler(65536.0), "slotted": Slotted(), "point": Point(1, 2), "td": td,
        "stage_key": {ZeroStage.optimizer_states: "x"},
    }


def test_allowed_classes_are_rebuilt(store, allowed):
    back = roundtrip(store, user_objects())
    assert back["frag"]["w"] == FragmentAddress(12, 0)
    assert back["frozen"] == Frozen(1, [2])
    assert back["stage"] is ZeroStage.gradients and back["color"] is Color.green
    assert type(back["scaler"]) is LossScaler and vars(back["scaler"]) == vars(LossScaler(65536.0))
    assert back["slotted"].x == 1 and back["slotted"]._Slotted__hidden == 2
    assert back["point"] == Point(1, 2) and type(back["point"]) is Point
    assert type(back["td"]) is TaggedDict and back["td"] == {"a": 1} and back["td"].note == "n"
    assert back["stage_key"] == {ZeroStage.optimizer_states: "x"}


def test_classes_not_allowed_load_as_records_and_resave_faithfully(store, tmp_path):
    back = roundtrip(store, user_objects())
    scaler = back["scaler"]
    assert isinstance(scaler, ckptkv.Record)
    assert scaler.type_name == "%s:LossScaler" % __name__
    assert scaler.form == "object" and scaler.cur_scale == 65536.0
    assert back["stage"].form == "enum" and back["stage"].name == "gradients" and back["stage"].value == 2
    with pytest.raises(ckptkv.UnknownClassError, match="ckptkv.allow"):
        store.load("t", "f.pt", strict=True)
    # A record saved again is the original object's record: allowed now, it rebuilds.
    with store.begin("again") as w:
        w.save(back, "f.pt")
    ckptkv.allow(*ALL)
    try:
        again = store.load("again", "f.pt")
    finally:
        ckptkv.disallow(*ALL)
    assert again["stage"] is ZeroStage.gradients and type(again["scaler"]) is LossScaler
    assert again["point"] == Point(1, 2)


SIDE_EFFECTS = []


class Hostile:
    """Every hook a loader could call records that it ran."""

    def __new__(cls, *a, **k):
        SIDE_EFFECTS.append("__new__")
        return super().__new__(cls)

    def __init__(self):
        SIDE_EFFECTS.append("__init__")
        self.payload = "x"

    def __setstate__(self, state):
        SIDE_EFFECTS.append("__setstate__")

    def __reduce__(self):
        SIDE_EFFECTS.append("__reduce__")
        return (os.system, ("echo pwned",))

    def __setattr__(self, name, value):
        SIDE_EFFECTS.append("__setattr__")
        object.__setattr__(self, name, value)

    def __getattr__(self, name):
        SIDE_EFFECTS.append("__getattr__")
        raise AttributeError(name)


def test_no_code_of_a_saved_class_runs_on_load(store):
    obj = Hostile()
    SIDE_EFFECTS.clear()
    with store.begin("t") as w:
        w.save({"h": obj}, "f.pt")
    assert "__reduce__" not in SIDE_EFFECTS  # saving does not pickle either
    SIDE_EFFECTS.clear()
    rec = store.load("t", "f.pt")["h"]
    assert isinstance(rec, ckptkv.Record) and rec.payload == "x"
    ckptkv.allow(Hostile)
    try:
        h = store.load("t", "f.pt")["h"]
    finally:
        ckptkv.disallow(Hostile)
    assert type(h) is Hostile and object.__getattribute__(h, "payload") == "x"
    assert SIDE_EFFECTS == []


def test_known_deepspeed_classes_only_from_imported_modules(store):
    # A fake "deepspeed.runtime.zero.config" module: rebuilt only while imported.
    name = "deepspeed.runtime.zero.config"
    mod = types.ModuleType(name)

    class ZeroStageEnum(enum.IntEnum):
        disabled = 0
        optimizer_states = 1

    ZeroStageEnum.__module__ = name
    ZeroStageEnum.__qualname__ = "ZeroStageEnum"
    mod.ZeroStageEnum = ZeroStageEnum
    sys.modules[name] = mod
    try:
        with store.begin("t") as w:
            w.save({"zero_stage": ZeroStageEnum.optimizer_states}, "f.pt")
        assert store.load("t", "f.pt")["zero_stage"] is ZeroStageEnum.optimizer_states
    finally:
        del sys.modules[name]
    rec = store.load("t", "f.pt")["zero_stage"]
    assert isinstance(rec, ckptkv.Record) and rec.value == 1
    assert name not in sys.modules  # loading never imports


def test_numpy_values(store):
    rng = np.random.default_rng(1234)
    value = {
        "f32": np.float32(1.25), "i64": np.int64(-5), "b": np.bool_(True), "f16": np.float16(0.5),
        "arr": rng.standard_normal((3, 4)).astype(np.float32), "big": rng.integers(0, 9, 70000),
        "zero_d": np.array(7), "strs": np.array(["ab", "c"]), "dates": np.array(["2026-12-01"], dtype="M8[D]"),
        "fortran": np.asfortranarray(np.arange(6).reshape(2, 3)), "dtype": np.dtype("<f8"),
        "legacy_rng": np.random.RandomState(7).get_state(),
        "pcg": rng.bit_generator.state,  # 128-bit ints
        "py_random": random.Random(3).getstate(),
        "torch_rng": torch.get_rng_state(),
    }
    back = roundtrip(store, value)
    for k in ("f32", "i64", "b", "f16"):
        assert type(back[k]) is type(value[k]) and back[k] == value[k]
    for k in ("arr", "big", "zero_d", "strs", "dates", "fortran"):
        assert type(back[k]) is np.ndarray and back[k].dtype == value[k].dtype
        assert np.array_equal(back[k], value[k]) and back[k].flags.writeable
    assert back["dtype"] == np.dtype("<f8")
    st = back["legacy_rng"]
    assert st[0] == "MT19937" and np.array_equal(st[1], value["legacy_rng"][1]) and st[2:] == value["legacy_rng"][2:]
    assert back["pcg"] == value["pcg"]
    r = random.Random()
    r.setstate(back["py_random"])
    assert r.random() == random.Random(3).random()
    assert torch.equal(back["torch_rng"], value["torch_rng"])
    again = np.random.RandomState()
    again.set_state(back["legacy_rng"])
    assert again.randint(1 << 30) == np.random.RandomState(7).randint(1 << 30)


@pytest.mark.parametrize("bad, what", [
    (lambda: 1, "functions"), (os, "modules"), (int, "classes"), (torch.nn.Linear(2, 2), "state_dict"),
    (torch.Generator(), "get_state"), (np.array([object()]), "numpy object"),
    (type("IntSub", (int,), {})(3), "subclasses of int"),
])
def test_unstorable_values_are_refused_naming_the_path(store, bad, what):
    w = store.begin("t")
    with pytest.raises(ckptkv.InvalidArgumentError, match=what) as e:
        w.save({"outer": [0, {"x": bad}]}, "f.pt")
    assert "t/f.pt" in str(e.value) and "outer/1/x" in str(e.value)
    w.abort()
    assert "t" not in store


def test_a_container_holding_itself_is_refused(store):
    loop = []
    loop.append(loop)
    w = store.begin("t")
    with pytest.raises(ckptkv.InvalidArgumentError, match="nested more than"):
        w.save(loop, "f.pt")
    w.abort()


@pytest.mark.parametrize("name, value", [
    ("torch:Size", ("a", "b")), ("torch:dtype", "system"), ("torch:dtype", "os.system"),
    ("builtins:range", (1, 5, 0)), ("builtins:set", "not a list"),
    ("argparse:Namespace", {1: "int key"}), ("numpy:dtype", "O"),
    ("numpy:ndarray", ("<f4", (2, 2), b"\x00" * 3)), ("numpy:scalar", ("<f8", b"\x00")),
    ("os:system", ("echo pwned",)), ("builtins:eval", "1+1"),
])
def test_hostile_builtin_records_are_corruption_and_run_nothing(store, name, value):
    # A Record saved back writes exactly the class name, form and payload it
    # holds: the way to store records no ckptkv save would make.
    before = set(sys.modules)
    with store.begin("t") as w:
        w.save({"x": ckptkv.Record(name, "builtin", value)}, "f.pt")
    with pytest.raises(ckptkv.CorruptionError, match=name):
        store.load("t", "f.pt")
    assert set(sys.modules) == before
