"""A Megatron-DeepSpeed pipeline run's checkpoint directory, written here by
torch.save as GPTModelPipe with DeepSpeed's ZeRO-1/2 saves it (layer files,
mp_rank files with module None, bf16_zero files with flat fp32 partitions),
goes into a store with `ckptkv import`, is reshaped to other layouts and
leaves as files with `ckptkv export --format deepspeed|universal`; every
exported tensor equals the global tensor this script made."""
import collections
import json
import os
import subprocess

import pytest
import torch

import ckptkv
from ckptkv.bench_files import fragment_address_class

BIN = os.environ.get("CKPTKV_BIN", "")
CLI = os.path.join(BIN, "ckptkv")
pytestmark = pytest.mark.skipif(not os.path.exists(CLI), reason="needs the ckptkv program")

H, VOCAB, POSITIONS, LAYERS = 8, 16, 4, 4
STEP = 5


# (name, global shape, TP split dim or None), GPTModelPipe's names and order:
# the tied embedding (layer 1), transformer layers 2.., the final norm.
def model_params():
    out = [("tied_modules.embed.word_embeddings.weight", (VOCAB, H), 0),
           ("tied_modules.embed.position_embeddings.weight", (POSITIONS, H), None)]
    for l in range(LAYERS):
        p = "%d." % (l + 2)
        out += [(p + "input_layernorm.weight", (H,), None), (p + "input_layernorm.bias", (H,), None),
                (p + "self_attention.query_key_value.weight", (3 * H, H), 0),
                (p + "self_attention.query_key_value.bias", (3 * H,), 0),
                (p + "self_attention.dense.weight", (H, H), 1),
                (p + "self_attention.dense.bias", (H,), None),
                (p + "post_attention_layernorm.weight", (H,), None),
                (p + "post_attention_layernorm.bias", (H,), None),
                (p + "mlp.dense_h_to_4h.weight", (4 * H, H), 0),
                (p + "mlp.dense_h_to_4h.bias", (4 * H,), 0),
                (p + "mlp.dense_4h_to_h.weight", (H, 4 * H), 1),
                (p + "mlp.dense_4h_to_h.bias", (H,), None)]
    out += [("%d.weight" % (LAYERS + 3), (H,), None), ("%d.bias" % (LAYERS + 3), (H,), None)]
    return out


def layer_of(name):
    return 1 if name.startswith("tied_modules.") else int(name.split(".", 1)[0])


def key_in_layer(name):
    return name.split(".", 2)[2] if name.startswith("tied_modules.") else name.split(".", 1)[1]


def stages_of(name, pp):
    """GPTModelPipe's stages: the tied embedding on the first and last, the
    transformer layers evenly, the final norm on the last."""
    layer = layer_of(name)
    if layer == 1:
        return sorted({0, pp - 1})
    if layer == LAYERS + 3:
        return [pp - 1]
    return [(layer - 2) // (LAYERS // pp)]


def shard(t, dim, tp, r):
    return t if dim is None else t.chunk(tp, dim)[r].clone()


def global_state(seed):
    """{name: {"fp32", "exp_avg", "exp_avg_sq"}} of fp32 tensors; the bf16
    training weight is fp32 rounded."""
    g = torch.Generator().manual_seed(seed)
    out = collections.OrderedDict()
    for name, shape, _ in model_params():
        out[name] = {s: torch.randn(shape, generator=g) * scale
                     for s, scale in (("fp32", 0.02), ("exp_avg", 1e-3), ("exp_avg_sq", 1e-6))}
        out[name]["exp_avg_sq"] = out[name]["exp_avg_sq"].abs()
    return out


def write_pipeline_dir(save_dir, tag, tp, pp, dp, zero_stage, state):
    """The files DeepSpeed's pipeline engine saves for `tag` at tp x pp x dp."""
    fa = fragment_address_class()
    tag_dir = os.path.join(save_dir, tag)
    os.makedirs(tag_dir)
    params = model_params()
    for s in range(pp):
        stage = [(n, shape, dim) for n, shape, dim in params if s in stages_of(n, pp)]
        groups = [[p for p in stage if len(p[1]) >= 2], [p for p in stage if len(p[1]) < 2]]
        for t in range(tp):
            mp = s * tp + t
            # Layer files: the stage's own layers (the last stage's tied
            # embedding copy has no state dict, hence no file).
            layers = collections.OrderedDict()
            for n, _, dim in stage:
                if layer_of(n) == 1 and s != 0:
                    continue
                layers.setdefault(layer_of(n), collections.OrderedDict())[key_in_layer(n)] = (
                    shard(state[n]["fp32"], dim, tp, t).to(torch.bfloat16))
            for layer, sd in layers.items():
                torch.save(sd, os.path.join(tag_dir, "layer_%02d-model_%02d-model_states.pt" % (
                    layer, t)))
            shapes = [collections.OrderedDict(
                (n, shard(state[n]["fp32"], dim, tp, t).shape) for n, _, dim in grp)
                for grp in groups]
            torch.save({
                "module": None, "buffer_names": [], "optimizer": None, "param_shapes": shapes,
                "frozen_param_shapes": None, "shared_params": {}, "lr_scheduler": {},
                "sparse_tensor_module_names": set(), "skipped_steps": 0,
                "global_steps": STEP, "global_samples": STEP * 8, "dp_world_size": dp,
                "mp_world_size": tp * pp,
                "checkpoint_parallel_dimensions": {"pp_degree": pp, "tp_degree": tp},
                "ds_config": {"bf16": {"enabled": True},
                              "zero_optimization": {"stage": zero_stage}},
                "ds_version": "0.16.5", "iteration": STEP,
                "args": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                         "num_layers": LAYERS, "hidden_size": H, "padded_vocab_size": VOCAB}},
                os.path.join(tag_dir, "mp_rank_%02d_model_states.pt" % mp))
            # ZeRO-1/2: per group the flat fp32 shards, padded to 2*dp, cut
            # into dp equal partitions; padding on the trailing ranks.
            flats = []
            for grp in groups:
                flats.append({k: torch.cat([shard(state[n][k], dim, tp, t).reshape(-1)
                                            for n, _, dim in grp])
                              for k in ("fp32", "exp_avg", "exp_avg_sq")})
            for d in range(dp):
                parts, pads, mappings, st = [], [], [], {}
                for g, (grp, flat) in enumerate(zip(groups, flats)):
                    total = flat["fp32"].numel()
                    padded = -(-total // (2 * dp)) * (2 * dp)
                    size = padded // dp
                    lo, hi = d * size, (d + 1) * size
                    part = {k: torch.cat([v, v.new_zeros(padded - total)])[lo:hi].clone()
                            for k, v in flat.items()}
                    parts.append(part["fp32"])
                    pads.append(max(0, min(size, hi - total)))
                    m, start = collections.OrderedDict(), 0
                    for n, _, dim in grp:
                        numel = shard(state[n]["fp32"], dim, tp, t).numel()
                        a, b = max(start, lo), min(start + numel, hi)
                        if a < b:
                            m[n] = fa(numel=b - a, start=a - lo)
                        start += numel
                    mappings.append(m)
                    st[g] = {"step": torch.tensor(float(STEP)), "exp_avg": part["exp_avg"],
                             "exp_avg_sq": part["exp_avg_sq"]}
                torch.save({"optimizer_state_dict": {
                    "loss_scaler": None, "dynamic_loss_scale": False, "overflow": False,
                    "clip_grad": 1.0,
                    "base_optimizer_state": {"state": st, "param_groups": [
                        {"lr": 1e-4, "weight_decay": wd, "params": [g]}
                        for g, wd in enumerate((0.1, 0.0))]},
                    "single_partition_of_fp32_groups": parts, "zero_stage": zero_stage,
                    "group_paddings": pads, "partition_count": [dp, dp],
                    "ds_version": "0.16.5", "param_slice_mappings": mappings},
                    "ds_config": {}, "ds_version": "0.16.5"},
                    os.path.join(tag_dir, "bf16_zero_pp_rank_%d_mp_rank_%02d_optim_states.pt" % (
                        d, mp)))
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write(tag)


def cli(*args):
    p = subprocess.run([CLI] + [str(a) for a in args], capture_output=True, text=True)
    assert p.returncode == 0, (args, p.stderr)
    return p.stdout


def check_deepspeed_dir(tag_dir, tp, pp, dp, state):
    """Every weight of the layer files and every fp32 / moment element of
    the ZeRO files at tp x pp x dp equals the global state."""
    params = model_params()
    seen = set()
    for s in range(pp):
        stage = [(n, shape, dim) for n, shape, dim in params if s in stages_of(n, pp)]
        groups = [[p for p in stage if len(p[1]) >= 2], [p for p in stage if len(p[1]) < 2]]
        for t in range(tp):
            mp = s * tp + t
            model = torch.load(os.path.join(tag_dir, "mp_rank_%02d_model_states.pt" % mp))
            assert model["module"] is None
            for n, _, dim in stage:
                if layer_of(n) == 1 and s != 0:
                    continue
                f = os.path.join(tag_dir, "layer_%02d-model_%02d-model_states.pt" % (layer_of(n), t))
                got = torch.load(f)[key_in_layer(n)]
                want = shard(state[n]["fp32"], dim, tp, t).to(torch.bfloat16)
                assert torch.equal(got, want), (f, n)
                seen.add(n)
            for g, grp in enumerate(groups):
                want = {k: torch.cat([shard(state[n][k], dim, tp, t).reshape(-1)
                                      for n, _, dim in grp]) for k in ("fp32", "exp_avg",
                                                                      "exp_avg_sq")}
                got = collections.defaultdict(list)
                for d in range(dp):
                    osd = torch.load(os.path.join(
                        tag_dir, "bf16_zero_pp_rank_%d_mp_rank_%02d_optim_states.pt" % (d, mp)))
                    osd = osd["optimizer_state_dict"]
                    got["fp32"].append(osd["single_partition_of_fp32_groups"][g])
                    for k in ("exp_avg", "exp_avg_sq"):
                        got[k].append(osd["base_optimizer_state"]["state"][g][k])
                for k, v in want.items():
                    flat = torch.cat(got[k])
                    assert flat.numel() >= v.numel()
                    assert torch.equal(flat[:v.numel()], v), (mp, g, k)
                    assert not flat[v.numel():].any(), (mp, g, k, "padding")
    assert seen == {n for n, _, _ in params}


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_pipeline_directory_imports_reshapes_and_exports_as_the_global_tensors(tmp_path,
                                                                               zero_stage):
    state = global_state(seed=zero_stage)
    save_dir, store = tmp_path / "ckpt", tmp_path / "store"
    write_pipeline_dir(str(save_dir), "global_step5", 2, 2, 2, zero_stage, state)
    r = json.loads(cli("import", "--db", store, save_dir, "--json"))
    files = sorted(os.listdir(save_dir / "global_step5"))
    assert len([f for f in files if f.startswith("layer_")]) == 2 * (LAYERS + 2)
    assert r["tag"] == "global_step5" and r["files"] == len(files) == 2 * (LAYERS + 2) + 4 + 8
    # Every tensor of the layer, model and ZeRO files got a placement.
    with ckptkv.Store(store, read_only=True) as s:
        for f in s.files("global_step5"):
            if f.startswith("mp_rank_"):
                continue  # module None: only scalars and shapes
            for p in s._s.params("global_step5", f):
                info = s._s.tensor_info("global_step5", f, p)
                if info["shape"]:  # the scalar step tensors have no place
                    assert info["placed"], (f, p)
    # Reshaped, then exported as DeepSpeed's directory: the files hold the
    # global tensors cut for the new layout.
    for tp, pp, dp in ((1, 1, 1), (1, 4, 3), (2, 1, 2)):
        out_tag = "tp%d_pp%d_dp%d" % (tp, pp, dp)
        cli("reshape", "--db", store, "--tag", "global_step5", "--tp", tp, "--pp", pp, "--dp", dp,
            "--out-tag", out_tag)
        out = tmp_path / ("export-" + out_tag)
        cli("export", "--db", store, out_tag, "--format", "deepspeed", "--out", out)
        assert (out / "latest").read_text().strip() == out_tag
        check_deepspeed_dir(str(out / out_tag), tp, pp, dp, state)
    # Universal: one fp32 / moment file per parameter, the whole tensor.
    out = tmp_path / "universal"
    cli("export", "--db", store, "global_step5", "--format", "universal", "--out", out)
    zero = out / "global_step5" / "zero"
    for name, shape, _ in model_params():
        for kind in ("fp32", "exp_avg", "exp_avg_sq"):
            got = torch.load(zero / name / (kind + ".pt"))["param"]
            assert got.shape == shape and torch.equal(got, state[name][kind]), (name, kind)
