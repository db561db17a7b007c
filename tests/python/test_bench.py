"""Smoke test of ``python3 -m ckptkv.bench``: one tiny run (4 MiB, two
repeats) whose JSON has every row with positive figures, and its table. It
checks that the bench works, never how fast anything is."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import ckptkv.bench as bench


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    parent = tmp_path_factory.mktemp("bench")
    # fadvise: a test must not drop the whole machine's page cache.
    cmd = [sys.executable, "-m", "ckptkv.bench", "--size-mib", "4", "--repeat", "2",
           "--cache-drop", "fadvise", "--dir", str(parent), "--json"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), parent, p.stderr


def test_json_has_every_row_with_sane_figures(run):
    doc, _, _ = run
    assert doc["equal"] is True and doc["differences"] == []
    assert doc["cache_drop"] == "fadvise"
    assert doc["options"]["repeat"] == 2 and len(doc["runs"]) == 2
    sd = doc["state_dict"]
    assert sd["logical_bytes"] > 3 << 20 and sd["tensors"] > 0
    assert 0 < sd["changed_bytes"] < sd["logical_bytes"]
    assert set(doc["rows"]) == set(bench.ROWS)
    for r in doc["runs"]:
        assert set(r) == set(bench.ROWS)
    for name, row in doc["rows"].items():
        keys = ["seconds", "mib_s", "time_vs_torch", "throughput_vs_raw", "logical_bytes",
                "seconds_min", "seconds_max"]
        if name != "memcpy":  # writes nothing
            keys += ["disk_bytes", "disk_vs_pt"]
        for key in keys:
            assert row[key] is not None and row[key] > 0, (name, key, row[key])
        assert row["seconds_min"] <= row["seconds"] <= row["seconds_max"], name
        for key in ("written_bytes", "read_bytes", "peak_rss_bytes", "peak_rss_delta_bytes"):
            assert row[key] is None or row[key] >= 0, (name, key, row[key])
    rows = doc["rows"]
    assert rows["torch_save"]["time_vs_torch"] == 1.0
    assert rows["torch_load"]["time_vs_torch"] == 1.0
    assert rows["raw_write"]["throughput_vs_raw"] == 1.0
    assert rows["raw_read"]["throughput_vs_raw"] == 1.0
    # the store's own counts: a first save writes every chunk, an unchanged one none
    assert rows["ckptkv_save"]["new_bytes"] > 0
    assert rows["deepspeed_engine_save"]["new_bytes"] > 0
    assert rows["ckptkv_resave_unchanged"]["new_bytes"] == 0
    assert 0 < rows["ckptkv_resave_10pct"]["new_bytes"] < rows["ckptkv_save"]["new_bytes"]
    # background saves: save() blocked for part of the time to the commit
    for name in ("ckptkv_save_background", "ckptkv_save_background_warm"):
        assert rows[name]["background"] == 1, name
        assert 0 < rows[name]["blocked_seconds"] < rows[name]["seconds"], name
    assert rows["ckptkv_save_background"]["new_bytes"] == rows["ckptkv_save"]["new_bytes"]
    assert 0 < rows["ckptkv_save_compressed"]["stored_new_bytes"] <= (
        rows["ckptkv_save_compressed"]["new_bytes"])
    assert set(doc["targets"]) == {t[0] for t in bench.TARGETS}
    for name, t in doc["targets"].items():
        assert t["value"] is not None and t["value"] > 0, name
        assert t["met"] in (True, False) and t["target"][:2] in (">=", "<="), name


def test_work_directory_is_removed(run):
    _, parent, _ = run
    assert os.listdir(str(parent)) == []


def test_table_names_every_row(run):
    doc, _, _ = run
    out = io.StringIO()
    bench.print_table(doc, out)
    text = out.getvalue()
    for name in bench.ROWS:
        assert name in text
    assert "page cache before loads: fadvise" in text
    assert "equal the saved state dict: yes" in text


def test_state_dict_is_deterministic_and_sized():
    h, layers, vocab, positions = bench.gpt_shape(4 << 20)
    shapes = bench.param_shapes(h, layers, vocab, positions)
    a = bench.Params.generate(shapes, seed=1).state_dict(7)
    b = bench.Params.generate(shapes, seed=1).state_dict(7)
    assert bench.difference(a, b) is None
    assert bench.difference(a, bench.Params.generate(shapes, seed=2).state_dict(7)) is not None
    logical = sum(bench.nbytes(t) for t in bench.tensors_of(a))
    assert abs(logical - (4 << 20)) < (1 << 20)
    assert {t.dtype for t in a["module"].values()} == {torch.bfloat16}
    assert {t.dtype for t in a["optimizer"]["fp32_master_weights"].values()} == {torch.float32}


def test_file_bench_imports_and_exports_equal_values(tmp_path):
    """``python3 -m ckptkv.bench_files``, tiny: every row timed, the
    re-import writes no new chunk, imported and exported values equal."""
    import ckptkv.bench_files as bench_files
    cmd = [sys.executable, "-m", "ckptkv.bench_files", "--size-mib", "4", "--cache-drop",
           "fadvise", "--dir", str(tmp_path), "--json"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["equal"] is True, doc["differences"]
    assert set(doc["rows"]) == set(bench_files.ROWS)
    for name, row in doc["rows"].items():
        assert row["seconds"] > 0 and row["mib_s"] > 0, name
    assert doc["rows"]["ckptkv_import"]["new_bytes"] > 0
    assert doc["ratios"]["reimport_new_bytes"] == 0
    assert doc["ratios"]["import_vs_torch_load"] > 0
    assert os.listdir(str(tmp_path)) == []
    out = io.StringIO()
    bench_files.print_table(doc, out)
    assert "equal the objects written: yes" in out.getvalue()


def test_node_bench_saves_four_ranks_both_ways(tmp_path):
    """``python3 -m ckptkv.bench_node``, tiny: both rows timed; the store
    holds the replicated half once, so it takes less disk than the files."""
    import ckptkv.bench_node as bench_node
    cmd = [sys.executable, "-m", "ckptkv.bench_node", "--ranks", "4", "--mib", "4", "--dir",
           str(tmp_path), "--json"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    files, store = doc["median"]["torch_save_files"], doc["median"]["ckptkv_node_store"]
    assert files["seconds"] > 0 and store["seconds"] > 0
    assert files["disk_bytes"] >= 4 * (4 << 20)
    # 4 own halves and one replicated half: 10 MiB of 16 (and the store's own files).
    assert store["new_bytes"] == 5 * (2 << 20)
    assert store["writer_peak_rss"] > 0 and store["rank_peak_rss"] > 0
    assert os.listdir(str(tmp_path)) == []
    out = io.StringIO()
    bench_node.print_table(doc, out)
    assert "ckptkv / torch.save seconds" in out.getvalue()
