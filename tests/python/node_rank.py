"""One rank of a multi-process job for tests/python/test_node.py and the
node benchmark: joins a gloo process group, saves its files of a tag with
ckptkv.deepspeed.KvCheckpointEngine in DeepSpeed's call order, commits, and
loads every file of the tag back, comparing it bit for bit with what each
rank saved (recomputed here from the seeds).

    node_rank.py SAVE_DIR TAG[,TAG...] MODE

LOCAL_RANK / LOCAL_WORLD_SIZE (and RANK / WORLD_SIZE) come from the
environment, as a launcher sets them; PG_FILE names the gloo rendezvous
file. MODE: save | die (SIGKILL itself after its first file) | hang (save,
then sleep without committing) | slow (a file of many small tensors, with
pauses: about three seconds of saving). Exit 0 on success; 3 when the engine raised (the message goes to
stderr as "ERROR: <class>: <message>")."""
import collections
import enum
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import ckptkv
import ckptkv.deepspeed as ckds
from ckptkv.bench_files import fragment_address_class

HIDDEN = 64
REPLICA_NUMEL = (3 << 20) // 4 + 1000  # ~3 MiB of fp32: several chunks


fragment_address = fragment_address_class()  # DeepSpeed's, or one of its shape


class ZeroStageEnum(int, enum.Enum):
    optimizer_states = 1
    gradients = 2


def params(seed):
    g = torch.Generator().manual_seed(seed)
    return collections.OrderedDict([
        ("0.weight", torch.randn(4 * HIDDEN, HIDDEN, generator=g)),
        ("0.bias", torch.randn(4 * HIDDEN, generator=g)),
        ("2.weight", torch.randn(HIDDEN, 4 * HIDDEN, generator=g)),
        ("2.bias", torch.randn(HIDDEN, generator=g)),
    ])


def replicated(seed):
    """What every data-parallel rank holds alike (the weights under ZeRO-1/2)."""
    return torch.randn(REPLICA_NUMEL, generator=torch.Generator().manual_seed(seed + 1000))


def model_states(seed, world):
    p = params(seed)
    return {"module": p, "buffer_names": [], "optimizer": None,
            "param_shapes": [collections.OrderedDict((n, t.shape) for n, t in p.items())],
            "frozen_param_shapes": None, "shared_params": {}, "lr_scheduler": {},
            "sparse_tensor_module_names": set(), "skipped_steps": 0, "global_steps": seed,
            "global_samples": seed * 8, "dp_world_size": world, "mp_world_size": 1,
            "ds_config": {"zero_optimization": {"stage": 2}}, "ds_version": "0.16.5"}


def optim_states(seed, world, rank):
    """ZeRO-2's file of data-parallel rank `rank`: its partition of the flat
    fp32 group (padded to 2 x world, cut into `world` equal parts)."""
    p = params(seed)
    flat = torch.cat([t.reshape(-1) for t in p.values()])
    total = flat.numel()
    padded = -(-total // (2 * world)) * (2 * world)
    size = padded // world
    lo, hi = rank * size, (rank + 1) * size
    flat = torch.cat([flat, flat.new_zeros(padded - total)])
    part = flat[lo:hi].clone()
    mappings, start = collections.OrderedDict(), 0
    for n, t in p.items():
        a, b = max(start, lo), min(start + t.numel(), hi)
        if a < b:
            mappings[n] = fragment_address(numel=b - a, start=a - lo)
        start += t.numel()
    state = {"step": torch.tensor(float(seed)), "exp_avg": part * 0.5, "exp_avg_sq": part.abs()}
    return {"optimizer_state_dict": {
        "loss_scaler": None, "dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0,
        "base_optimizer_state": {"state": {0: state},
                                 "param_groups": [{"lr": 1e-3, "weight_decay": 0.0,
                                                   "params": [0]}]},
        "single_partition_of_fp32_groups": [part], "zero_stage": ZeroStageEnum.gradients,
        "group_paddings": [max(0, min(size, hi - total))], "partition_count": [world],
        "ds_version": "0.16.5", "param_slice_mappings": [mappings]},
        "ds_config": {}, "ds_version": "0.16.5"}


def slow_file(seed, rank, k):
    g = torch.Generator().manual_seed(seed * 1000 + rank * 10 + k)
    return {"t%03d" % i: torch.randn(1 << 18, generator=g) for i in range(8)}


def files_of(seed, world, rank, mode):
    """(file, state) this rank saves, in DeepSpeed's order."""
    out = []
    if rank == 0:
        out.append(("mp_rank_00_model_states.pt", model_states(seed, world)))
    out.append(("replica_rank%d.pt" % rank, {"weights": replicated(seed), "rank": rank}))
    if mode == "slow":  # six files, saved half a second apart
        out += [("slow_rank%d_%d.pt" % (rank, k), slow_file(seed, rank, k)) for k in range(6)]
    out.append(("zero_pp_rank_%d_mp_rank_00_optim_states.pt" % rank,
                optim_states(seed, world, rank)))
    return out


def equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def main():
    save_dir, tags, mode = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    ckptkv.allow(fragment_address, ZeroStageEnum)
    if os.environ.get("PG_FILE"):
        dist.init_process_group("gloo", init_method="file://" + os.environ["PG_FILE"],
                                rank=rank, world_size=world)
    ce = ckds.KvCheckpointEngine()
    try:
        for i, tag in enumerate(tags):
            seed = int(os.environ.get("SEED", "1")) + i
            ce.makedirs(save_dir, exist_ok=True)
            ce.create(tag)
            for k, (file, state) in enumerate(files_of(seed, world, rank, mode)):
                if mode == "slow" and file.startswith("slow"):
                    time.sleep(0.5)
                ce.save(state, os.path.join(save_dir, tag, file))
                if mode == "die" and k == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
            if mode == "hang":
                time.sleep(120)
            ce.commit(tag)
            # Every file of the tag, from this rank: what its rank saved.
            names = ce.store.files(tag)
            expected = {}
            for r in range(world):
                for file, state in files_of(seed, world, r, mode):
                    expected[file] = state
            assert sorted(names) == sorted(expected), (names, sorted(expected))
            for file in names:
                got = ce.load(os.path.join(save_dir, tag, file), map_location="cpu")
                assert equal(got, expected[file]), file
            print("rank %d committed %s: %s" % (rank, tag, ce.last_commit), flush=True)
        ce.cleanup()
    except ckptkv.Error as e:
        print("ERROR: %s: %s" % (type(e).__name__, e), file=sys.stderr, flush=True)
        sys.exit(3)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
