"""Python objects as typed records, without pickle.

Saving: the C++ encoder stores exact built-in values itself (None, bool,
int of any size, float, complex, str, bytes, torch.Tensor, torch.device,
list, tuple, dict). Anything else comes here (``lower``) and becomes an
Object node: its class as ``"module:qualname"``, a form and a payload of
plain values (docs/format.md, "Python objects"):

* fixed built-in types: set, frozenset, bytearray, slice, range,
  OrderedDict (with its attributes, such as ``_metadata``), torch.Size,
  torch.dtype, torch.nn.Parameter, argparse.Namespace, numpy arrays,
  dtypes and scalars;
* enums, by member name and value;
* other objects (dataclasses, loss scalers, ...) by their attributes
  (``__dict__`` and ``__slots__``), and subclasses of tuple, list and dict by
  their items and attributes.

Loading (``rebuild``) never imports a module and never calls a class's code
(no ``__init__``, ``__new__``, ``__setstate__`` or ``__reduce__``): built-in
types are rebuilt by ckptkv; other classes only when allowed, by
``ckptkv.allow(cls)`` or as one of DeepSpeed's known classes whose module is
already imported. An enum becomes ``cls.__members__[name]``; an object is
made with ``object.__new__(cls)`` and its attributes are set directly. A
class that is not allowed loads as an inert :class:`Record` (or, with
``strict=True``, raises :class:`UnknownClassError` naming it and
``ckptkv.allow``); saving a Record writes back exactly what was read.
"""
import argparse
import collections
import enum
import sys
import threading

import torch

from .errors import CorruptionError, InvalidArgumentError, UnknownClassError

try:  # numpy is optional: without it, numpy values can be neither saved nor rebuilt
    import numpy as _np
except ImportError:  # pragma: no cover - Debian's python3-torch depends on numpy
    _np = None

BUILTIN, ENUM, STATE, TUPLE, DICT, LIST = range(6)  # schema/ckptkv.fbs ObjectForm
_FORM_NAMES = ("builtin", "enum", "object", "tuple", "dict", "list")

# Arrays up to this size are stored inline as bytes; larger ones as a uint8
# tensor, chunked and deduplicated like any tensor.
_INLINE_ARRAY_BYTES = 64 * 1024


def class_name(cls):
    """The name ckptkv stores for a class: ``"module:qualname"``."""
    return "%s:%s" % (cls.__module__, cls.__qualname__)


class Record:
    """An object whose class is not allowed, loaded inert.

    ``type_name`` is ``"module:qualname"``; ``form`` says how it was stored
    ("enum", "object", "tuple", "dict", "list"); ``value`` is the member
    value of an enum, the dict of attributes of an object, the items of a
    tuple, list or dict subclass; ``attrs`` the attributes of the latter
    (or None). Saving a Record stores the original object's record again.
    """

    __slots__ = ("type_name", "form", "value", "attrs", "name")

    def __init__(self, type_name, form, value, attrs=None, name=None):
        self.type_name = type_name
        self.form = form
        self.value = value
        self.attrs = attrs
        self.name = name  # enum member name

    @property
    def fields(self):
        """The attributes of an object record (its value), else {}."""
        return self.value if self.form == "object" else (self.attrs or {})

    def __getattr__(self, item):
        fields = object.__getattribute__(self, "fields")
        if isinstance(fields, dict) and item in fields:
            return fields[item]
        raise AttributeError("ckptkv.Record of %s has no field %r" % (self.type_name, item))

    def __eq__(self, other):
        return (isinstance(other, Record) and self.type_name == other.type_name
                and self.form == other.form and self.name == other.name
                and _equal(self.value, other.value) and _equal(self.attrs, other.attrs))

    def __hash__(self):
        return hash((self.type_name, self.form, self.name, repr(self.value)))

    def __repr__(self):
        if self.form == "enum":
            return "ckptkv.Record(%s.%s = %r)" % (self.type_name, self.name, self.value)
        return "ckptkv.Record(%s, %s=%r)" % (self.type_name, self.form, self.value)


def _equal(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


# ---------------------------------------------------------------- allowlist
_lock = threading.Lock()
_allowed = {}  # "module:qualname" -> class

# DeepSpeed's (and Megatron's) classes found in their checkpoints, rebuilt
# when their module is already imported (never imported by ckptkv).
KNOWN_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
    "deepspeed.checkpoint.universal_checkpoint:SubparamShape",
    "deepspeed.runtime.checkpoint_engine.checkpoint_engine:CheckpointCommitInfo",
)


def allow(*classes):
    """Lets objects of these classes be rebuilt on load (as torch's
    ``add_safe_globals``). Returns the first class, so it works as a class
    decorator. Their code still never runs: ckptkv sets their attributes."""
    for cls in classes:
        if not isinstance(cls, type):
            raise InvalidArgumentError("ckptkv.allow takes classes; %r is a %s"
                                       % (cls, type(cls).__name__))
        with _lock:
            _allowed[class_name(cls)] = cls
    return classes[0] if classes else None


def disallow(*classes):
    """Undoes allow()."""
    with _lock:
        for cls in classes:
            _allowed.pop(class_name(cls), None)


def allowed():
    """The names of the classes allow() was given."""
    with _lock:
        return sorted(_allowed)


def _static_attr(obj, name):
    # Looks a name up without running __getattr__ hooks or descriptors.
    d = getattr(obj, "__dict__", None)
    if d is None:
        return None
    try:
        return d.get(name)
    except Exception:  # a mappingproxy always answers; be safe anyway
        return None


def _resolve(type_name):
    with _lock:
        cls = _allowed.get(type_name)
    if cls is not None:
        return cls
    if type_name not in KNOWN_CLASSES:
        return None
    module_name, _, qualname = type_name.partition(":")
    obj = sys.modules.get(module_name)
    for part in qualname.split("."):
        if obj is None:
            return None
        obj = _static_attr(obj, part)
    return obj if isinstance(obj, type) else None


# ------------------------------------------------------------------ saving
def _fail(where, path, obj, why):
    raise InvalidArgumentError("%s: value at '%s' is a %s.%s; %s" % (
        where, path or "/", type(obj).__module__, type(obj).__qualname__, why))


def _attrs(obj):
    """The attributes of an object: its __dict__ plus its __slots__."""
    state = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
    for klass in type(obj).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        if isinstance(slots, str):
            slots = (slots,)
        for name in slots:
            if name in ("__dict__", "__weakref__"):
                continue
            if name.startswith("__") and not name.endswith("__"):
                name = "_%s%s" % (klass.__name__.lstrip("_"), name)
            try:
                state[name] = object.__getattribute__(obj, name)
            except AttributeError:
                pass
    return state


def _is_heap_type(cls):
    return bool(cls.__flags__ & (1 << 9))  # Py_TPFLAGS_HEAPTYPE: a class made by `class`


def _array_payload(a):
    if a.dtype.hasobject or a.dtype.fields is not None:
        return None
    shape = tuple(int(n) for n in a.shape)  # ascontiguousarray makes 0-d arrays 1-d
    a = _np.ascontiguousarray(a)
    if a.nbytes <= _INLINE_ARRAY_BYTES:
        data = a.tobytes()
    else:
        data = torch.from_numpy(a.reshape(-1).view(_np.uint8))
    return ((a.dtype.str, shape, data),)


def _lower_builtin(obj):
    """(name, payload) for the fixed built-in types, else None."""
    t = type(obj)
    if t is collections.OrderedDict:
        attrs = vars(obj)
        return "collections:OrderedDict", ((dict(obj), dict(attrs)) if attrs else (dict(obj),))
    if t is set:
        return "builtins:set", (list(obj),)
    if t is frozenset:
        return "builtins:frozenset", (list(obj),)
    if t is bytearray:
        return "builtins:bytearray", (bytes(obj),)
    if t is slice:
        return "builtins:slice", ((obj.start, obj.stop, obj.step),)
    if t is range:
        return "builtins:range", ((obj.start, obj.stop, obj.step),)
    if t is torch.Size:
        return "torch:Size", (tuple(obj),)
    if t is torch.dtype:
        return "torch:dtype", (str(obj).replace("torch.", ""),)
    if t is torch.nn.Parameter:
        return "torch.nn:Parameter", (obj.detach(), bool(obj.requires_grad))
    if t is argparse.Namespace:
        return "argparse:Namespace", (dict(vars(obj)),)
    if _np is not None:
        if t is _np.ndarray:
            payload = _array_payload(obj)
            return ("numpy:ndarray", payload) if payload else None
        if isinstance(obj, _np.dtype) and not obj.hasobject and obj.fields is None:
            return "numpy:dtype", (obj.str,)
        if isinstance(obj, _np.generic) and not obj.dtype.hasobject and obj.dtype.fields is None:
            return "numpy:scalar", ((obj.dtype.str, obj.tobytes()),)
    return None


def lower(obj, path, where):
    """(class name, form, payload) for a value the C++ encoder does not
    store itself; InvalidArgumentError for one that cannot be stored."""
    if isinstance(obj, Record):
        form = _FORM_NAMES.index(obj.form)
        if form == ENUM:
            return obj.type_name, form, (obj.value, obj.name)
        payload = (obj.value,) if obj.attrs is None else (obj.value, obj.attrs)
        return obj.type_name, form, payload
    builtin = _lower_builtin(obj)
    if builtin is not None:
        return builtin[0], BUILTIN, builtin[1]
    cls = type(obj)
    name = class_name(cls)
    if isinstance(obj, enum.Enum):
        return name, ENUM, (obj.value, obj.name)
    if isinstance(obj, torch.Tensor):
        _fail(where, path, obj, "tensor subclasses other than nn.Parameter cannot be saved; "
              "save a torch.Tensor (t.as_subclass(torch.Tensor))")
    if isinstance(obj, torch.nn.Module):
        _fail(where, path, obj, "modules are code; save module.state_dict()")
    if isinstance(obj, torch.Generator):
        _fail(where, path, obj, "save generator.get_state(), a tensor")
    if _np is not None and isinstance(obj, (_np.ndarray, _np.generic, _np.dtype)):
        _fail(where, path, obj, "numpy object and structured arrays cannot be saved; "
              "arrays of numbers, bools, strings and dates can")
    if not _is_heap_type(cls):
        _fail(where, path, obj, "only Python classes' objects are stored (by their "
              "attributes); functions, modules, classes and C types cannot be saved")
    attrs = _attrs(obj)
    if isinstance(obj, tuple):
        return name, TUPLE, ((tuple(obj), attrs) if attrs else (tuple(obj),))
    if isinstance(obj, list):
        return name, LIST, (list(obj), attrs)
    if isinstance(obj, dict):
        return name, DICT, (dict(obj), attrs)
    if isinstance(obj, (int, float, complex, str, bytes)):
        _fail(where, path, obj, "subclasses of int, float, complex, str and bytes cannot be "
              "saved except as enums; convert to the built-in type")
    return name, STATE, (attrs,)


# ---------------------------------------------------------------- loading
def _bad(where, type_name, why):
    raise CorruptionError("%s: saved %s %s" % (where, type_name, why))


def _triple(where, name, p):
    if not (isinstance(p, tuple) and len(p) == 3
            and all(x is None or type(x) is int for x in p)):
        _bad(where, name, "payload is not (start, stop, step)")
    return p


def _rebuild_builtin(where, name, payload):
    v = payload[0]
    try:
        if name == "collections:OrderedDict" and isinstance(v, dict):
            out = collections.OrderedDict(v)
            if len(payload) == 2:
                _set_attrs(where, name, out, payload[1])
            return out
        if name in ("builtins:set", "builtins:frozenset") and isinstance(v, list):
            return set(v) if name == "builtins:set" else frozenset(v)
        if name == "builtins:bytearray" and isinstance(v, bytes):
            return bytearray(v)
        if name == "builtins:slice":
            return slice(*_triple(where, name, v))
        if name == "builtins:range":
            p = _triple(where, name, v)
            if None in p or p[2] == 0:
                _bad(where, name, "has a None or zero bound")
            return range(*p)
        if name == "torch:Size" and isinstance(v, tuple) and all(type(x) is int for x in v):
            return torch.Size(v)
        if name == "torch:dtype" and isinstance(v, str):
            d = vars(torch).get(v)  # no getattr: a module __getattr__ could import
            if isinstance(d, torch.dtype):
                return d
            _bad(where, name, "names no dtype: %r" % v)
        if name == "torch.nn:Parameter" and isinstance(v, torch.Tensor):
            grad = payload[1] if len(payload) == 2 else True
            if type(grad) is not bool:
                _bad(where, name, "has a non-bool requires_grad")
            return torch.nn.Parameter(v, requires_grad=grad and (v.is_floating_point() or v.is_complex()))
        if name == "argparse:Namespace" and isinstance(v, dict) and all(type(k) is str for k in v):
            return argparse.Namespace(**v)
        if name.startswith("numpy:"):
            return _rebuild_numpy(where, name, v)
    except (TypeError, ValueError) as e:
        _bad(where, name, "cannot be rebuilt: %s" % e)
    _bad(where, name, "has a payload of the wrong kind (%s)" % type(v).__name__)


def _numpy_dtype(where, name, s):
    if _np is None:
        raise UnknownClassError("%s: %s needs numpy, which is not installed" % (where, name))
    if not isinstance(s, str):
        _bad(where, name, "has a dtype that is not a string")
    try:
        d = _np.dtype(s)
    except TypeError:
        _bad(where, name, "has an unknown dtype %r" % s)
    if d.hasobject or d.fields is not None:
        _bad(where, name, "has an object or structured dtype %r" % s)
    return d


def _rebuild_numpy(where, name, v):
    if name == "numpy:dtype":
        return _numpy_dtype(where, name, v)
    if name == "numpy:scalar" and isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], bytes):
        d = _numpy_dtype(where, name, v[0])
        if len(v[1]) != d.itemsize:
            _bad(where, name, "holds %d bytes for a %d-byte %s" % (len(v[1]), d.itemsize, d))
        return _np.frombuffer(v[1], dtype=d)[0]
    if name == "numpy:ndarray" and isinstance(v, tuple) and len(v) == 3:
        d = _numpy_dtype(where, name, v[0])
        shape, data = v[1], v[2]
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            _bad(where, name, "has an invalid shape")
        if isinstance(data, torch.Tensor):
            if data.dtype != torch.uint8 or data.dim() != 1:
                _bad(where, name, "holds a tensor that is not 1-D uint8")
            data = data.cpu().numpy().tobytes()
        if not isinstance(data, bytes):
            _bad(where, name, "holds no bytes")
        count = 1
        for n in shape:
            count *= n
        if count * d.itemsize != len(data):
            _bad(where, name, "holds %d bytes for shape %s of %s" % (len(data), shape, d))
        return _np.frombuffer(data, dtype=d).reshape(shape).copy()
    _bad(where, name, "has a payload of the wrong kind")


def _set_attrs(where, name, obj, attrs):
    if not (isinstance(attrs, dict) and all(type(k) is str for k in attrs)):
        _bad(where, name, "has attributes that are not a dict with str keys")
    for k, v in attrs.items():
        # Slots are descriptors on the class; everything else goes straight
        # into __dict__, so no __setattr__ of the class runs.
        d = getattr(obj, "__dict__", None)
        if d is not None and not _is_slot(type(obj), k):
            d[k] = v
        else:
            object.__setattr__(obj, k, v)


def _is_slot(cls, name):
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        if isinstance(slots, str):
            slots = (slots,)
        if name in slots:
            return True
    return False


def _rebuild_allowed(where, name, cls, form, payload):
    v = payload[0]
    attrs = payload[1] if len(payload) == 2 else None
    if form == ENUM:
        if not issubclass(cls, enum.Enum):
            raise UnknownClassError("%s: saved enum %s is allowed, but %r is not an enum"
                                    % (where, name, cls))
        member = cls.__members__.get(attrs) if isinstance(attrs, str) else None
        if member is None:
            _bad(where, name, "names member %r, which the enum does not have" % (attrs,))
        return member
    try:
        if form == STATE:
            obj = object.__new__(cls)
            _set_attrs(where, name, obj, v)
            return obj
        if form == TUPLE and isinstance(v, tuple) and issubclass(cls, tuple):
            obj = tuple.__new__(cls, v)
        elif form == LIST and isinstance(v, list) and issubclass(cls, list):
            obj = list.__new__(cls)
            list.extend(obj, v)
        elif form == DICT and isinstance(v, dict) and issubclass(cls, dict):
            obj = dict.__new__(cls)
            dict.update(obj, v)
        else:
            _bad(where, name, "does not fit the allowed class %r" % cls)
    except TypeError as e:
        raise UnknownClassError("%s: %s cannot be rebuilt without running its code: %s"
                                % (where, name, e))
    if attrs:
        _set_attrs(where, name, obj, attrs)
    return obj


def make_rebuild(where, strict):
    """The rebuild hook the C++ decoder calls for each Object node."""

    def rebuild(name, form, payload):
        payload = tuple(payload)
        if form == BUILTIN:
            return _rebuild_builtin(where, name, payload)
        cls = _resolve(name)
        if cls is not None:
            return _rebuild_allowed(where, name, cls, form, payload)
        if strict:
            raise UnknownClassError(
                "%s: the checkpoint holds an object of class %s, which is not allowed; "
                "call ckptkv.allow(%s) (after importing it) to rebuild it, or load with "
                "strict=False to get it as a ckptkv.Record"
                % (where, name, name.split(":")[-1]))
        if form == ENUM:
            return Record(name, "enum", payload[0], name=payload[1] if len(payload) == 2 else None)
        return Record(name, _FORM_NAMES[form], payload[0], payload[1] if len(payload) == 2 else None)

    return rebuild
