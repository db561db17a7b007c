"""DeepSpeed's checkpoint engine, backed by a ckptkv store.

    import ckptkv.deepspeed
    engine, *_ = deepspeed.initialize(...)
    ckptkv.deepspeed.install(engine)          # or install(engine, store="/fast/ckpt-store")
    engine.save_checkpoint(save_dir)          # unchanged from here on
    engine.load_checkpoint(save_dir)

:class:`KvCheckpointEngine` answers every call DeepSpeed makes of a
checkpoint engine, in both API generations (``create(tag)`` /
``commit(tag)`` up to 0.16, ``create(info)`` / ``commit(info)`` with a
CheckpointCommitInfo from 0.17). A path ``<save_dir>/<tag>/<file>`` is
file ``<file>`` of tag ``<tag>`` in the store, by default
``<save_dir>/ckptkv-store``. DeepSpeed also finds files through the file
system (``latest``, globs of ``mp_rank_*`` and ``layer_*``,
``os.path.exists``), so ``makedirs`` makes real directories and each save
leaves a small placeholder at ``path``: a torch.save file of a dict naming
the store, tag and file (``torch.load`` of it explains where the data is).
Saves record DeepSpeed fragment placements, so the store's reshape and
universal export plan from records alone.
"""
import os

import torch

from . import errors
from .store import Store, node_ranks

DEFAULT_STORE_DIR = "ckptkv-store"
PLACEHOLDER_KEY = "ckptkv_placeholder"


def placeholder(store_dir, tag, file):
    """What a placeholder file holds (plain strings only)."""
    return {
        PLACEHOLDER_KEY: 1,
        "store": os.path.abspath(store_dir),
        "tag": tag,
        "file": file,
        "note": ("The checkpoint is in the ckptkv store %s, tag %s, file %s. Load it with "
                 "ckptkv.load(%r, %r, %r) or DeepSpeed's load_checkpoint through "
                 "ckptkv.deepspeed.KvCheckpointEngine." % (store_dir, tag, file, store_dir, tag,
                                                           file)),
    }


def read_placeholder(path):
    """The placeholder at ``path`` as a dict, or None when ``path`` is not
    one. Read with torch's weights_only unpickler, which runs no code."""
    try:
        if os.path.getsize(path) > 64 * 1024:
            return None
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a placeholder: any torch.save file or garbage
        return None
    if isinstance(d, dict) and d.get(PLACEHOLDER_KEY) == 1 and all(
            isinstance(d.get(k), str) for k in ("store", "tag", "file")):
        return d
    return None


class _CommitInfo:
    """DeepSpeed's CheckpointCommitInfo for a create(tag) of the old API."""

    def __init__(self, tag, save_dir, save_latest):
        self.tag, self.save_dir, self.save_latest = tag, save_dir, save_latest

    def __eq__(self, other):
        return (getattr(other, "tag", None), getattr(other, "save_dir", None),
                getattr(other, "save_latest", None)) == (self.tag, self.save_dir,
                                                         self.save_latest)

    def __repr__(self):
        return "CommitInfo(tag=%r, save_dir=%r, save_latest=%r)" % (
            self.tag, self.save_dir, self.save_latest)


def _tag_of(x):
    """A tag string from a tag or a CheckpointCommitInfo-like object."""
    if isinstance(x, str):
        return x, None
    tag = getattr(x, "tag", None)
    if not isinstance(tag, str):
        raise errors.InvalidArgumentError(
            "expected a tag string or a CheckpointCommitInfo(tag, save_dir, save_latest); got %r"
            % (x,))
    return tag, x


def _ckptkv_config(config_params):
    """The "ckptkv" block of a DeepSpeed config (its "checkpoint" section), or {}."""
    if config_params is None:
        return {}
    get = config_params.get if isinstance(config_params, dict) else (
        lambda k, d=None: getattr(config_params, k, d))
    for section in (get("checkpoint", None), config_params):
        if isinstance(section, dict) and isinstance(section.get("ckptkv"), dict):
            return section["ckptkv"]
    return {}


class KvCheckpointEngine:
    """A DeepSpeed CheckpointEngine over a ckptkv store.

    ``store`` is a path or an open :class:`ckptkv.Store`; by default the
    store is ``<save_dir>/ckptkv-store`` of the first save_dir (or load
    path) the engine sees. The DeepSpeed config may carry options as
    ``"checkpoint": {"ckptkv": {"store": ..., "overwrite": false,
    "compress": false, "async_save": false}}``.

    ``async_save``: False (every ``save`` writes before it returns), True
    (``save`` returns once the tensors are copied into snapshot buffers;
    hashing and writes run in the background and ``commit`` waits for them)
    or ``"decoupled"`` (the same, and ``is_decoupled()`` is True: DeepSpeed
    then skips the commit in ``save_checkpoint`` and calls
    ``commit(get_commit_info())`` at the next step, so training goes on
    while the tag is written; ``cleanup`` commits a tag still pending).
    """

    def __init__(self, config_params=None, *, store=None, overwrite=None, compress=None,
                 async_save=None):
        opts = _ckptkv_config(config_params)
        self.name = "KvCheckpointEngine"
        self.config_params = config_params
        self._store_arg = store if store is not None else opts.get("store")
        self._overwrite = bool(opts.get("overwrite", False) if overwrite is None else overwrite)
        self._compress = opts.get("compress", False) if compress is None else compress
        mode = opts.get("async_save", False) if async_save is None else async_save
        if mode not in (False, True, "decoupled"):
            raise errors.InvalidArgumentError(
                "async_save=%r is not valid; expected false, true or \"decoupled\"" % (mode,))
        self._background = mode is not False
        self._decoupled = mode == "decoupled"
        self._store = store if isinstance(store, Store) else None
        self._owns_store = False
        self._save_dir = None
        self._writers = {}  # tag -> (Writer, save_dir)
        self._commit_info = None
        self.last_save = None
        self.last_commit = None

    # ------------------------------------------------------------ the store
    @property
    def store(self):
        """The store, once a path or the configuration named it (else None)."""
        return self._store

    def _open_store(self, save_dir):
        if self._store is not None:
            return self._store
        path = self._store_arg
        if path is None:
            if not save_dir:
                raise errors.FailedPreconditionError(
                    "no store to use: call makedirs(save_dir) or create(info) first, or pass "
                    "store= to KvCheckpointEngine")
            path = os.path.join(save_dir, DEFAULT_STORE_DIR)
        # Every rank of the node saves into this store: with more than one,
        # they write through its node writer and commit each tag together.
        rank, world = node_ranks()
        if world > 1:
            self._store = Store(path, compress=self._compress, rank=rank, world_size=world)
        else:
            self._store = Store(path, compress=self._compress)
        self._owns_store = True
        return self._store

    def _resolve(self, path, tag_dirs):
        """(tag, file) of ``path`` = <save_dir>/<tag>/<file>."""
        p = os.path.normpath(os.path.abspath(os.fspath(path)))
        for tag, save_dir in tag_dirs:
            prefix = os.path.join(os.path.abspath(save_dir), tag) + os.sep
            if save_dir and p.startswith(prefix):
                return tag, p[len(prefix):].replace(os.sep, "/")
        parent, file = os.path.split(p)
        tag = os.path.basename(parent)
        if not tag or not file:
            raise errors.InvalidArgumentError(
                "path '%s' does not name a file of a tag; expected <save_dir>/<tag>/<file>" % path)
        return tag, file

    # ---------------------------------------------------- DeepSpeed's calls
    def makedirs(self, path, exist_ok=False):
        """Creates the directory (DeepSpeed writes `latest` and globs in it).
        The first call names the save_dir."""
        os.makedirs(path, exist_ok=exist_ok)
        if self._save_dir is None:
            self._save_dir = os.path.abspath(path)

    def create(self, tag):
        """About to save ``tag`` (a str, or a CheckpointCommitInfo)."""
        tag, info = _tag_of(tag)
        save_dir = getattr(info, "save_dir", None) or self._save_dir
        if save_dir is not None:
            save_dir = os.path.abspath(save_dir)
            if self._save_dir is None:
                self._save_dir = save_dir
        store = self._open_store(save_dir)
        pending = self._commit_info
        if self._decoupled and pending is not None and _tag_of(pending)[0] != tag:
            # A decoupled tag not committed yet is committed before the next
            # one starts: no tag is dropped.
            self.commit(pending)
        old = self._writers.pop(tag, None)
        if old is not None:
            old[0].abort()
        self._writers[tag] = (store.begin(tag, overwrite=self._overwrite,
                                          background=self._background), save_dir)
        if self._decoupled:
            self._commit_info = info if info is not None else _CommitInfo(tag, save_dir, True)

    def save(self, state_dict, path):
        """Persists one file of the created tag; leaves a placeholder at path."""
        if not self._writers:
            raise errors.FailedPreconditionError(
                "save of '%s' before create; call create(tag) first" % path)
        tag, file = self._resolve(path, [(t, d) for t, (_, d) in self._writers.items()])
        if tag not in self._writers:
            raise errors.FailedPreconditionError(
                "save of '%s' into tag '%s' without create; created: %s"
                % (path, tag, ", ".join(sorted(self._writers))))
        writer, _ = self._writers[tag]
        self.last_save = writer.save(state_dict, file, place=True)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        torch.save(placeholder(self._store.path, tag, file), path)

    def commit(self, tag):
        """All files of ``tag`` are saved: commit it atomically and durably."""
        tag, info = _tag_of(tag)
        if (self._decoupled and info is not None and self._commit_info is not None
                and _tag_of(self._commit_info)[0] == tag and info != self._commit_info):
            raise ValueError("commit info %r is not the pending one, %r"
                             % (info, self._commit_info))
        entry = self._writers.pop(tag, None)
        if entry is None:
            if self._store is not None and tag in self._store:
                return True  # every rank commits; a second commit has nothing to do
            raise errors.FailedPreconditionError(
                "commit of tag '%s' without create; call create('%s') first" % (tag, tag))
        set_latest = bool(getattr(info, "save_latest", True))
        self.last_commit = entry[0].commit(set_latest=set_latest)
        if self._commit_info is not None and getattr(self._commit_info, "tag", None) == tag:
            self._commit_info = None
        return True

    def load(self, path, map_location=None):
        """The value saved at ``path``; map_location as torch.load's."""
        if self._store is None:
            ph = read_placeholder(path)
            if ph is not None and self._store_arg is None:
                self._store_arg = ph["store"]
            tag_dir = os.path.dirname(os.path.abspath(path))
            self._open_store(os.path.dirname(tag_dir))
        ph = read_placeholder(path) if os.path.isfile(path) else None
        if ph is not None and os.path.abspath(ph["store"]) == os.path.abspath(self._store.path):
            tag, file = ph["tag"], ph["file"]
        else:
            dirs = [(t, d) for t, (_, d) in self._writers.items()]
            if self._save_dir is not None:
                dirs += [(t, self._save_dir) for t in self._known_tags(path)]
            tag, file = self._resolve(path, dirs)
        return self._store.load(tag, file, map_location=map_location)

    def _known_tags(self, path):
        p = os.path.abspath(path)
        rel = os.path.relpath(p, self._save_dir)
        first = rel.split(os.sep)[0]
        return [first] if first not in ("..", ".") else []

    def open(self, load_dir, tag=None):
        """The tag to load (``None`` / "latest": the latest), or None if none."""
        self._open_store(os.path.abspath(load_dir))
        if tag is None or tag == "latest":
            return self._store.latest()
        return tag if tag in self._store else None

    def close(self, tag=None):
        """Ends reading ``tag``; nothing to release."""

    def is_data_parallel_writer(self, dp_rank):
        return dp_rank == 0

    def is_decoupled(self):
        return self._decoupled

    def set_commit_info(self, info):
        self._commit_info = info

    def get_commit_info(self):
        return self._commit_info

    def cleanup(self):
        """DeepSpeed's destroy(): commit a decoupled tag still pending, abort
        other tags never committed, close the store."""
        if self._decoupled and self._commit_info is not None:
            self.commit(self._commit_info)
        for writer, _ in self._writers.values():
            writer.abort()
        self._writers.clear()
        if self._owns_store and self._store is not None:
            self._store.close()
            self._store = None

    def preserves_storage_sharing(self):
        # A view is stored as its own bytes, never its whole storage, so
        # DeepSpeed need not clone tensors before saving.
        return False

    def __del__(self):
        try:
            for writer, _ in self._writers.values():
                writer.abort()
        except Exception:
            pass


def install(engine, store=None):
    """Puts a KvCheckpointEngine into an initialized DeepSpeed engine and
    redoes what DeepSpeed computed at init from the engine it replaces
    (``save_non_zero_checkpoint``). Returns the new checkpoint engine."""
    config = getattr(engine, "_config", None)
    params = getattr(config, "_param_dict", None) if config is not None else None
    ce = KvCheckpointEngine(params, store=store)
    old = getattr(engine, "checkpoint_engine", None)
    if old is not None and hasattr(old, "cleanup"):
        try:
            old.cleanup()
        except Exception:
            pass
    engine.checkpoint_engine = ce
    if hasattr(engine, "save_non_zero_checkpoint"):
        dp_rank = _data_parallel_rank(engine)
        zero3 = False
        try:
            zero3 = engine.zero_optimization_partition_weights()
        except Exception:
            pass
        first_group = True
        if zero3:
            try:
                first_group = engine.is_first_weights_partition_group()
            except Exception:
                pass
        engine.save_non_zero_checkpoint = ce.is_data_parallel_writer(dp_rank) or (
            zero3 and first_group)
    return ce


def _data_parallel_rank(engine):
    for name in ("seq_data_parallel_group", "data_parallel_group"):
        group = getattr(engine, name, None)
        if group is not None:
            try:
                import torch.distributed as dist
                if dist.is_initialized():
                    return dist.get_rank(group=group)
            except Exception:
                pass
    mpu = getattr(engine, "mpu", None)
    if mpu is not None and hasattr(mpu, "get_data_parallel_rank"):
        return mpu.get_data_parallel_rank()
    return 0
