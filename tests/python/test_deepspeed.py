"""KvCheckpointEngine in DeepSpeed's exact save_checkpoint / load_checkpoint
call sequences (reference: shared/reference/deepspeed-checkpoint.md 2.4,
2.7, 12), for both API generations: a model trained on CPU, saved, resumed,
and the next steps' losses are bit-identical to an uninterrupted run."""
import collections
import dataclasses
import enum
import glob
import os
import random
import subprocess
import types

import numpy as np
import pytest
import torch

import ckptkv
import ckptkv.deepspeed as ckds


@dataclasses.dataclass
class CheckpointCommitInfo:  # DeepSpeed >= 0.17's, by shape
    tag: str
    save_dir: str
    save_latest: bool


@dataclasses.dataclass
class fragment_address:  # deepspeed.utils.tensor_fragment's, by shape
    numel: int
    start: int


class ZeroStageEnum(int, enum.Enum):
    disabled = 0
    optimizer_states = 1


class LossScaler:
    def __init__(self, scale):
        self.cur_scale = scale
        self.dynamic = False


@pytest.fixture(autouse=True)
def allowed():
    ckptkv.allow(ZeroStageEnum, LossScaler, fragment_address)
    yield
    ckptkv.disallow(ZeroStageEnum, LossScaler, fragment_address)


class Trainer:
    def __init__(self, seed=0):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                         torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=3, gamma=0.5)
        self.steps = 0

    def step(self):
        # The batch comes from all three RNGs, so resuming must restore them.
        x = torch.randn(8, 16) + random.random() + float(np.random.rand())
        y = torch.randn(8, 4)
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.steps += 1
        return loss.detach().clone()

    def model_states(self):
        # DeepSpeed's model file keys (reference 3.1), ZeRO-1: optimizer in its own file.
        return {
            "module": self.model.state_dict(), "buffer_names": [], "optimizer": None,
            "param_shapes": [{n: p.shape for n, p in self.model.named_parameters()}],
            "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
            "lr_scheduler": self.sched.state_dict(), "data_sampler": None, "random_ltd": None,
            "sparse_tensor_module_names": set(), "skipped_steps": 0, "global_steps": self.steps,
            "global_samples": self.steps * 8, "dp_world_size": 1, "mp_world_size": 1,
            "ds_config": {"train_batch_size": 8, "zero_optimization": {"stage": 1}},
            "ds_version": "0.16.5",
            # client_state: what Megatron adds
            "iteration": self.steps, "rng": {"torch": torch.get_rng_state(),
                                             "python": random.getstate(),
                                             "numpy": np.random.get_state()},
        }

    def optim_states(self):
        mappings, start = collections.OrderedDict(), 0
        for n, p in self.model.named_parameters():
            mappings[n] = fragment_address(numel=p.numel(), start=start)
            start += p.numel()
        return {"optimizer_state_dict": {
            "param_slice_mappings": [mappings],
            "loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False,
            "base_optimizer_state": self.opt.state_dict(), "zero_stage": ZeroStageEnum.optimizer_states,
            "partition_count": [1], "group_paddings": [0],
            "single_partition_of_fp32_groups": [torch.cat(
                [p.detach().reshape(-1) for p in self.model.parameters()])]},
            "ds_config": {}, "ds_version": "0.16.5"}

    def flat_optim_states(self):
        """The optimizer file as ZeRO-1 writes it: one flat fp32 param per
        group, its Adam moments flat too (reference 3.2, 4.1)."""
        sd = self.optim_states()
        torch_sd = self.opt.state_dict()
        params = list(self.model.parameters())
        flat = {k: torch.cat([torch_sd["state"][i][k].reshape(-1) for i in range(len(params))])
                for k in ("exp_avg", "exp_avg_sq")}
        flat["step"] = torch_sd["state"][0]["step"]
        groups = [dict(torch_sd["param_groups"][0], params=[0])]
        sd["optimizer_state_dict"]["base_optimizer_state"] = {"state": {0: flat},
                                                              "param_groups": groups}
        return sd

    def restore(self, model_sd, optim_sd):
        self.model.load_state_dict(model_sd["module"])
        self.opt.load_state_dict(optim_sd["optimizer_state_dict"]["base_optimizer_state"])
        self.sched.load_state_dict(model_sd["lr_scheduler"])
        self.steps = model_sd["global_steps"]
        torch.set_rng_state(model_sd["rng"]["torch"])
        random.setstate(model_sd["rng"]["python"])
        np.random.set_state(model_sd["rng"]["numpy"])


def save_checkpoint(ce, trainer, save_dir, tag, new_api, save_latest=True, flat=False):
    """DeepSpeedEngine.save_checkpoint's calls on one rank (reference 2.4)."""
    ce.makedirs(save_dir, exist_ok=True)
    info = CheckpointCommitInfo(tag, save_dir, save_latest)
    ce.create(info if new_api else tag)
    ce.makedirs(os.path.join(save_dir, tag), exist_ok=True)
    ce.save(state_dict=trainer.model_states(),
            path=os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))
    ce.makedirs(os.path.join(save_dir, tag), exist_ok=True)
    ce.save(state_dict=trainer.flat_optim_states() if flat else trainer.optim_states(),
            path=os.path.join(save_dir, tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    if not (new_api and ce.is_decoupled()):
        ce.commit(info if new_api else tag)
        if save_latest:
            with open(os.path.join(save_dir, "latest"), "w") as f:
                f.write(tag)


def load_checkpoint(ce, load_dir, map_location):
    """DeepSpeedEngine.load_checkpoint's file-system and engine calls (2.7)."""
    with open(os.path.join(load_dir, "latest")) as f:
        tag = f.read().strip()
    ckpt_list = sorted(glob.glob(os.path.join(load_dir, tag, "mp_rank_*_model_states.pt")))
    assert ckpt_list, "glob found no model files"
    assert os.path.exists(ckpt_list[0])
    first = ce.load(ckpt_list[0], map_location=lambda storage, loc: storage)  # SD loader ctor
    assert len(ckpt_list) == first["mp_world_size"]
    model_sd = ce.load(ckpt_list[0], map_location=map_location)
    zero = os.path.join(load_dir, tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert os.path.exists(zero)
    optim_sd = ce.load(zero, map_location="cpu")
    return tag, model_sd, optim_sd


MAP_LOCATIONS = [lambda storage, loc: storage, "cpu", torch.device("cpu"), None]


@pytest.mark.parametrize("new_api", [False, True], ids=["api<=0.16", "api>=0.17"])
@pytest.mark.parametrize("loc", range(len(MAP_LOCATIONS)), ids=["lambda", "str", "device", "none"])
def test_resume_is_bit_identical(tmp_path, new_api, loc):
    baseline = Trainer()
    for _ in range(5):
        baseline.step()
    expected = [baseline.step() for _ in range(4)]

    save_dir = str(tmp_path / "ckpts")
    trainer = Trainer()
    for _ in range(5):
        trainer.step()
    ce = ckds.KvCheckpointEngine()
    save_checkpoint(ce, trainer, save_dir, "global_step5", new_api)
    ce.cleanup()
    del trainer

    resumed = Trainer(seed=99)  # a different start: everything must come from the checkpoint
    ce2 = ckds.KvCheckpointEngine()
    tag, model_sd, optim_sd = load_checkpoint(ce2, save_dir, MAP_LOCATIONS[loc])
    assert tag == "global_step5"
    assert type(optim_sd["optimizer_state_dict"]["loss_scaler"]) is LossScaler
    assert optim_sd["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.optimizer_states
    assert model_sd["sparse_tensor_module_names"] == set()
    assert type(model_sd["param_shapes"][0]["0.weight"]) is torch.Size
    assert_resumes_as(resumed, model_sd, optim_sd, expected)
    ce2.cleanup()


def assert_resumes_as(resumed, model_sd, optim_sd, expected):
    """The resumed trainer's next losses are bit-identical to `expected`."""
    resumed.restore(model_sd, optim_sd)
    got = [resumed.step() for _ in range(len(expected))]
    for a, b in zip(got, expected):
        assert torch.equal(a, b), (got, expected)


def test_store_layout_placeholders_and_placements(tmp_path):
    save_dir = str(tmp_path / "ckpts")
    t = Trainer()
    t.step()
    ce = ckds.KvCheckpointEngine()
    save_checkpoint(ce, t, save_dir, "global_step1", new_api=True, flat=True)
    store_dir = os.path.join(save_dir, ckds.DEFAULT_STORE_DIR)
    assert ce.store.path == store_dir and os.path.isdir(store_dir)
    assert ce.preserves_storage_sharing() is False and ce.is_data_parallel_writer(0)
    assert not ce.is_data_parallel_writer(1) and ce.is_decoupled() is False
    # The placeholder is a torch.save file naming store, tag and file.
    path = os.path.join(save_dir, "global_step1", "mp_rank_00_model_states.pt")
    ph = torch.load(path)
    assert ph["store"] == store_dir and ph["tag"] == "global_step1"
    assert ph["file"] == "mp_rank_00_model_states.pt" and "ckptkv.load" in ph["note"]
    assert os.path.getsize(path) < 4096
    with ckptkv.Store(store_dir, read_only=True) as s:
        assert s.files("global_step1") == ["mp_rank_00_model_states.pt",
                                           "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
        assert s.verify()["ok"]
        # Placements recorded at save time: the weights and the flat fp32 partition.
        for file, param in (("mp_rank_00_model_states.pt", "module/0.weight"),
                            ("zero_pp_rank_0_mp_rank_00_optim_states.pt",
                             "optimizer_state_dict/single_partition_of_fp32_groups/0"),
                            ("zero_pp_rank_0_mp_rank_00_optim_states.pt",
                             "optimizer_state_dict/base_optimizer_state/state/0/exp_avg")):
            assert s._s.tensor_info("global_step1", file, param)["placed"], param
    # A second rank's commit of the same tag, and commit without create.
    assert ce.commit(CheckpointCommitInfo("global_step1", save_dir, True)) is True
    with pytest.raises(ckptkv.FailedPreconditionError, match="without create"):
        ce.commit("global_step9")
    with pytest.raises(ckptkv.FailedPreconditionError, match="before create"):
        ce.save(state_dict={}, path=os.path.join(save_dir, "other", "x.pt"))
    ce.cleanup()
    # The store's own queries plan from those records: universal export
    # (once the engine has closed the store).
    cli = os.path.join(os.environ.get("CKPTKV_BIN", ""), "ckptkv")
    if os.path.exists(cli):
        subprocess.run([cli, "export-universal", "--db", store_dir, "--tag", "global_step1"],
                       check=True, capture_output=True)
        with ckptkv.Store(store_dir, read_only=True) as s:
            u = s.load("global_step1_universal", "zero/0.weight/fp32.pt")
            assert torch.equal(u["param"], t.model[0].weight.detach())


def test_store_option_and_config_block(tmp_path):
    store_dir = str(tmp_path / "elsewhere")
    ce = ckds.KvCheckpointEngine({"checkpoint": {"ckptkv": {"store": store_dir}}})
    save_dir = str(tmp_path / "ckpts")
    save_checkpoint(ce, Trainer(), save_dir, "t", new_api=False)
    ce.cleanup()
    assert os.path.isdir(store_dir) and not os.path.exists(os.path.join(save_dir, ckds.DEFAULT_STORE_DIR))
    # A fresh engine without the option finds the store through the placeholder.
    ce2 = ckds.KvCheckpointEngine()
    got = ce2.load(os.path.join(save_dir, "t", "mp_rank_00_model_states.pt"))
    assert got["global_steps"] == 0 and ce2.store.path == os.path.abspath(store_dir)
    ce2.cleanup()


def test_install_replaces_the_engine_and_recomputes_the_writer_flag(tmp_path):
    old = types.SimpleNamespace(cleanup=lambda: None)
    engine = types.SimpleNamespace(checkpoint_engine=old, save_non_zero_checkpoint=False,
                                   _config=types.SimpleNamespace(_param_dict={"train_batch_size": 8}),
                                   zero_optimization_partition_weights=lambda: False)
    ce = ckds.install(engine, store=str(tmp_path / "s"))
    assert engine.checkpoint_engine is ce and engine.save_non_zero_checkpoint is True
    assert ce.store is None  # opened on first use
    ce.create(CheckpointCommitInfo("a", str(tmp_path / "d"), True))
    assert ce.store.path == str(tmp_path / "s")
    ce.cleanup()


@pytest.mark.parametrize("mode", [True, "decoupled"], ids=["commit-waits", "decoupled"])
def test_async_save_snapshots_then_training_goes_on(tmp_path, mode):
    """save() returns after a snapshot; the training steps that follow change
    the parameters in place before the tag is written, and the checkpoint
    still holds the state at save time (reference 2.4 step 9 and 2.5)."""
    baseline = Trainer()
    for _ in range(5):
        baseline.step()
    expected = [baseline.step() for _ in range(3)]

    save_dir = str(tmp_path / "ckpts")
    trainer = Trainer()
    for _ in range(5):
        trainer.step()
    ce = ckds.KvCheckpointEngine({"checkpoint": {"ckptkv": {"async_save": mode}}})
    assert ce.is_decoupled() is (mode == "decoupled")
    save_checkpoint(ce, trainer, save_dir, "global_step5", new_api=True)
    # The next steps change every parameter and Adam moment in place.
    trainer.step()
    trainer.step()
    if ce.is_decoupled():
        # DeepSpeed's _commit_decoupled_checkpoint at the next boundary.
        info = ce.get_commit_info()
        assert info == CheckpointCommitInfo("global_step5", save_dir, True)
        with pytest.raises(ValueError):
            ce.commit(CheckpointCommitInfo("global_step5", save_dir, False))
        assert ce.commit(info) is True
        assert ce.get_commit_info() is None
        with open(os.path.join(save_dir, "latest"), "w") as f:
            f.write(info.tag)
    assert ce.last_commit["tag"] == "global_step5"
    ce.cleanup()

    ce2 = ckds.KvCheckpointEngine()
    tag, model_sd, optim_sd = load_checkpoint(ce2, save_dir, "cpu")
    assert tag == "global_step5"
    assert_resumes_as(Trainer(seed=99), model_sd, optim_sd, expected)
    ce2.cleanup()


def test_decoupled_cleanup_commits_the_pending_tag(tmp_path):
    save_dir = str(tmp_path / "ckpts")
    trainer = Trainer()
    trainer.step()
    ce = ckds.KvCheckpointEngine(async_save="decoupled")
    save_checkpoint(ce, trainer, save_dir, "global_step1", new_api=True)
    # A second save before the first was committed commits the first.
    save_checkpoint(ce, trainer, save_dir, "global_step2", new_api=True)
    store = ce.store
    assert "global_step1" in store
    ce.cleanup()  # DeepSpeed's destroy()
    with ckptkv.Store(os.path.join(save_dir, ckds.DEFAULT_STORE_DIR), read_only=True) as s:
        assert [t["tag"] for t in s.tags()] == ["global_step1", "global_step2"]
        assert s.verify()["ok"]
    with pytest.raises(ckptkv.InvalidArgumentError, match="async_save"):
        ckds.KvCheckpointEngine(async_save="sometimes")
