"""The Store, its writers and lazy readers."""
import json
import os

import torch

from . import _ckptkv
from . import _objects
from .errors import CorruptionError, InvalidArgumentError, NotFoundError

_DTYPES = {
    "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "complex64": torch.complex64, "complex128": torch.complex128,
}


def _cuda_available():
    return torch.cuda.is_available()


def _move(t, device):
    if t.device == device:
        return t
    grad = t.requires_grad
    out = t.detach().to(device)
    if grad:
        out.requires_grad_(True)
    return out


def _storage_of(t):
    getter = getattr(t, "untyped_storage", None) or t.storage
    return getter()


def tensor_hook(map_location, where):
    """map_location as torch.load takes it, applied to each loaded tensor:
    None (the device it was saved from), a str or torch.device, a dict
    {saved location: location}, or a callable(storage, location)."""
    def check(device, saved):
        if device.type == "cuda" and not _cuda_available():
            raise InvalidArgumentError(
                "%s: a tensor was saved from %s but CUDA is not available; load with "
                "map_location='cpu'" % (where, saved))
        return device

    if map_location is None:
        def hook(t, saved):
            return t if saved == "cpu" else _move(t, check(torch.device(saved), saved))
    elif isinstance(map_location, (str, torch.device)):
        target = torch.device(map_location)

        def hook(t, saved):
            return _move(t, check(target, saved))
    elif isinstance(map_location, dict):
        def hook(t, saved):
            dest = map_location.get(saved, saved)
            return _move(t, check(torch.device(dest), saved))
    elif callable(map_location):
        def hook(t, saved):
            r = map_location(_storage_of(t), saved)
            if r is None:
                return t if saved == "cpu" else _move(t, check(torch.device(saved), saved))
            if isinstance(r, (str, torch.device)):
                return _move(t, check(torch.device(r), saved))
            device = getattr(r, "device", None)
            if device is None:
                raise InvalidArgumentError(
                    "%s: map_location returned %r; expected a storage, a device or None"
                    % (where, r))
            return _move(t, torch.device(device))
    else:
        raise InvalidArgumentError(
            "map_location %r is not valid; expected None, a str, a torch.device, a dict or a "
            "callable(storage, location)" % (map_location,))
    return hook


_COMPRESSIONS = {None: "", False: "", "raw": "", True: "grouped-zstd", "zstd": "zstd",
                 "grouped-zstd": "grouped-zstd"}


def _env_int(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        x = int(v)
    except ValueError:
        x = -1
    if x < 0:
        raise InvalidArgumentError("environment variable %s=%r is not a non-negative integer"
                                   % (name, v))
    return x


def node_ranks():
    """(rank, world_size) of this process among the processes of its node.

    From ``LOCAL_RANK`` with ``LOCAL_WORLD_SIZE`` (torchrun) or
    ``LOCAL_SIZE`` (DeepSpeed's launcher), else Open MPI's
    ``OMPI_COMM_WORLD_LOCAL_RANK`` / ``OMPI_COMM_WORLD_LOCAL_SIZE``, as the
    C++ engine reads them; else, taken to be a single node, from
    torch.distributed when it is initialized, else ``RANK`` /
    ``WORLD_SIZE``; (0, 1) when nothing says otherwise.
    """
    world = None
    for names in (("LOCAL_RANK", "LOCAL_WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_SIZE"),
                  ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")):
        world = _env_int(names[1])
        if world is not None:
            rank = _env_int(names[0])
            break
    if world is None:
        dist = getattr(torch, "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        world = _env_int("WORLD_SIZE")
        rank = _env_int("RANK")
        names = ("RANK", "WORLD_SIZE")
    if world is None or world <= 1:
        return 0, 1
    if rank is None or rank >= world:
        raise InvalidArgumentError("%s=%d but %s is %s; valid: 0 to %d"
                                   % (names[1], world, names[0],
                                      "unset" if rank is None else rank, world - 1))
    return rank, world


def _compression(value):
    try:
        return _COMPRESSIONS[value]
    except (KeyError, TypeError):
        raise InvalidArgumentError(
            "compress=%r is not valid; expected False/None/'raw' (no compression), True or "
            "'grouped-zstd' (floats byte-grouped, then zstd) or 'zstd'" % (value,)) from None


class Store:
    """A ckptkv store: a directory holding one RocksDB database.

    ``Store(path, create=True, read_only=False)`` opens it (creating it
    unless ``create`` is False); one process writes a store, any number read
    it (``read_only=True``). A context manager: leaving it closes the store,
    aborting tags begun and not committed.

    ``compress``: the codec of new blocks by default (kept by a new store;
    ``begin(tag, compress=...)`` overrides it for one tag): False/None (raw),
    True or ``"grouped-zstd"`` (bf16/fp16/fp32/fp64 bytes grouped by their
    position in the element, then zstd; other dtypes zstd; a chunk that does
    not shrink by 1/16 stays raw), or ``"zstd"``. Digests are of the raw
    bytes, so dedup does not depend on the codec. ``async_buffer_bytes``
    bounds the snapshot buffers of background saves (0: a quarter of the
    machine's memory).

    ``world_size`` (with ``rank``): this process is one of ``world_size``
    processes of one node writing this store together (the ranks of a
    job). They write through the store's node writer, which the first of
    them starts; a tag commits when every rank has committed it, and a rank
    that closes or dies before its commit aborts it for all (its other
    ranks' ``commit`` raises an error naming it). A commit waits at most
    ``commit_timeout`` seconds for the other ranks. ``world_size="env"``
    takes both from the environment (:func:`node_ranks`). Without
    ``world_size`` this process is the store's only writer.
    """

    def __init__(self, path, *, create=True, read_only=False, chunk_size=None, compress=False,
                 threads=0, async_buffer_bytes=0, rank=None, world_size=None,
                 commit_timeout=None):
        self.path = os.fspath(path)
        if not create and not os.path.exists(self.path):
            raise NotFoundError("store '%s' does not exist (pass create=True to make one)"
                                % self.path)
        self._threads = int(threads)
        if isinstance(world_size, str) and world_size == "env":
            rank, world_size = node_ranks()
        elif world_size is not None and rank is None:
            raise InvalidArgumentError("world_size=%r without rank; pass rank= too" % (world_size,))
        if world_size is not None:
            world_size, rank = int(world_size), int(rank)
            if world_size < 1 or not 0 <= rank < world_size:
                raise InvalidArgumentError(
                    "rank %d of world_size %d; valid: world_size >= 1 and 0 <= rank < world_size"
                    % (rank, world_size))
        if commit_timeout is None:
            commit_timeout = float(os.environ.get("CKPTKV_COMMIT_TIMEOUT") or 600)
        self._s = _ckptkv.Store(self.path, bool(create), bool(read_only), int(chunk_size or 0),
                                _compression(compress), self._threads, int(async_buffer_bytes),
                                int(rank or 0), int(world_size or 0), float(commit_timeout))

    @property
    def through_node_writer(self):
        """Whether this process writes through the store's node writer."""
        return self._s.through_node_writer

    # ------------------------------------------------------------ lifetime
    def close(self):
        """Closes the store; tags begun and not committed are aborted."""
        self._s.close()

    @property
    def closed(self):
        return self._s.closed

    @property
    def read_only(self):
        return self._s.read_only

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        state = "closed" if self.closed else ("read-only" if self.read_only else "writable")
        return "ckptkv.Store(%r, %s)" % (self.path, state)

    # ------------------------------------------------------------- reading
    def tags(self):
        """Every committed tag, oldest first, as dicts with the fields of
        ``kv-browser tags --json`` (tag, latest, sequence, committed_at,
        files, tensors, logical_bytes, new_bytes, shared_bytes, ...)."""
        return json.loads(self._s.tags_json())

    def latest(self):
        """The tag ``latest`` points at, or None in an empty store."""
        return self._s.latest()

    def resolve(self, tag):
        """``tag``, or for None / "latest" the latest tag."""
        if tag is None or tag == "latest":
            latest = self._s.latest()
            if latest is None:
                raise NotFoundError("store '%s' has no committed tag" % self.path)
            return latest
        return tag

    def tag(self, tag="latest"):
        """What the commit of ``tag`` recorded (files, bytes, sequence)."""
        return self._s.tag(self.resolve(tag))

    def __contains__(self, tag):
        try:
            self._s.tag(tag)
            return True
        except NotFoundError:
            return False

    def files(self, tag="latest"):
        """The files of a committed tag, sorted."""
        return self._s.files(self.resolve(tag))

    def load(self, tag="latest", file="state.pt", map_location=None, *, strict=False):
        """The saved value of ``file`` in ``tag``, as torch.load returns it.

        ``map_location`` is torch.load's. Objects of classes that are not
        allowed come back as ckptkv.Record, or raise UnknownClassError with
        ``strict=True``.
        """
        for attempt in range(3):
            try:
                resolved = self.resolve(tag)
                where = "%s/%s" % (resolved, file)
                return self._s.load(resolved, file, _objects.make_rebuild(where, strict),
                                    tensor_hook(map_location, where))
            except (NotFoundError, CorruptionError):
                # A read-only view opened while a writer flushed can see
                # `latest` before the tag, or miss a block; the answer is
                # given only when a fresh view agrees (docs/architecture.md).
                if not self.read_only or attempt == 2:
                    raise
                self.refresh()

    def refresh(self):
        """A read-only store sees the commits made since it was opened (a
        writable one always sees its own)."""
        if self.read_only:
            fresh = _ckptkv.Store(self.path, False, True, 0, "", self._threads)
            old, self._s = self._s, fresh
            old.close()

    def safe_open(self, tag="latest", file="state.pt"):
        """Lazy access to the tensors of one file (as safetensors' safe_open)."""
        return SafeOpen(self, self.resolve(tag), file)

    # ------------------------------------------------------------- writing
    def begin(self, tag, *, overwrite=False, compress=None, background=False):
        """Starts a tag; returns its Writer. Nothing is visible until commit.

        ``compress`` chooses the codec of the tag's new blocks (None: the
        store's; see Store). ``background=True``: each ``save`` returns once
        the tensors are copied into snapshot buffers (the caller may change
        them right away); hashing and writes run in the background, and
        ``commit`` waits for them. A background write that fails makes
        ``commit`` raise and abort the tag."""
        self._s.begin(tag, bool(overwrite), None if compress is None else _compression(compress))
        return Writer(self, tag, overwrite, background)

    def delete(self, tag):
        """Removes a committed tag (its blocks go at the next gc)."""
        self._s.delete(self.resolve(tag))

    def gc(self, dry_run=False):
        """Removes blocks no tag references; returns what it removed."""
        return json.loads(self._s.gc_json(bool(dry_run)))

    def verify(self, tag=None):
        """Checks a tag (or every tag) as a loader needs it; returns the report
        of ``kv-browser verify --json`` (``report["ok"]``, ``problems``)."""
        return json.loads(self._s.verify_json(None if tag is None else self.resolve(tag)))

    # -------------------------------------------------------------- counters
    def block_bytes_read(self):
        """Raw bytes of the blocks this handle has read (for tests and tools)."""
        return self._s.block_bytes_read()

    def disk_bytes(self):
        """Bytes of the store's files on disk."""
        return self._s.disk_bytes()


class Writer:
    """One pending tag: save files into it, then commit (or abort).

    As a context manager it commits when the block ends normally and aborts
    when it raises."""

    def __init__(self, store, tag, overwrite, background=False):
        self.store = store
        self.tag = tag
        self._overwrite = overwrite
        self._background = bool(background)
        self._done = False
        self.info = None

    def save(self, obj, file="state.pt", *, place=False):
        """Saves ``obj`` as ``file`` of the tag (replacing an earlier save of
        that file). Only chunks the store does not hold are written.
        ``place`` records DeepSpeed fragment placements (the engine does).
        In a background writer it returns after the snapshot
        (``background``, ``snapshot_bytes``, ``blocked_seconds``); the
        write's cost is in the commit's info."""
        self._check()
        where = "%s/%s" % (self.tag, file)

        def lower(value, path):
            return _objects.lower(value, path, where)

        return self.store._s.save(self.tag, file, obj, lower, bool(place), self._background)

    def commit(self, *, set_latest=True):
        """Makes the tag visible, atomically and durably; returns its info."""
        self._check()
        self.info = self.store._s.commit(self.tag, bool(set_latest), self._overwrite)
        self._done = True
        return self.info

    def abort(self):
        """Forgets the tag; its new blocks await gc."""
        if not self._done:
            self._done = True
            self.store._s.abort(self.tag)

    def _check(self):
        if self._done:
            raise InvalidArgumentError("tag '%s' is already %s" % (
                self.tag, "committed" if self.info is not None else "aborted"))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._done:
            return False
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


class SafeOpen:
    """The tensors of one saved file, read on demand.

    ``keys()`` are the tensors' param paths (dict keys and list indices
    joined by "/": "module/layer.weight"); ``get_tensor(name)`` reads one;
    ``get_slice(name)`` reads only the chunks a slice needs."""

    def __init__(self, store, tag, file):
        self.store = store
        self.tag = tag
        self.file = file
        self._keys = store._s.params(tag, file)

    def keys(self):
        return list(self._keys)

    def __contains__(self, name):
        return name in self._keys

    def _check(self, name):
        if name not in self._keys:
            raise NotFoundError("%s/%s has no tensor '%s'; it has %d, e.g. %s" % (
                self.tag, self.file, name, len(self._keys), ", ".join(self._keys[:5])))

    def get_tensor(self, name):
        self._check(name)
        return self.store._s.read_tensor(self.tag, self.file, name)

    def get_slice(self, name):
        self._check(name)
        return TensorSlice(self, name, self.store._s.tensor_info(self.tag, self.file, name))

    def metadata(self):
        info = self.store._s.tag(self.tag)
        return {"format": "ckptkv", "tag": self.tag, "file": self.file,
                "committed_at_ms": str(info["committed_at_ms"]),
                "tensors": str(len(self._keys))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class TensorSlice:
    """One stored tensor, indexed like a numpy array without reading it all."""

    def __init__(self, reader, name, info):
        self._reader = reader
        self.name = name
        self._shape = list(info["shape"])
        self._dtype = info["dtype"]

    def get_shape(self):
        return list(self._shape)

    def get_dtype(self):
        """The dtype's name, as safetensors gives it ("float32", "bfloat16")."""
        return self._dtype

    @property
    def dtype(self):
        return _DTYPES[self._dtype]

    @property
    def shape(self):
        return torch.Size(self._shape)

    def __getitem__(self, index):
        shape = self._shape
        if not isinstance(index, tuple):
            index = (index,)
        real = sum(1 for i in index if i is not None and i is not Ellipsis)
        if sum(1 for i in index if i is Ellipsis) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if real > len(shape):
            raise IndexError("too many indices for a tensor of %d dimensions" % len(shape))
        expanded = []
        for i in index:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (len(shape) - real))
            else:
                expanded.append(i)
        if Ellipsis not in index:
            expanded.extend([slice(None)] * (len(shape) - real))
        strides = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 1]
        first = 0
        out_sizes, out_strides = [], []
        empty = False
        d = 0
        for i in expanded:
            if i is None:
                out_sizes.append(1)
                out_strides.append(0)
                continue
            n = shape[d]
            if isinstance(i, slice):
                start, stop, step = i.indices(n)
                if step <= 0:
                    raise ValueError("slices of a stored tensor need a positive step")
                count = max(0, (stop - start + step - 1) // step)
                empty = empty or count == 0
                first += start * strides[d] if count else 0
                out_sizes.append(count)
                out_strides.append(step * strides[d])
            else:
                try:
                    k = int(i.__index__())
                except AttributeError:
                    raise TypeError("indices must be ints, slices, None or ...; got %s"
                                    % type(i).__name__) from None
                if k < -n or k >= n:
                    raise IndexError("index %d is out of bounds for dimension %d with size %d"
                                     % (k, d, n))
                first += (k % n) * strides[d]
            d += 1
        if empty:
            return torch.empty(out_sizes, dtype=self.dtype)
        last = first + sum((s - 1) * st for s, st in zip(out_sizes, out_strides))
        flat = self._reader.store._s.read_elements(self._reader.tag, self._reader.file,
                                                   self.name, first, last - first + 1)
        return flat.as_strided(out_sizes, out_strides, 0).clone()
