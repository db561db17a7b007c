"""One store per node: four rank processes (a gloo process group on CPU)
save one tag through the store's node writer with
ckptkv.deepspeed.KvCheckpointEngine, in DeepSpeed's call order
(tests/python/node_rank.py), and the tag commits atomically when all four
have committed. Then the failures: a rank killed in the middle of its save,
a rank that never commits, the writer killed during writes and during the
commit, and kv-browser reading in a loop beside twenty multi-rank saves."""
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import ckptkv
import ckptkv.bench_node as bench_node
import ckptkv.deepspeed as ckds

HERE = os.path.dirname(os.path.abspath(__file__))
RANK = os.path.join(HERE, "node_rank.py")
BIN = os.environ.get("CKPTKV_BIN", "")
CLI = os.path.join(BIN, "ckptkv")
BROWSER = os.path.join(BIN, "kv-browser")
WORLD = 4


def launch(tmp_path, save_dir, tags, modes, env=None, seed=1):
    """Starts WORLD ranks as a launcher would; returns the processes."""
    pg = str(tmp_path / ("pg-%s-%d" % (tags.replace(",", "_"), time.monotonic_ns())))
    procs = []
    for r in range(WORLD):
        e = dict(os.environ, LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(WORLD), RANK=str(r),
                 WORLD_SIZE=str(WORLD), PG_FILE=pg, SEED=str(seed))
        e.update(env or {})
        procs.append(subprocess.Popen([sys.executable, RANK, save_dir, tags, modes[r]], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=240):
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
        out.append((p.returncode, o, e))
    return out


def run(tmp_path, save_dir, tags, modes=("save",) * WORLD, env=None, seed=1):
    return finish(launch(tmp_path, save_dir, tags, modes, env, seed))


def store_of(save_dir):
    return os.path.join(save_dir, ckds.DEFAULT_STORE_DIR)


live_writer = bench_node.writer_pid


def wait_writer_gone(store, timeout=30):
    """The writer exits shortly after its last client; a test that needs a
    fresh one (another environment) waits for that."""
    deadline = time.time() + timeout
    while live_writer(store) is not None and time.time() < deadline:
        time.sleep(0.05)
    assert live_writer(store) is None, "the node writer did not exit"


def writer_pid(store, timeout=60):
    """The pid of the store's writer, once one runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pid = live_writer(store)
        if pid is not None:
            return pid
        time.sleep(0.02)
    raise AssertionError("no node writer appeared for " + store)


def assert_ok(results):
    for r, (code, out, err) in enumerate(results):
        assert code == 0, "rank %d exited %s:\n%s\n%s" % (r, code, out, err)


def errors_of(results):
    return [err for _, _, err in results]


def test_four_ranks_commit_one_tag_deduplicated_and_placed(tmp_path):
    save_dir = str(tmp_path / "ckpts")
    assert_ok(run(tmp_path, save_dir, "global_step1"))
    store = store_of(save_dir)
    with ckptkv.Store(store, read_only=True) as s:
        files = s.files("global_step1")
        assert sorted(files) == sorted(
            ["mp_rank_00_model_states.pt"] + ["replica_rank%d.pt" % r for r in range(WORLD)] +
            ["zero_pp_rank_%d_mp_rank_00_optim_states.pt" % r for r in range(WORLD)])
        info = s.tag("global_step1")
        assert s.latest() == "global_step1"
        assert s.verify()["ok"]
        # The replicated weights (~3 MiB on each of four ranks) are stored
        # once: the new bytes are the logical bytes less three copies.
        replica = 4 * ((3 << 20) // 4 + 1000)
        assert info["logical_bytes"] > WORLD * replica
        assert info["new_bytes"] <= info["logical_bytes"] - (WORLD - 1) * replica + (1 << 20)
        # The writer saw every rank's optimizer file: all placed.
        for r in range(WORLD):
            f = "zero_pp_rank_%d_mp_rank_00_optim_states.pt" % r
            for param in ("optimizer_state_dict/single_partition_of_fp32_groups/0",
                          "optimizer_state_dict/base_optimizer_state/state/0/exp_avg"):
                assert s._s.tensor_info("global_step1", f, param)["placed"], (f, param)
        assert s._s.tensor_info("global_step1", "mp_rank_00_model_states.pt",
                                "module/0.weight")["placed"]
    wait_writer_gone(store)
    # The next tag of the next run deduplicates against the first.
    assert_ok(run(tmp_path, save_dir, "global_step2"))
    with ckptkv.Store(store, read_only=True) as s:
        assert [t["tag"] for t in s.tags()] == ["global_step1", "global_step2"]
        assert s.tag("global_step2")["new_bytes"] == 0  # same seed: same bytes
    # The single-process store is untouched by all this: gc finds nothing.
    wait_writer_gone(store)
    with ckptkv.Store(store) as s:
        assert s.gc()["blocks_removed"] == 0


def test_a_rank_killed_mid_save_aborts_the_tag_for_all(tmp_path):
    save_dir = str(tmp_path / "ckpts")
    store = store_of(save_dir)
    assert_ok(run(tmp_path, save_dir, "good"))
    wait_writer_gone(store)
    results = run(tmp_path, save_dir, "broken", modes=("save", "save", "die", "save"))
    assert results[2][0] == -signal.SIGKILL
    for r in (0, 1, 3):
        code, out, err = results[r]
        assert code == 3, (r, out, err)
        assert "rank 2" in err and "broken" in err, err
    with ckptkv.Store(store, read_only=True) as s:
        assert "broken" not in s and s.latest() == "good"
        assert s.verify()["ok"]
    wait_writer_gone(store)
    assert_ok(run(tmp_path, save_dir, "next"))
    with ckptkv.Store(store) as s:
        assert "next" in s and s.latest() == "next"
        s.gc()  # the aborted tag's blocks are garbage
        assert s.verify()["ok"]


def test_a_rank_that_never_commits_times_the_others_out_by_name(tmp_path):
    save_dir = str(tmp_path / "ckpts")
    procs = launch(tmp_path, save_dir, "stuck", ("save", "hang", "save", "save"),
                   env={"CKPTKV_COMMIT_TIMEOUT": "3"})
    results = [None] * WORLD
    for r in (0, 2, 3):
        results[r] = finish([procs[r]], timeout=120)[0]
    procs[1].kill()
    finish([procs[1]])
    for r in (0, 2, 3):
        code, out, err = results[r]
        assert code == 3, (r, out, err)
        assert "rank(s) 1 joined but did not commit" in err, err
    with ckptkv.Store(store_of(save_dir), read_only=True) as s:
        assert "stuck" not in s and s.verify()["ok"]


@pytest.mark.parametrize("point", ["commit.before_batch", "commit.after_batch"])
def test_the_writer_killed_in_its_commit_keeps_earlier_tags_and_recovers(tmp_path, point):
    save_dir = str(tmp_path / "ckpts")
    store = store_of(save_dir)
    assert_ok(run(tmp_path, save_dir, "first"))
    wait_writer_gone(store)
    # The writer inherits the environment of the rank that starts it.
    results = run(tmp_path, save_dir, "second", env={"CKPTKV_KILL_POINT": point}, seed=7)
    for code, out, err in results:
        assert code == 3 and "node writer" in err and "is gone" in err, (code, out, err)
    with ckptkv.Store(store, read_only=True) as s:
        # Before the batch: the tag never was. After it: the whole tag is.
        assert ("second" in s) == (point == "commit.after_batch")
        assert "first" in s and s.verify()["ok"]
        assert s.load("first", "replica_rank1.pt")["rank"] == 1
    assert_ok(run(tmp_path, save_dir, "third", seed=9))
    with ckptkv.Store(store, read_only=True) as s:
        assert s.latest() == "third" and s.verify()["ok"]


def test_the_writer_killed_during_writes_loses_only_the_pending_tag(tmp_path):
    save_dir = str(tmp_path / "ckpts")
    store = store_of(save_dir)
    assert_ok(run(tmp_path, save_dir, "first"))
    wait_writer_gone(store)
    procs = launch(tmp_path, save_dir, "second", ("slow",) * WORLD, seed=3)
    pid = writer_pid(store)
    time.sleep(1.5)  # the ranks are in their slow files
    os.kill(pid, signal.SIGKILL)
    for code, out, err in finish(procs):
        assert code == 3 and "is gone" in err, (code, out, err)
    with ckptkv.Store(store, read_only=True) as s:
        assert "second" not in s and s.latest() == "first" and s.verify()["ok"]
    assert_ok(run(tmp_path, save_dir, "third", seed=4))
    with ckptkv.Store(store, read_only=True) as s:
        assert [t["tag"] for t in s.tags()] == ["first", "third"] and s.verify()["ok"]


@pytest.mark.skipif(not os.path.exists(BROWSER), reason="needs kv-browser")
def test_the_browser_beside_twenty_multi_rank_saves_finds_no_corruption(tmp_path):
    save_dir = str(tmp_path / "ckpts")
    store = store_of(save_dir)
    tags = ",".join("step%02d" % i for i in range(20))
    procs = launch(tmp_path, save_dir, tags, ("save",) * WORLD)
    stop = threading.Event()
    seen = []

    def browse():
        while not stop.is_set():
            if not os.path.exists(os.path.join(store, "CURRENT")):
                time.sleep(0.05)
                continue
            for what in ("verify", "tags"):
                p = subprocess.run([BROWSER, "--db", store, "--json", what], capture_output=True,
                                   text=True)
                seen.append((what, p.returncode, p.stdout, p.stderr))

    t = threading.Thread(target=browse)
    t.start()
    try:
        results = finish(procs, timeout=600)
    finally:
        stop.set()
        t.join()
    assert_ok(results)
    verifies = [json.loads(out) for what, code, out, _ in seen if what == "verify" and code == 0]
    # It ran beside the saves: it saw tags come.
    assert len(verifies) >= 3 and verifies[0]["tags"] < 20, [v["tags"] for v in verifies]
    for what, code, out, err in seen:
        assert code == 0, (what, code, out, err)
        if what == "verify":
            assert json.loads(out)["ok"], out
    with ckptkv.Store(store, read_only=True) as s:
        assert len(s.tags()) == 20 and s.verify()["ok"]


def test_single_process_engine_keeps_its_own_store(tmp_path, monkeypatch):
    # No world size above 1 in the environment: no node writer.
    for v in ("LOCAL_WORLD_SIZE", "WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(v, raising=False)
    ce = ckds.KvCheckpointEngine()
    save_dir = str(tmp_path / "ckpts")
    ce.makedirs(save_dir)
    ce.create("t")
    ce.save({"x": 1}, os.path.join(save_dir, "t", "a.pt"))
    assert ce.store.through_node_writer is False
    ce.commit("t")
    ce.cleanup()
    assert not glob.glob(os.path.join(store_of(save_dir), "ckptkvd.*"))
    assert ckptkv.node_ranks() == (0, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(ckptkv.InvalidArgumentError, match="LOCAL_RANK is 4; valid: 0 to 3"):
        ckptkv.node_ranks()
