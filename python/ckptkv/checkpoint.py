"""DeepSpeed's ``deepspeed.checkpoint`` over checkpoints kept in a ckptkv store.

The public names of ``deepspeed.checkpoint`` with DeepSpeed's signatures and
results: the reshape maps (:func:`reshape_meg_2d_parallel`,
:class:`meg_2d_parallel_map`, :class:`model_3d_desc`,
:func:`get_model_3d_descriptor`), the readers :class:`ZeROCheckpoint` and
:class:`DeepSpeedCheckpoint`, :func:`merge_state`, the file-name helpers,
:func:`clone_tensors_for_torch_save`, :func:`enable_universal_checkpoint`
and the checkpoint constants. The maps and the layout of a tag come from the
C++ layer (``ckptkv._ckptkv.checkpoint``).

Where DeepSpeed takes a tag directory ``<save_dir>/<tag>``, these take one
too; its store is ``<save_dir>/ckptkv-store`` (where
``ckptkv.deepspeed.KvCheckpointEngine`` keeps it), or the store a placeholder
file in the directory names. Or give the store and the tag directly::

    ds = DeepSpeedCheckpoint("/ckpt/global_step100", tp_degree=1)
    ds = DeepSpeedCheckpoint(store="/ckpt/ckptkv-store", tag="global_step100")

Files are listed from the store and loaded from it; DeepSpeed's file orders
(``get_files_with_prefix``, ``get_zero_files``) apply to the store's names.
File lists are paths under the tag directory when one was given, else the
store's file names.

Beyond DeepSpeed, the store's own queries, as the ``ckptkv`` CLI has them:
:func:`reshape` (any layout, re-partitioned exactly as DeepSpeed lays ZeRO
state out when training at it), :func:`plan_reshape`,
:func:`export_universal`, :func:`import_universal` and :func:`synth`; each
returns its report as a dict.

Where DeepSpeed asserts or raises RuntimeError about a checkpoint's layout,
this module raises :class:`DeepSpeedCheckpointError`, which is all of
ckptkv's InvalidArgumentError, AssertionError and RuntimeError.
"""
import collections
import contextlib
import dataclasses
import os
import re
from typing import List, Tuple, Union

import torch

from . import errors
from ._ckptkv import checkpoint as _cc
from .store import Store

# --------------------------------------------------------------- constants
# deepspeed/checkpoint/constants.py: optimizer file keys.
OPTIMIZER_STATE_DICT = "optimizer_state_dict"
FP32_GROUPS = "fp32_groups"
FP32_FLAT_GROUPS = "fp32_flat_groups"
BASE_OPTIMIZER_STATE = "base_optimizer_state"
BASE_OPTIMIZER_STATE_STEP = "base_optimizer_state_step"
SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"
PARAM_GROUPS = "param_groups"
GROUP_PADDINGS = "group_paddings"
PARTITION_COUNT = "partition_count"
ZERO_STAGE = "zero_stage"
CLIP_GRAD = "clip_grad"
FP32_WEIGHT_KEY = "fp32"
LOSS_SCALER = "loss_scaler"

# Model file keys.
PARAM = "param"
PARAM_SHAPES = "param_shapes"
BUFFER_NAMES = "buffer_names"
FROZEN_PARAM_SHAPES = "frozen_param_shapes"
FROZEN_PARAM_FRAGMENTS = "frozen_param_fragments"

# File names.
MODEL_FILE_PREFIX = "mp_rank_"
ZERO_FILE_PREFIX = "zero_pp_rank_"
OPTIM_FILE_SUFFIX = "_optim_states.pt"
MODEL_FILE_SUFFIX = "_model_states.pt"
LAYER_FILE_PREFIX = "layer_"
BF16_ZERO_FILE_PREFIX = "bf16_" + ZERO_FILE_PREFIX
FP16_ZERO_FILE_PREFIX = "fp16_" + ZERO_FILE_PREFIX

DS_VERSION = "ds_version"

# Universal checkpoint keys.
UNIVERSAL_CHECKPOINT_INFO = "universal_checkpoint_info"
UNIVERSAL_CHECKPOINT_VERSION_KEY = "universal_checkpoint_version"
UNIVERSAL_CHECKPOINT_VERSION_VALUE = 0.4
VOCAB_TENSOR = "vocab_tensor"
PADDED_VOCAB_SIZE = "padded_vocab_size"
ORIGINAL_VOCAB_SIZE = "original_vocab_size"
PARAM_SLICE_MAPPINGS = "param_slice_mappings"
CAT_DIM = "cat_dim"
PARAM_N_SUB_PARAMS = "param_n_sub_params"
SUB_PARAM_SHAPE = "sub_param_shape"
VOCABULARY_PARAMETER_PATTERNS = "vocabulary_parameter_patterns"
PIPELINE_REPLICATED_PARAMETER_PATTERNS = "pipeline_replicated_parameter_patterns"
PARAMETER_TO_AVERAGE_PATTERNS = "parameter_to_average_patterns"
PARAMETER_WITH_ROW_PARALLELISM_PATTERNS = "parameter_with_row_parallelism_patterns"
TP_REPLICATED_PARAMETER_PATTERNS = "tp_replicated_parameter_patterns"
PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0 = "parameter_with_2_sub_params_cat_dim_0"
PARAMETER_WITH_SUB_PARAMS = "parameter_with_sub_params"

# deepspeed_checkpoint.py.
EMBEDDING_LAYER_INDEX = 0
FINAL_LAYER_NORM_INDEX = -1
ARGS_KEY = "args"
CHECKPOINT_INFO_KEY = "checkpoint_info"
ITERATION_KEY = "iteration"
LAYER_FILE_PREFIX_PATTERN = r"layer_(\d+)-model_.*"
SEQUENTIAL_LAYERS = [
    "input_layernorm.weight", "input_layernorm.bias", "self_attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_4h_to_h.bias", "position_embeddings.weight",
]
LAYER_CONCAT_DIM = {"self_attention.dense.weight": 1, "mlp.dense_4h_to_h.weight": 1}

# reshape_3d_utils.py and zero_checkpoint.py.
PP_DIM = "PP"
TP_DIM = "TP"
DP_DIM = "DP"
GROUP_STATE_KEY = "state"

# Where ckptkv.deepspeed.KvCheckpointEngine keeps a save_dir's store.
DEFAULT_STORE_DIR = "ckptkv-store"


class DeepSpeedCheckpointError(errors.InvalidArgumentError, AssertionError, RuntimeError):
    """A checkpoint layout DeepSpeed refuses (with an assert or a
    RuntimeError): catch it as either, or as ckptkv.InvalidArgumentError."""


class _Translate:
    """Turns the C++ layer's InvalidArgument about a layout into
    DeepSpeedCheckpointError (DeepSpeed's assert / RuntimeError)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, errors.InvalidArgumentError) \
                and not issubclass(exc_type, DeepSpeedCheckpointError):
            raise DeepSpeedCheckpointError(str(exc)) from exc
        return False


def _check(cond, message):
    if not cond:
        raise DeepSpeedCheckpointError(message)


# ------------------------------------------------------- tags and stores
def _find_store(path):
    """(store directory, path relative to the directory holding it) for a
    path under ``<save_dir>``, whose store is ``<save_dir>/ckptkv-store``;
    else None."""
    path = os.path.abspath(os.fspath(path))
    cur = path
    while True:
        parent = os.path.dirname(cur)
        candidate = os.path.join(parent, DEFAULT_STORE_DIR)
        if os.path.isdir(candidate) and cur != candidate:
            return candidate, os.path.relpath(path, parent)
        if parent == cur:
            return None
        cur = parent


def _placeholder_store(tag_dir):
    """(store, tag) that a placeholder file in ``tag_dir`` names, or None."""
    try:
        from .deepspeed import read_placeholder
    except ImportError:  # pragma: no cover - the engine module is optional here
        return None
    try:
        names = sorted(os.listdir(tag_dir))
    except OSError:
        return None
    for name in names:
        p = os.path.join(tag_dir, name)
        if os.path.isfile(p):
            ph = read_placeholder(p)
            if ph is not None:
                return ph["store"], ph["tag"]
    return None


class _TagSource:
    """One committed tag of a store: its files and their loads. ``dir`` is
    the tag directory the caller named (file lists are paths under it), or
    None (file lists are the store's names)."""

    def __init__(self, dir=None, store=None, tag=None):
        self.owned = False
        if isinstance(dir, Store):
            dir, store = None, dir
        if store is not None:
            if isinstance(store, Store):
                self.store = store
            else:
                self.store = Store(store, create=False, read_only=True)
                self.owned = True
            self.tag = self.store.resolve(tag)
            self.dir = None if dir is None else os.fspath(dir)
        else:
            if dir is None:
                raise errors.InvalidArgumentError(
                    "give the tag directory <save_dir>/<tag>, or store= and tag=")
            self.dir = os.fspath(dir)
            found = _find_store(self.dir)
            if found is not None:
                store_dir, rel = found
                tag = rel.split(os.sep)[0] if tag is None else tag
                if rel != tag:
                    raise errors.InvalidArgumentError(
                        "'%s' is not a tag directory <save_dir>/<tag> of the store %s"
                        % (self.dir, store_dir))
            else:
                named = _placeholder_store(self.dir)
                if named is None:
                    raise errors.NotFoundError(
                        "no ckptkv store for '%s': expected %s beside it (or a ckptkv "
                        "placeholder file in it); or pass store= and tag="
                        % (self.dir, os.path.join(os.path.dirname(os.path.abspath(self.dir)),
                                                  DEFAULT_STORE_DIR)))
                store_dir, tag = named
            self.store = Store(store_dir, create=False, read_only=True)
            self.owned = True
            self.tag = tag
        self.names = self.store.files(self.tag)

    def path(self, name):
        """The path DeepSpeed would give file ``name``."""
        return os.path.join(self.dir, name) if self.dir is not None else name

    def paths(self, names):
        return [self.path(n) for n in names]

    def name(self, path):
        """The store's file name of a path from ``paths``."""
        path = os.fspath(path)
        if self.dir is not None:
            prefix = os.path.join(self.dir, "")
            if path.startswith(prefix):
                return path[len(prefix):].replace(os.sep, "/")
        return path

    def load(self, path):
        return self.store.load(self.tag, self.name(path), map_location=torch.device("cpu"))

    def close(self):
        if self.owned:
            self.store.close()


def _source(dir, store, tag):
    return dir if isinstance(dir, _TagSource) else _TagSource(dir, store, tag)


@contextlib.contextmanager
def _opened(dir, store, tag):
    """_source for one call: a store it opened is closed after it."""
    src = _source(dir, store, tag)
    try:
        yield src
    finally:
        if src is not dir:
            src.close()


def get_files(dir, *, store=None, tag=None):
    """Every file of the tag (DeepSpeed's recursive listing of the folder)."""
    with _opened(dir, store, tag) as src:
        return src.paths(src.names)


def get_files_with_prefix(all_files, prefix):
    """The files whose last path component starts with ``prefix``, sorted."""
    return _cc.get_files_with_prefix([os.fspath(f) for f in all_files], prefix)


def get_zero_files(dir, *, store=None, tag=None):
    """The tag's ZeRO optimizer files: the first non-empty set of
    ``zero_pp_rank_``, ``fp16_zero_pp_rank_``, ``bf16_zero_pp_rank_`` files,
    sorted numerically by (dp, mp). Only ``*optim_states.pt`` files are
    taken (DeepSpeed's prefix scan would also take ZeRO-3 model files)."""
    with _opened(dir, store, tag) as src:
        return src.paths(_cc.get_zero_files(src.names))


def basic_folder_validation(dir, *, store=None, tag=None):
    """The tag exists (DeepSpeed: the folder exists and is a folder)."""
    with _opened(dir, store, tag):
        pass


# ------------------------------------------------------------ reshape maps
def partition_data(data_list, num_partitions):
    """``data_list`` cut into ``num_partitions`` contiguous equal slices."""
    with _Translate():
        parts = _cc.partition_data(list(range(len(data_list))), int(num_partitions))
    out = []
    for part in parts:
        first = part[0] if part else 0
        out.append(data_list[first:first + len(part)])
    return out


def _key(pp_index, tp_index):
    return "%d,%d" % (pp_index, tp_index)


class meg_2d_parallel_map:  # noqa: N801 - DeepSpeed's name
    """(pp, tp) cell -> list of source file indices, as the dict ``map``
    keyed ``"pp,tp"``."""

    def __init__(self, pp_degree, tp_degree):
        self.pp_degree = pp_degree
        self.tp_degree = tp_degree
        self.map = {}

    def simple_init(self):
        """Index i -> cell (i // tp, i % tp), value [i]."""
        m = _cc.Meg2dParallelMap(int(self.pp_degree), int(self.tp_degree))
        m.simple_init()
        self.map = {_key(pp, tp): list(idx) for pp, tp, idx in m.cells()}

    def add_data(self, pp_index, tp_index, data):
        """Appends the list ``data`` to cell (pp_index, tp_index)."""
        self._validate_indices(pp_index, tp_index)
        _check(type(data) is list, "data must be a list, not %s" % type(data).__name__)
        self.map.setdefault(_key(pp_index, tp_index), [])
        self.map[_key(pp_index, tp_index)] += data

    def get_data(self, pp_index=None, tp_index=None, *, pp=None, tp=None):
        """The cells' lists concatenated, pp-major then tp; an index of None
        means every index of that axis (``pp=`` / ``tp=`` are aliases)."""
        if pp is not None:
            _check(pp_index is None, "give pp_index or pp, not both")
            pp_index = pp
        if tp is not None:
            _check(tp_index is None, "give tp_index or tp, not both")
            tp_index = tp
        self._validate_indices(pp_index, tp_index)
        pps = range(self.pp_degree) if pp_index is None else [pp_index]
        tps = range(self.tp_degree) if tp_index is None else [tp_index]
        out = []
        for i in pps:
            for j in tps:
                out += self.map[_key(i, j)]
        return out

    def print_data(self, tag):
        print("%s" % tag)
        for key, value in self.map.items():
            print("%s = %s" % (key, value))

    def _validate_indices(self, pp_index, tp_index):
        _check(pp_index is None or pp_index < self.pp_degree,
               "pp index %s >= pp degree %s" % (pp_index, self.pp_degree))
        _check(tp_index is None or tp_index < self.tp_degree,
               "tp index %s >= tp degree %s" % (tp_index, self.tp_degree))

    def __repr__(self):
        return "meg_2d_parallel_map(pp_degree=%r, tp_degree=%r, map=%r)" % (
            self.pp_degree, self.tp_degree, self.map)


def _from_cpp(cpp_map, tp_major=False):
    """A C++ Meg2dParallelMap as a meg_2d_parallel_map whose dict has the
    insertion order DeepSpeed's construction gives it."""
    m = meg_2d_parallel_map(cpp_map.pp_degree, cpp_map.tp_degree)
    cells = {(pp, tp): list(idx) for pp, tp, idx in cpp_map.cells()}
    order = sorted(cells, key=(lambda c: (c[1], c[0])) if tp_major else None)
    m.map = {_key(pp, tp): cells[(pp, tp)] for pp, tp in order}
    return m


def reshape_meg_2d_parallel(old_pp_degree, old_tp_degree, new_pp_degree, new_tp_degree,
                            verbose=False):
    """The simple (old_pp, old_tp) map contracted to (new_pp, new_tp): TP
    first (each pp row cut into new_tp groups), then PP (each tp column cut
    into new_pp groups). Only contractions by exact division."""
    args = [int(old_pp_degree), int(old_tp_degree), int(new_pp_degree), int(new_tp_degree)]
    with _Translate():
        final = _cc.reshape_meg_2d_parallel(*args)
        if verbose:
            original = _cc.Meg2dParallelMap(args[0], args[1])
            original.simple_init()
            _from_cpp(original).print_data("original_2d_map:")
            after_tp = _cc.reshape_meg_2d_parallel(args[0], args[1], args[0], args[3])
            _from_cpp(after_tp).print_data("after_tp_reshape:")
    # The PP step fills cells column by column.
    result = _from_cpp(final, tp_major=args[2] != args[0])
    if verbose:
        result.print_data("final_2d_map:")
    return result


class model_3d_desc:  # noqa: N801 - DeepSpeed's name
    """A (pp, tp, dp) layout."""

    def __init__(self, pp_degree=1, tp_degree=1, dp_degree=1):
        self.pp_degree = pp_degree
        self.tp_degree = tp_degree
        self.dp_degree = dp_degree

    def _cpp(self):
        return _cc.Model3dDesc(int(self.pp_degree), int(self.tp_degree), int(self.dp_degree))

    def reshape(self, target_3d_desc, verbose=False):
        """One meg_2d_parallel_map per target DP rank, over ZeRO file
        indices (dp * pp * tp + mp): the 2D reshape, each model index idx
        widened to [idx + i * pp * tp for i < dp], each cell's list cut into
        target dp groups."""
        ok, reasons = self.can_reshape(target_3d_desc)
        _check(ok, ",".join(reasons))
        if verbose:
            reshape_meg_2d_parallel(self.pp_degree, self.tp_degree, target_3d_desc.pp_degree,
                                    target_3d_desc.tp_degree, verbose=True)
        with _Translate():
            maps = self._cpp().reshape(target_3d_desc._cpp())
        return [_from_cpp(m) for m in maps]

    def get_desc(self):
        return self._cpp().get_desc()

    def world_size(self):
        return self.pp_degree * self.tp_degree * self.dp_degree

    def is_valid(self, pp_index, tp_index, dp_index):
        """(bool, reasons): each index below its degree."""
        ok, reasons = self._cpp().is_valid(int(pp_index), int(tp_index), int(dp_index))
        return ok, list(reasons)

    def can_reshape(self, target_3d_desc):
        """(bool, reasons): no dimension of the target is larger."""
        ok, reasons = self._cpp().can_reshape(target_3d_desc._cpp())
        return ok, list(reasons)

    def __repr__(self):
        return "model_3d_desc(pp_degree=%r, tp_degree=%r, dp_degree=%r)" % (
            self.pp_degree, self.tp_degree, self.dp_degree)


def get_model_3d_descriptor(dir, *, store=None, tag=None):
    """The (pp, tp, dp) a tag was saved at, as DeepSpeed finds it: from
    checkpoint_parallel_dimensions of the model files when they all carry
    it, else from the counts of mp_rank_* and layer_01* files; dp from the
    number of ZeRO files."""
    with _opened(dir, store, tag) as src, _Translate():
        d = _cc.get_model_3d_descriptor(src.store._s, src.tag)
    return model_3d_desc(pp_degree=d.pp, tp_degree=d.tp, dp_degree=d.dp)


def discover_tag_layout(store, tag="latest"):
    """The C++ layer's view of a tag: its files by role (DeepSpeed's orders),
    its (pp, tp, dp) as a model_3d_desc, and whether it is universal."""
    with _opened(None, store, tag) as src:
        d = _cc.discover_tag_layout(src.store._s, src.tag)
    deg = d["degrees"]
    d["degrees"] = model_3d_desc(pp_degree=deg.pp, tp_degree=deg.tp, dp_degree=deg.dp)
    return d


# ----------------------------------------------------------------- merging
def merge_state(state_a, state_b, key_list=[]):  # noqa: B006 - DeepSpeed's signature
    """DeepSpeed's merge of two files' states.

    Both must be of the same type (else ValueError). dict / OrderedDict:
    b's keys in b's order, keys in both merged, keys only in b copied, keys
    only in a dropped. list / tuple: the same length, merged element by
    element. Tensors: torch.cat along dim 0. Anything else: a."""
    if type(state_a) is not type(state_b):
        raise errors.InvalidArgumentError(
            "cannot merge a %s with a %s at '%s'" % (
                type(state_a).__name__, type(state_b).__name__, "+".join(key_list)))
    if type(state_a) in (dict, collections.OrderedDict):
        merged = type(state_a)()
        for key, value in state_b.items():
            if key in state_a:
                merged[key] = merge_state(state_a[key], value, list(key_list) + [str(key)])
            else:
                merged[key] = value
        return merged
    if type(state_a) in (list, tuple):
        if len(state_a) != len(state_b):
            raise errors.InvalidArgumentError(
                "cannot merge lists of different lengths at '%s': %d and %d"
                % ("+".join(key_list), len(state_a), len(state_b)))
        return type(state_a)(merge_state(a, b, key_list) for a, b in zip(state_a, state_b))
    if torch.is_tensor(state_a):
        return torch.cat([state_a, state_b], 0)
    return state_a


# ------------------------------------------------------------- file names
def get_model_ckpt_name_for_rank(base_folder, mp_rank_str):
    """``base_folder/mp_rank_<mp_rank_str>_model_states.pt``."""
    return os.path.join(base_folder, MODEL_FILE_PREFIX + mp_rank_str + MODEL_FILE_SUFFIX)


def get_zero_ckpt_name_for_rank(base_folder, dp_rank, mp_rank):
    """``base_folder/zero_pp_rank_<dp>_mp_rank_<mp:02d>_optim_states.pt``."""
    return os.path.join(base_folder, "%s%s_%s%02d%s" % (
        ZERO_FILE_PREFIX, dp_rank, MODEL_FILE_PREFIX, mp_rank, OPTIM_FILE_SUFFIX))


def get_layer_ckpt_name_for_rank(base_folder, layer_id, tp_rank):
    """``base_folder/<layer_id>-model_<tp:02d>_model_states.pt``."""
    return os.path.join(base_folder, "%s-model_%02d%s" % (layer_id, tp_rank, MODEL_FILE_SUFFIX))


def clone_tensors_for_torch_save(item, device=torch.device("cpu")):
    """``item`` with every tensor (in lists, tuples and dicts) copied to
    ``device`` as its own storage: ``detach().clone()`` when already there,
    else ``detach().to(device)``. Other values are returned as they are."""
    if torch.is_tensor(item):
        device = torch.device(device) if isinstance(device, str) else device
        if item.device == device:
            return item.detach().clone()
        return item.detach().to(device)
    if isinstance(item, list):
        return [clone_tensors_for_torch_save(v, device) for v in item]
    if isinstance(item, tuple):
        return tuple(clone_tensors_for_torch_save(v, device) for v in item)
    if isinstance(item, dict):
        return type(item)({k: clone_tensors_for_torch_save(v, device) for k, v in item.items()})
    return item


# --------------------------------------------------------- ZeROCheckpoint
class ZeROCheckpoint:
    """The ZeRO optimizer files of a tag and, for a (smaller) target layout,
    the files each target rank takes and their merged state.

    Merging DP files concatenates flat partitions, as DeepSpeed does; only
    :func:`reshape` (or a universal checkpoint) re-partitions correctly."""

    def __init__(self, dir=None, source_3d=None, *, store=None, tag=None):
        self._src = _source(dir, store, tag)
        self.dir = self._src.dir
        self.file_list = self._src.paths(_cc.get_zero_files(self._src.names))
        self.num_files = len(self.file_list)
        _check(self.num_files > 0, "no ZeRO files found in %s" % (
            self.dir or "tag '%s'" % self._src.tag))
        self.src_3d = source_3d if source_3d is not None else get_model_3d_descriptor(self._src)
        self.target_3d = model_3d_desc(pp_degree=self.src_3d.pp_degree,
                                       tp_degree=self.src_3d.tp_degree,
                                       dp_degree=self.src_3d.dp_degree)
        self._3d_file_map = self.src_3d.reshape(self.target_3d)

    def get_src_world_size(self):
        return self.src_3d.world_size()

    def get_src_tp_degree(self):
        return self.src_3d.tp_degree

    def get_src_pp_degree(self):
        return self.src_3d.pp_degree

    def get_src_dp_degree(self):
        return self.src_3d.dp_degree

    def get_file_indices_for_rank(self, pp_index, tp_index, dp_index):
        _check(dp_index < len(self._3d_file_map), "DP index %d >= DP degree %d" % (
            dp_index, len(self._3d_file_map)))
        return self._3d_file_map[dp_index].get_data(pp_index, tp_index)

    def get_files_for_rank(self, pp_index, tp_index, dp_index):
        return [self.file_list[i]
                for i in self.get_file_indices_for_rank(pp_index, tp_index, dp_index)]

    def get_state_for_rank(self, pp_index, tp_index, dp_index, keys_to_ignore=[],  # noqa: B006
                           strip_tensor_paddings=True):
        """The rank's files loaded in order, ``keys_to_ignore`` dropped,
        paddings stripped, merged with merge_state; partition_count set to
        the target DP degree and (when stripping) group_paddings to zeros."""
        merged = None
        for path in self.get_files_for_rank(pp_index, tp_index, dp_index):
            sd = self._src.load(path)
            for key in keys_to_ignore:
                sd.pop(key, None)
            if strip_tensor_paddings:
                self._strip_tensor_paddings(sd)
            merged = sd if merged is None else merge_state(merged, sd)
            self._update_partition_count(merged)
            if strip_tensor_paddings:
                self._clear_group_paddings(merged)
        return merged

    def print_3d_index_map(self, tag=None):
        if tag:
            print("3D index map: %s" % tag)
        for dp_index, m in enumerate(self._3d_file_map):
            m.print_data("dp = %d" % dp_index)

    def print_3d_file_map(self, tag=None):
        # DeepSpeed's iterates over the degrees themselves (a TypeError); this
        # prints what it means to.
        if tag:
            print("3D file map: %s" % tag)
        for dp_index, m in enumerate(self._3d_file_map):
            for pp_index in range(m.pp_degree):
                for tp_index in range(m.tp_degree):
                    files = [self.file_list[i] for i in m.get_data(pp_index, tp_index)]
                    print("%d, %d, %d => %s" % (pp_index, tp_index, dp_index, files))

    def reshape(self, target_3d_desc):
        self.target_3d = target_3d_desc
        self._3d_file_map = self.src_3d.reshape(self.target_3d)

    def close(self):
        """Closes the store this checkpoint opened (not one passed in)."""
        self._src.close()

    @staticmethod
    def _optimizer_state(sd, key):
        osd = sd.get(OPTIMIZER_STATE_DICT) if isinstance(sd, dict) else None
        return osd.get(key) if isinstance(osd, dict) else None

    def _strip_tensor_paddings(self, sd):
        base = self._optimizer_state(sd, BASE_OPTIMIZER_STATE)
        groups = base.get(GROUP_STATE_KEY) if isinstance(base, dict) else None
        paddings = self._optimizer_state(sd, GROUP_PADDINGS)
        if not isinstance(groups, dict) or paddings is None:
            return
        for g, group_state in groups.items():
            pad = paddings[g]
            if pad == 0:
                continue
            for name, value in list(group_state.items()):
                if name != "step" and torch.is_tensor(value):
                    _check(pad <= value.numel(), "padding %d of group %s exceeds its '%s' of %d "
                           "elements" % (pad, g, name, value.numel()))
                    group_state[name] = torch.narrow(value, 0, 0, value.numel() - pad).clone()

    def _clear_group_paddings(self, sd):
        paddings = self._optimizer_state(sd, GROUP_PADDINGS)
        if paddings:
            sd[OPTIMIZER_STATE_DICT][GROUP_PADDINGS] = [0] * len(paddings)

    def _update_partition_count(self, sd):
        counts = self._optimizer_state(sd, PARTITION_COUNT)
        if isinstance(counts, int) and not isinstance(counts, bool):
            # ZeRO-3 records one int (DeepSpeed's len() of it fails).
            sd[OPTIMIZER_STATE_DICT][PARTITION_COUNT] = self.target_3d.dp_degree
        elif counts:
            sd[OPTIMIZER_STATE_DICT][PARTITION_COUNT] = [self.target_3d.dp_degree] * len(counts)


# ----------------------------------------------------- DeepSpeedCheckpoint
class DeepSpeedCheckpoint:
    """A DeepSpeed (Megatron-DeepSpeed) checkpoint tag read at a target
    (tp, pp, dp) no larger than the one it was saved at: which source files
    each target rank takes, and their merged states."""

    def __init__(self, dir=None, tp_degree=None, pp_degree=None, dp_degree=None,
                 final_layer_norm_idx=FINAL_LAYER_NORM_INDEX, *, store=None, tag=None):
        self._src = _source(dir, store, tag)
        self.dir = self._src.dir
        self.final_layer_norm_idx = final_layer_norm_idx
        self.file_list = self._src.paths(self._src.names)
        pattern = re.compile(LAYER_FILE_PREFIX_PATTERN)
        self.layer_files = [f for f in get_files_with_prefix(self.file_list, LAYER_FILE_PREFIX)
                            if pattern.fullmatch(os.path.basename(f))]
        self._validate_folder(bool(self.layer_files))
        self.mp_rank_files = get_files_with_prefix(self.file_list, MODEL_FILE_PREFIX)
        self.zero_checkpoint = ZeROCheckpoint(self._src)
        self.layer_keys = self._get_layer_keys()
        self.layer_count = len(self.layer_keys)
        z = self.zero_checkpoint
        self.tp_degree = z.get_src_tp_degree() if tp_degree is None else tp_degree
        self.pp_degree = z.get_src_pp_degree() if pp_degree is None else pp_degree
        self.dp_degree = z.get_src_dp_degree() if dp_degree is None else dp_degree
        self.original_world_size = (z.get_src_tp_degree() * z.get_src_pp_degree() *
                                    z.get_src_dp_degree())
        self.world_size = self.tp_degree * self.pp_degree * self.dp_degree
        self.old_2d_map = meg_2d_parallel_map(z.get_src_pp_degree(), z.get_src_tp_degree())
        self.old_2d_map.simple_init()
        self.new_2d_map = reshape_meg_2d_parallel(
            old_pp_degree=z.get_src_pp_degree(), old_tp_degree=z.get_src_tp_degree(),
            new_pp_degree=self.pp_degree, new_tp_degree=self.tp_degree)
        if self.is_change_pp_degree() or self.is_change_tp_degree() or \
                self.is_change_dp_degree():
            z.reshape(model_3d_desc(self.pp_degree, self.tp_degree, self.dp_degree))
        self.global_state = {}
        self._sanity_check()
        self.pp_to_transformer_map = self._build_pp_transformer_map()
        self.transformer_file_map = self._build_transformer_file_map()
        self.tp_to_embedding_map = self._build_tp_other_layer_map(EMBEDDING_LAYER_INDEX)
        self.tp_to_final_norm_map = self._build_tp_other_layer_map(self.final_layer_norm_idx)

    # ----------------------------------------------------------- degrees
    def is_change_tp_degree(self):
        return self.tp_degree != self.zero_checkpoint.get_src_tp_degree()

    def is_change_pp_degree(self):
        return self.pp_degree != self.zero_checkpoint.get_src_pp_degree()

    def is_change_dp_degree(self):
        return self.dp_degree != self.zero_checkpoint.get_src_dp_degree()

    # ------------------------------------------------------------ showing
    def show_2d_mapping(self):
        print("reshaped 2d map ---- begin")
        for i in range(self.pp_degree):
            for j in range(self.tp_degree):
                print("[%d, %d] = %s" % (i, j, self.get_2d_parallel_files(tp_index=j,
                                                                         pp_index=i)))
        print("reshaped 2d map ---- end")

    def show_tp_embedding_map(self):
        self._dump_mapping(self.tp_to_embedding_map, "tp_to_embedding_layers")

    def show_tp_final_norm_map(self):
        self._dump_mapping(self.tp_to_final_norm_map, "tp_to_final_norm_layers")

    def show_pp_transformer_map(self):
        self._dump_mapping(self.pp_to_transformer_map, "pp_to_transformer_layers")

    def show_transformer_file_map(self):
        self._dump_mapping(self.transformer_file_map, "rank_to_transformer_files")

    @staticmethod
    def _dump_mapping(data_map, map_tag=None):
        if map_tag is not None:
            print("Dump mapping: %s" % map_tag)
        for k, v in data_map.items():
            print("%s = %s" % (k, v))

    # ------------------------------------------------------ global state
    def _get_checkpoint_value(self, key):
        if key not in self.global_state:
            sd = self._src.load(self.mp_rank_files[0])
            self.global_state[key] = sd.get(key, None)
        return self.global_state[key]

    def get_iteration(self):
        if ITERATION_KEY not in self.global_state:
            sd = self._src.load(self.mp_rank_files[0])
            self.global_state[ITERATION_KEY] = sd.get(ITERATION_KEY, 0)
        return self.global_state[ITERATION_KEY]

    def get_args(self):
        return self._get_checkpoint_value(ARGS_KEY)

    def get_checkpoint_info(self, info_key=CHECKPOINT_INFO_KEY):
        return self._get_checkpoint_value(info_key)

    # -------------------------------------------------------- ZeRO state
    def get_zero_checkpoint_state(self, pp_index, tp_index, dp_index,
                                  strip_tensor_paddings=True):
        return self.zero_checkpoint.get_state_for_rank(
            pp_index=pp_index, tp_index=tp_index, dp_index=dp_index,
            keys_to_ignore=[PARAM_SHAPES], strip_tensor_paddings=strip_tensor_paddings)

    def get_zero_files(self, pp_index, tp_index, dp_index):
        return self.zero_checkpoint.get_files_for_rank(pp_index=pp_index, tp_index=tp_index,
                                                       dp_index=dp_index)

    # ------------------------------------------------------- model files
    def get_2d_parallel_files(self, tp_index, pp_index):
        _check(tp_index < self.tp_degree, "tp index %d >= %d" % (tp_index, self.tp_degree))
        _check(pp_index < self.pp_degree, "pp index %d >= %d" % (pp_index, self.pp_degree))
        return [self.mp_rank_files[i]
                for i in self.new_2d_map.get_data(pp_index=pp_index, tp_index=tp_index)]

    def get_2d_parallel_state(self, tp_index, pp_index):
        """The model files of target rank (tp, pp), merged with merge_state."""
        merged = None
        for path in self.get_2d_parallel_files(tp_index=tp_index, pp_index=pp_index):
            sd = self._src.load(path)
            merged = sd if merged is None else merge_state(merged, sd)
        return merged

    # -------------------------------------------------------- layer files
    def get_embedding_layer_id(self):
        return self.layer_keys[EMBEDDING_LAYER_INDEX]

    def get_final_norm_layer_id(self):
        return self.layer_keys[self.final_layer_norm_idx]

    def get_embedding_files(self, tp_index):
        _check(tp_index in self.tp_to_embedding_map, "no embedding files of tp %s" % tp_index)
        return self.tp_to_embedding_map[tp_index]

    def get_embedding_state(self, tp_index):
        files = self.get_embedding_files(tp_index)
        return self._merge_state_dicts([self._src.load(f) for f in files])

    def get_final_norm_files(self, tp_index):
        _check(tp_index in self.tp_to_final_norm_map, "no final norm files of tp %s" % tp_index)
        return self.tp_to_final_norm_map[tp_index]

    def get_final_norm_state(self, tp_index):
        """The first final-norm file of the TP group (as DeepSpeed: one only)."""
        return self._src.load(self.get_final_norm_files(tp_index)[0])

    def get_pp_transformer_map(self, pp_index):
        _check(pp_index < self.pp_degree, "pp index %d >= %d" % (pp_index, self.pp_degree))
        return self.pp_to_transformer_map[pp_index]

    def get_transformer_state(self, tp_index, pp_index):
        """Per transformer layer of target stage pp, its TP group's files
        merged with the SEQUENTIAL_LAYERS / LAYER_CONCAT_DIM rules."""
        _check(tp_index < self.tp_degree, "tp index %d >= %d" % (tp_index, self.tp_degree))
        _check(pp_index < self.pp_degree, "pp index %d >= %d" % (pp_index, self.pp_degree))
        return [self._merge_state_dicts([self._src.load(f) for f in files])
                for files in self.transformer_file_map[(tp_index, pp_index)]]

    def validate_files(self):
        """Says which listed files the store does not hold."""
        names = set(self._src.names)
        for f in self.file_list:
            if self._src.name(f) not in names:
                print("Error: %s is not existent" % f)

    # ------------------------------------------------------------ private
    def _validate_folder(self, pipeline_parallel):
        prefixes = [MODEL_FILE_PREFIX]
        if pipeline_parallel:
            prefixes += [LAYER_FILE_PREFIX, LAYER_FILE_PREFIX + "01"]
        where = self.dir or "tag '%s'" % self._src.tag
        for prefix in prefixes:
            _check(get_files_with_prefix(self.file_list, prefix),
                   "%s seems a bogus DeepSpeed checkpoint folder: it has no %s* files"
                   % (where, prefix))

    def _get_layer_keys(self):
        pattern = re.compile(LAYER_FILE_PREFIX_PATTERN)
        ids = {pattern.fullmatch(os.path.basename(f)).group(1) for f in self.layer_files}
        return [LAYER_FILE_PREFIX + i for i in sorted(ids, key=int)]

    def _sanity_check(self):
        _check(len(self.mp_rank_files) % self.tp_degree == 0,
               "%d model files do not divide into tp %d" % (len(self.mp_rank_files),
                                                             self.tp_degree))
        _check(self.zero_checkpoint.num_files % (self.pp_degree * self.tp_degree) == 0,
               "%d ZeRO files do not divide into pp %d x tp %d" % (
                   self.zero_checkpoint.num_files, self.pp_degree, self.tp_degree))

    def _build_tp_other_layer_map(self, layer_index):
        if not self.layer_files:
            return {}
        _check(layer_index <= len(self.layer_files), "layer index %d out of range" % layer_index)
        files = get_files_with_prefix(self.layer_files, self.layer_keys[layer_index])
        return dict(enumerate(partition_data(files, self.tp_degree)))

    def _transformer_layer_keys(self):
        return self.layer_keys[1:self.final_layer_norm_idx]

    def _build_pp_transformer_map(self):
        if self.pp_degree <= 0:
            return {}
        keys = self._transformer_layer_keys()
        per_pp = len(keys) // self.pp_degree  # the remainder is dropped, as in DeepSpeed
        return {i: keys[i * per_pp:(i + 1) * per_pp] for i in range(self.pp_degree)}

    def _build_transformer_file_map(self):
        keys = self._transformer_layer_keys()
        per_pp = len(keys) // self.pp_degree if self.pp_degree > 0 else 1
        file_map = {}
        for k, layer_key in enumerate(keys):
            pp_index = k // per_pp
            groups = partition_data(get_files_with_prefix(self.layer_files, layer_key + "-"),
                                    self.tp_degree)
            for tp_index in range(self.tp_degree):
                file_map.setdefault((tp_index, pp_index), []).append(groups[tp_index])
        return file_map

    @staticmethod
    def _merge_state_dicts(sd_list):
        merged = {}
        for key in sd_list[0].keys():
            if key in SEQUENTIAL_LAYERS:
                merged[key] = sd_list[0][key]
            else:
                merged[key] = torch.cat([sd[key] for sd in sd_list],
                                        dim=LAYER_CONCAT_DIM.get(key, 0))
        return merged

    def close(self):
        """Closes the store this checkpoint opened (not one passed in)."""
        self._src.close()


# ------------------------------------------------------ universal loading
@dataclasses.dataclass
class SubparamShape:
    """A parameter made of sub-parameters laid side by side on
    ``partition_dim``: ``shape`` gives that dimension as a tuple of the
    sub-parameters' sizes (``patterns`` name the parameters it applies to)."""
    patterns: List[str]
    shape: Tuple[Union[Tuple[int], int]]
    partition_dim: int


def _universal_files(folder):
    """{state: loader} of a universal parameter folder: a directory of
    ``<state>.pt`` files, or ``<save_dir>/<tag>/zero/<name>`` of a tag in the
    store ``<save_dir>/ckptkv-store``."""
    folder = os.fspath(folder)
    if os.path.isdir(folder):
        out = {}
        for name in os.listdir(folder):
            if name.endswith(".pt") and os.path.isfile(os.path.join(folder, name)):
                path = os.path.join(folder, name)
                # torch's weights_only unpickler: tensors and plain values,
                # no class is imported or called (ckptkv never runs pickle).
                out[name[:-3]] = lambda p=path: torch.load(p, map_location="cpu",
                                                           weights_only=True)
        return out, None
    found = _find_store(folder)
    if found is None:
        raise errors.NotFoundError(
            "universal folder '%s' is neither a directory nor under a save_dir holding a %s"
            % (folder, DEFAULT_STORE_DIR))
    store_dir, rel = found
    tag, _, prefix = rel.replace(os.sep, "/").partition("/")
    store = Store(store_dir, create=False, read_only=True)
    prefix = prefix.rstrip("/") + "/"
    out = {}
    for f in store.files(tag):
        rest = f[len(prefix):]
        if f.startswith(prefix) and "/" not in rest and rest.endswith(".pt"):
            out[rest[:-3]] = lambda f=f: store.load(tag, f, map_location="cpu")
    if not out:
        store.close()
        raise errors.NotFoundError("tag '%s' of %s has no files %s*.pt" % (tag, store_dir,
                                                                          prefix))
    return out, store


def _field(obj, name):
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def _tp_slice(full, ckpt, shape, tp_rank, tp_world_size):
    """This TP rank's slice of a universal parameter (DeepSpeed's rules)."""
    if full.shape == shape:  # replicated (or averaged): every rank takes all of it
        tp_rank, tp_world_size = 0, 1
    if ckpt.get(VOCAB_TENSOR, False):
        rows = shape[0] * tp_world_size
        if rows > full.shape[0]:
            pad = full.new_zeros((rows - full.shape[0],) + tuple(full.shape[1:]))
            full = torch.cat([full, pad], 0)
    _check(full.numel() == tp_world_size * shape.numel(),
           "a universal parameter of %d elements is not %d slices of %s" % (
               full.numel(), tp_world_size, tuple(shape)))
    cat_dim = ckpt.get(CAT_DIM, 0)
    sub = ckpt.get(SUB_PARAM_SHAPE)
    n_sub = ckpt.get(PARAM_N_SUB_PARAMS, 1)
    if sub is not None:
        dim = _field(sub, "partition_dim")
        dims = list(_field(sub, "shape"))
        sizes = dims[dim] if isinstance(dims[dim], (tuple, list)) else (dims[dim],)
        whole = full.view([sum(d) if isinstance(d, (tuple, list)) else d for d in dims])
        pieces, first = [], 0
        for size in sizes:
            pieces.append(whole.narrow(dim, first, size).chunk(tp_world_size, dim)[tp_rank])
            first += size
        return torch.cat(pieces, dim)
    if n_sub > 1:
        return torch.cat([p.chunk(tp_world_size, cat_dim)[tp_rank]
                          for p in full.chunk(n_sub, cat_dim)], cat_dim)
    return full.chunk(tp_world_size, cat_dim)[tp_rank]


def _load_hp_checkpoint_state(self, folder, tp_rank, tp_world_size):
    """Loads this parameter's TP slice of a universal checkpoint folder
    (``<ckpt>/zero/<param name>``); returns the saved step (or None).

    With DeepSpeed's ZeRO mapping (``self._hp_mapping``) the fp32 slice goes
    into its hp fragment and the other states into its ``optim_fragment``,
    narrowed to this rank's fragment, as DeepSpeed does. Without one the
    parameter is the whole fragment: its data takes the fp32 slice and
    ``self.universal_state`` holds every state's slice."""
    files, store = _universal_files(folder)
    try:
        hp = getattr(self, "_hp_mapping", None)
        if hp is not None:
            hp.optim_fragment = {}
        else:
            self.universal_state = {}
        step = None
        for key, load in files.items():
            ckpt = load()
            if key == "step":
                step = ckpt
                continue
            if torch.is_tensor(ckpt):  # ZeRO-3 without TP: the flat tensor itself
                ckpt = {PARAM: ckpt}
            if ckpt.get("is_expert_param", False):
                raise errors.NotSupportedError(
                    "%s/%s.pt is an expert parameter; expert-parallel slicing is not supported"
                    % (folder, key))
            part = _tp_slice(ckpt[PARAM], ckpt, self.shape, tp_rank, tp_world_size).flatten()
            if hp is not None:
                address = hp.lp_fragment_address
                part = part.narrow(0, address.start, address.numel)
                if key == FP32_WEIGHT_KEY:
                    hp.hp_fragment.data.copy_(part.data)
                else:
                    hp.optim_fragment[key] = part.clone().detach()
            else:
                part = part.view(self.shape)
                if key == FP32_WEIGHT_KEY:
                    with torch.no_grad():
                        self.data.copy_(part)
                self.universal_state[key] = part.clone().detach()
        return step
    finally:
        if store is not None:
            store.close()


def enable_universal_checkpoint(param_list):
    """Gives each parameter ``load_hp_checkpoint_state(folder, tp_rank,
    tp_world_size)``, the method DeepSpeed's optimizers call to load a
    universal checkpoint (see _load_hp_checkpoint_state)."""
    for param in param_list:
        param.load_hp_checkpoint_state = _load_hp_checkpoint_state.__get__(param)


# ------------------------------------------------------- store queries
def _writable(store):
    if isinstance(store, Store):
        return store, False
    return Store(store, create=False), True


def _run(store, tag, call):
    s, owned = _writable(store)
    try:
        return call(s, s.resolve(tag))
    finally:
        if owned:
            s.close()


def _degrees(s, tag, tp, pp, dp):
    if tp is not None and pp is not None and dp is not None:
        return int(tp), int(pp), int(dp)
    d = _cc.discover_tag_layout(s._s, tag)["degrees"]
    return (d.tp if tp is None else int(tp), d.pp if pp is None else int(pp),
            d.dp if dp is None else int(dp))


def reshape(store, tag, tp=None, pp=None, dp=None, out_tag=None, device=None, *,
            overwrite=False, set_latest=False):
    """``ckptkv reshape``: writes ``tag`` (a DeepSpeed checkpoint saved with
    placements) at (tp, pp, dp) as ``out_tag`` (default
    ``<tag>_tp<N>_pp<M>_dp<K>``). A degree of None keeps the tag's. Any
    layout, larger or smaller; ZeRO state is re-partitioned as DeepSpeed lays
    it out at the new DP degree. ``device``: where fragments are assembled
    ("cpu", "cuda", "cuda:N"). Returns the report (from, to, out_tag, files,
    tensors, linked_tensors, bytes_read, logical_bytes, new_bytes, seconds,
    tag)."""
    def call(s, t):
        n_tp, n_pp, n_dp = _degrees(s, t, tp, pp, dp)
        return _cc.reshape(s._s, t, n_tp, n_pp, n_dp, out_tag or "", device or "cpu",
                           bool(overwrite), bool(set_latest))
    return _run(store, tag, call)


def plan_reshape(store, tag, tp=None, pp=None, dp=None):
    """``ckptkv reshape --plan``: what a reshape would read, writing nothing:
    model_files {"pp,tp": old mp indices}, zero_files (per new dp rank
    {"pp,tp": old zero-file indices}), bytes_to_read, tensors_linked."""
    def call(s, t):
        return _cc.plan_reshape(s._s, t, *_degrees(s, t, tp, pp, dp))
    return _run(store, tag, call)


def export_universal(store, tag, out_tag=None, device=None, *, overwrite=False,
                     set_latest=False):
    """``ckptkv export-universal`` (ds_to_universal): writes ``tag``'s
    topology-free form as ``out_tag`` (default ``<tag>_universal``):
    zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt, zero/optimizer_state.pt
    and the model-state files. Returns the report."""
    return _run(store, tag, lambda s, t: _cc.export_universal(
        s._s, t, out_tag or "", device or "cpu", bool(overwrite), bool(set_latest)))


def import_universal(store, tag, tp=None, pp=None, dp=None, out_tag=None, device=None, *,
                     zero_stage=2, dtype="bf16", overwrite=False, set_latest=False):
    """``ckptkv import-universal``: writes the universal tag ``tag`` as a
    DeepSpeed checkpoint at (tp, pp, dp), ZeRO ``zero_stage`` and training
    ``dtype`` ("bf16" or "fp32"), as ``out_tag`` (required). A degree of None
    keeps the one the universal tag came from. Returns the report."""
    if not out_tag:
        raise errors.InvalidArgumentError("import_universal of '%s' needs an out_tag" % tag)
    if dtype not in ("bf16", "fp32"):
        raise errors.InvalidArgumentError("dtype must be 'bf16' or 'fp32', not %r" % (dtype,))

    def call(s, t):
        n_tp, n_pp, n_dp = _degrees(s, t, tp, pp, dp)
        return _cc.import_universal(s._s, t, n_tp, n_pp, n_dp, int(zero_stage), dtype == "bf16",
                                    out_tag, device or "cpu", bool(overwrite), bool(set_latest))
    return _run(store, tag, call)


def synth(store, tag, tp=1, pp=1, dp=1, *, zero_stage=2, dtype="bf16", layers=4, hidden=256,
          vocab=1000, vocab_multiple=1024, max_positions=512, seed=1, iteration=1000,
          overwrite=False, set_latest=True):
    """``ckptkv synth``: writes a synthetic Megatron GPT checkpoint with
    DeepSpeed's files at a layout. Every value depends on (seed, parameter,
    state, element) only, so two layouts of one seed are the same model.
    ``store`` is a ckptkv.Store or a path (created if missing)."""
    if dtype not in ("bf16", "fp32"):
        raise errors.InvalidArgumentError("dtype must be 'bf16' or 'fp32', not %r" % (dtype,))
    s, owned = (store, False) if isinstance(store, Store) else (Store(store), True)
    try:
        return _cc.synth(s._s, tag, int(tp), int(pp), int(dp), int(zero_stage), dtype == "bf16",
                         int(layers), int(hidden), int(vocab), int(vocab_multiple),
                         int(max_positions), int(seed), int(iteration), bool(overwrite),
                         bool(set_latest))
    finally:
        if owned:
            s.close()


__all__ = [
    "reshape_meg_2d_parallel", "meg_2d_parallel_map", "model_3d_desc", "get_model_3d_descriptor",
    "DeepSpeedCheckpoint", "ZeROCheckpoint", "merge_state", "partition_data",
    "get_layer_ckpt_name_for_rank", "get_model_ckpt_name_for_rank",
    "get_zero_ckpt_name_for_rank", "enable_universal_checkpoint", "SubparamShape",
    "clone_tensors_for_torch_save", "get_files", "get_files_with_prefix", "get_zero_files",
    "basic_folder_validation", "discover_tag_layout", "reshape", "plan_reshape",
    "export_universal", "import_universal", "synth", "DeepSpeedCheckpointError",
    "EMBEDDING_LAYER_INDEX", "FINAL_LAYER_NORM_INDEX", "ARGS_KEY", "CHECKPOINT_INFO_KEY",
    "ITERATION_KEY", "LAYER_FILE_PREFIX_PATTERN", "SEQUENTIAL_LAYERS", "LAYER_CONCAT_DIM",
]
