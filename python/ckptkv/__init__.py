"""ckptkv: deep-learning checkpoints as deduplicated, content-addressed
blocks in one RocksDB store.

    import ckptkv
    ckptkv.save(model.state_dict(), "/ckpt/store", "step100")
    state = ckptkv.load("/ckpt/store", "step100")

``save``/``load`` are torch.save/torch.load for a store: save commits
atomically and writes only the chunks the store does not already hold;
load returns the same Python structure. Nothing is pickled and loading
never imports a module or runs a class's code (see ckptkv.allow).
DeepSpeed: ckptkv.deepspeed.KvCheckpointEngine / ckptkv.deepspeed.install.
"""
import os

import torch  # first: the extension uses the LibTorch that torch loaded

from . import errors
from ._ckptkv import _set_error_classes
from ._objects import Record, allow, allowed, disallow, KNOWN_CLASSES
from .errors import *  # noqa: F401,F403 - the exception classes
from .store import SafeOpen, Store, TensorSlice, Writer, node_ranks

_set_error_classes(errors.BY_CODE)

__version__ = "0.1.0"


def _open(store, read_only):
    if isinstance(store, Store):
        return store, False
    if isinstance(store, (str, bytes, os.PathLike)):
        return Store(store, create=not read_only, read_only=read_only), True
    raise InvalidArgumentError("store must be a path or a ckptkv.Store, not %s"
                               % type(store).__name__)


def save(obj, store, tag, file="state.pt", *, overwrite=False, compress=None):
    """Saves ``obj`` as ``file`` of a new tag and commits it atomically.

    ``store`` is a path (created if missing) or an open Store. A tag that
    exists is AlreadyExistsError unless ``overwrite``. ``compress`` as
    ``Store.begin``'s (None: the store's codec). Returns what the commit
    recorded (files, bytes, new bytes)."""
    s, owned = _open(store, read_only=False)
    try:
        with s.begin(tag, overwrite=overwrite, compress=compress) as w:
            w.save(obj, file)
        return w.info
    finally:
        if owned:
            s.close()


def load(store, tag="latest", file="state.pt", map_location=None, *, strict=False):
    """Loads ``file`` of ``tag`` (default: the latest tag), as torch.load.

    ``store`` is a path (opened read-only, so it works beside a writer) or
    an open Store; ``map_location`` is torch.load's."""
    s, owned = _open(store, read_only=True)
    try:
        return s.load(tag, file, map_location, strict=strict)
    finally:
        if owned:
            s.close()


def import_path(store, path, tag=None, *, overwrite=False, all_tags=False):
    """``ckptkv import``: a torch.save file, a DeepSpeed save_dir (the tag its
    ``latest`` names) or a tag directory into ``store`` as one tag, without
    running pickle (docs/torch-files.md). Returns {tag, files, tensors,
    logical_bytes, new_bytes}. ``all_tags=True`` (``--all-tags``): every
    tag directory of the save_dir as its own tag, the one ``latest`` names
    last; returns a list of those dicts."""
    from ._ckptkv import checkpoint as _cc
    if all_tags and tag:
        raise InvalidArgumentError("all_tags imports every tag directory under its own name; "
                                   "drop tag=%r" % (tag,))
    s, owned = _open(store, read_only=False)
    try:
        if all_tags:
            return _cc.import_save_dir(s._s, os.fspath(path), bool(overwrite))
        return _cc.import_path(s._s, os.fspath(path), tag or "", bool(overwrite))
    finally:
        if owned:
            s.close()


def export(store, tag, out_dir, format="pt", overwrite=False):
    """``ckptkv export``: the files of ``tag`` written into ``out_dir`` as
    files torch.load and DeepSpeed read (docs/export.md). ``format``: "pt"
    (each file of the tag as a torch.save file), "deepspeed"
    (``out_dir/<tag>/...`` and ``latest``), "universal" (DeepSpeed's
    universal folder and ``latest_universal``) or "safetensors"
    (kv-browser's export). Every file is re-read and checked before it is
    renamed into place; existing files are refused unless ``overwrite``.
    Returns the CLI's --json report as a dict."""
    import json
    from ._ckptkv import checkpoint as _cc
    if format not in ("pt", "deepspeed", "universal", "safetensors"):
        raise InvalidArgumentError("unknown export format %r; valid: pt, deepspeed, universal, "
                                   "safetensors" % (format,))
    s, owned = _open(store, read_only=format != "universal")
    try:
        return json.loads(_cc.export_tag(s._s, tag, os.fspath(out_dir), format, bool(overwrite)))
    finally:
        if owned:
            s.close()


__all__ = ["save", "load", "import_path", "export", "Store", "Writer", "SafeOpen", "TensorSlice", "Record", "allow",
           "disallow", "allowed", "KNOWN_CLASSES"] + errors.__all__
