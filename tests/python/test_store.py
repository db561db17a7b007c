"""The Store API: tags, multi-file writers, errors, dedup, safe_open reads
only what a slice needs, the GIL is released, readers beside a writer."""
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import ckptkv

BIN = os.environ.get("CKPTKV_BIN", "")


def state(seed, n=4096):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "step": seed}


def test_save_load_by_path_and_latest(tmp_path):
    path = str(tmp_path / "s")
    info = ckptkv.save(state(1), path, "a")
    assert info["tag"] == "a" and info["files"] == ["state.pt"]
    ckptkv.save(state(2), path, "b", "other.pt")
    got = ckptkv.load(path, "a")
    assert got["step"] == 1 and torch.equal(got["w"], state(1)["w"])
    assert ckptkv.load(path, file="other.pt")["step"] == 2  # latest = b
    with pytest.raises(ckptkv.AlreadyExistsError, match="'a'"):
        ckptkv.save(state(3), path, "a")
    ckptkv.save(state(3), path, "a", overwrite=True)
    assert ckptkv.load(path, "a")["step"] == 3


def test_tags_have_the_fields_of_kv_browser(tmp_path):
    path = str(tmp_path / "s")
    ckptkv.save(state(1), path, "a")
    ckptkv.save(state(1), path, "b")
    with ckptkv.Store(path) as s:
        tags = s.tags()
        assert [t["tag"] for t in tags] == ["a", "b"] and s.latest() == "b"
        assert tags[1]["latest"] and not tags[0]["latest"]
        assert tags[1]["new_bytes"] == 0  # the same bytes again: deduplicated
    kvb = os.path.join(BIN, "kv-browser")
    if os.path.exists(kvb):
        out = json.loads(subprocess.run([kvb, "--db", path, "tags", "--json"], check=True,
                                        capture_output=True, text=True).stdout)
        assert [sorted(t) for t in out] == [sorted(t) for t in tags]
        assert [t["tag"] for t in out] == ["a", "b"]


def test_writer_commits_many_files_atomically_or_nothing(tmp_path):
    with ckptkv.Store(tmp_path / "s") as s:
        w = s.begin("t")
        w.save(state(1), "mp_rank_00_model_states.pt")
        w.save(state(2), "zero/w/fp32.pt")
        assert "t" not in s  # nothing visible before commit
        w.commit()
        assert s.files("t") == ["mp_rank_00_model_states.pt", "zero/w/fp32.pt"]
        with pytest.raises(RuntimeError):
            with s.begin("u") as w2:
                w2.save(state(3), "a.pt")
                raise RuntimeError("training crashed")
        assert "u" not in s
        w2 = s.begin("w")
        with pytest.raises(ckptkv.FailedPreconditionError, match="already begun"):
            s.begin("w")  # would drop w2's saves
        w2.abort()
        w3 = s.begin("v")
        w3.save(state(4), "a.pt")
        w3.abort()
        assert "v" not in s
        with pytest.raises(ckptkv.InvalidArgumentError, match="aborted"):
            w3.save(state(4), "a.pt")
        assert s.verify()["ok"]
        # Aborted saves left blocks behind; gc removes them and keeps t's.
        g = s.gc()
        assert g["blocks_removed"] >= 1
        assert torch.equal(s.load("t", "zero/w/fp32.pt")["w"], state(2)["w"])


def test_delete_and_gc_reclaim(tmp_path):
    with ckptkv.Store(tmp_path / "s") as s:
        ckptkv.save(state(1, 1 << 18), s, "a")
        ckptkv.save(state(2, 1 << 18), s, "b")
        s.delete("a")
        assert [t["tag"] for t in s.tags()] == ["b"]
        g = s.gc()
        assert g["bytes_removed"] >= 4 * (1 << 18)
        assert s.verify("b")["ok"]


def test_errors_name_what_is_wrong(tmp_path):
    with ckptkv.Store(tmp_path / "s") as s:
        with pytest.raises(ckptkv.NotFoundError, match="has no committed tag"):
            s.load()
        ckptkv.save(state(1), s, "a")
        with pytest.raises(ckptkv.NotFoundError) as e:
            s.load("nope")
        assert "nope" in str(e.value) and isinstance(e.value, LookupError)
        with pytest.raises(ckptkv.NotFoundError):
            s.load("a", "missing.pt")
        with pytest.raises(ckptkv.InvalidArgumentError, match="tag"):
            s.begin("bad/tag")
        with pytest.raises(ckptkv.FailedPreconditionError):
            s._s.save("never-begun", "f.pt", {}, lambda v, p: None)
        with pytest.raises(ckptkv.InvalidArgumentError, match="map_location"):
            s.load("a", map_location=42)
    with pytest.raises(ckptkv.NotFoundError):
        ckptkv.Store(tmp_path / "absent", create=False)
    with ckptkv.Store(tmp_path / "s", read_only=True) as r:
        with pytest.raises(ckptkv.Error):
            r.begin("x")
    s.close()
    with pytest.raises(ckptkv.FailedPreconditionError, match="closed"):
        s.latest()


def test_map_location_forms(tmp_path):
    path = str(tmp_path / "s")
    ckptkv.save({"t": torch.ones(3, requires_grad=True)}, path, "a")
    for loc in (None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, loc: storage,
                lambda storage, loc: None):
        t = ckptkv.load(path, "a", map_location=loc)["t"]
        assert t.device.type == "cpu" and t.requires_grad and torch.equal(t, torch.ones(3))
    if not torch.cuda.is_available():
        with pytest.raises(ckptkv.InvalidArgumentError, match="CUDA is not available"):
            ckptkv.load(path, "a", map_location="cuda:0")


def test_resave_writes_only_changed_chunks(tmp_path):
    with ckptkv.Store(tmp_path / "s", chunk_size=64 * 1024) as s:
        big = {"w": torch.randn(1 << 20)}  # 4 MiB: 64 chunks
        first = ckptkv.save(big, s, "a")
        assert first["new_bytes"] == 4 << 20
        big["w"][: 1 << 17] += 1  # 10% of it
        second = ckptkv.save(big, s, "b")
        assert second["new_bytes"] == (1 << 17) * 4


def test_safe_open_reads_only_the_chunks_a_slice_needs(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    g = torch.Generator().manual_seed(seed)
    rows, cols = 256, 1024  # a row is 4 KiB, one chunk
    w = torch.randn(rows, cols, generator=g)
    with ckptkv.Store(tmp_path / "s", chunk_size=4096) as s:
        ckptkv.save({"module": {"w": w, "b": torch.arange(10)}}, s, "t")
        with s.safe_open("t", "state.pt") as f:
            assert sorted(f.keys()) == ["module/b", "module/w"]
            assert f.metadata()["tag"] == "t"
            sl = f.get_slice("module/w")
            assert sl.get_shape() == [rows, cols] and sl.get_dtype() == "float32"
            before = s.block_bytes_read()
            assert torch.equal(sl[10:12], w[10:12])
            assert s.block_bytes_read() - before == 2 * 4096
            before = s.block_bytes_read()
            assert torch.equal(sl[7], w[7])
            assert s.block_bytes_read() - before == 4096
            for _ in range(200):
                idx = []
                for n in (rows, cols):
                    kind = int(torch.randint(0, 3, (1,), generator=g))
                    if kind == 0:
                        idx.append(int(torch.randint(-n, n, (1,), generator=g)))
                    else:
                        a, b = sorted(int(x) for x in torch.randint(-n - 3, n + 3, (2,), generator=g))
                        step = int(torch.randint(1, 5, (1,), generator=g))
                        idx.append(slice(a, b, step))
                idx = tuple(idx)
                assert torch.equal(sl[idx], w[idx]), idx
            assert torch.equal(sl[..., 3], w[..., 3]) and torch.equal(sl[None, 2], w[None, 2])
            assert torch.equal(f.get_tensor("module/b"), torch.arange(10))
            with pytest.raises(IndexError):
                sl[rows]
            with pytest.raises(ckptkv.NotFoundError, match="module/w"):
                f.get_tensor("w")


def test_gil_is_released_while_bytes_are_written_and_read(tmp_path):
    big = {"w": torch.randn(16 << 20)}  # 64 MiB
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(1)

    with ckptkv.Store(tmp_path / "s") as s:
        t = threading.Thread(target=spin)
        t.start()
        try:
            w = s.begin("t")
            marks = [len(ticks)]
            w.save(big, "f.pt")  # one C++ call: hash + write
            marks.append(len(ticks))
            w.commit()
            s._s.read_tensor("t", "f.pt", "w")
            marks.append(len(ticks))
        finally:
            stop.set()
            t.join()
    # With the GIL held through those calls the spinning thread could not run.
    assert marks[1] - marks[0] > 10 and marks[2] - marks[1] > 10


WRITER = textwrap.dedent("""
    import sys, torch, ckptkv
    with ckptkv.Store(sys.argv[1]) as s:
        for i in range(int(sys.argv[2])):
            g = torch.Generator().manual_seed(i)
            ckptkv.save({"w": torch.randn(1 << 16, generator=g), "i": i}, s, "t%d" % i,
                        overwrite=i == 0)
""")


def test_readers_beside_a_live_writer(tmp_path):
    path = str(tmp_path / "s")
    ckptkv.save({"w": torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)), "i": 0},
                path, "t0")
    n = 30
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path, str(n)], env=env)
    seen = set()
    errors = []

    def reader():
        try:
            done = False
            while not done:
                done = proc.poll() is not None  # one more load after the writer ends
                got = ckptkv.load(path)
                i = got["i"]
                expect = torch.randn(1 << 16, generator=torch.Generator().manual_seed(i))
                assert torch.equal(got["w"], expect), i
                seen.add(i)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert proc.wait() == 0
    assert not errors, errors
    assert n - 1 in seen
    with ckptkv.Store(path, read_only=True) as s:
        assert len(s.tags()) == n and s.verify()["ok"]


def test_background_save_stores_the_tensors_as_they_were_at_save(tmp_path):
    torch.manual_seed(3)
    sd = {"w": torch.randn(300, 257), "b16": torch.randn(64, 64).to(torch.bfloat16),
          "t": torch.randn(40, 50).t(), "i": torch.arange(10000), "small": torch.ones(3)}
    expected = {k: v.clone() for k, v in sd.items()}
    with ckptkv.Store(tmp_path / "s", chunk_size=64 * 1024) as s:
        w = s.begin("t1", background=True)
        r = w.save(sd, "a.pt")
        assert r["background"] is True
        assert r["snapshot_bytes"] == sum(v.numel() * v.element_size() for v in sd.values())
        for v in sd.values():
            v.add_(1)  # a training step right after save returned
        sd["t"].zero_()
        w.save({"second": sd["w"]}, "b.pt")
        second = sd["w"].clone()
        sd["w"].mul_(3)
        info = w.commit()
        assert info["files"] == ["a.pt", "b.pt"]
        got = s.load("t1", "a.pt")
        for k in expected:
            assert torch.equal(got[k], expected[k]), k
        assert torch.equal(s.load("t1", "b.pt")["second"], second)
        assert s.verify()["ok"]
        # Aborting a background writer forgets its queued files.
        w2 = s.begin("t2", background=True)
        w2.save(sd, "a.pt")
        w2.abort()
        assert "t2" not in s
    # A pool smaller than a file: that save is written before it returns.
    with ckptkv.Store(tmp_path / "s", async_buffer_bytes=4096) as s:
        with s.begin("t3", background=True) as w:
            assert w.save(sd, "a.pt")["background"] is False
        assert torch.equal(s.load("t3", "a.pt")["w"], sd["w"])


def test_compression_is_lossless_and_chosen_per_store_or_per_tag(tmp_path):
    torch.manual_seed(4)
    # Weights of a trained-looking scale: small, normally distributed.
    w = (torch.randn(512, 512) * 0.02)
    sd = {"bf16": w.to(torch.bfloat16), "fp32": w, "fp16": w.to(torch.float16),
          "fp64": w[:64].double(), "int": torch.randint(0, 5, (100000,)),
          "noise": torch.randint(0, 256, (1 << 18,), dtype=torch.uint8)}
    with ckptkv.Store(tmp_path / "c", compress=True) as s:
        info = ckptkv.save(sd, s, "t")
        assert info["stored_new_bytes"] < 0.9 * info["new_bytes"], info
        got = s.load("t")
        for k, v in sd.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        # A tag saved raw in a compressing store dedups against nothing
        # new: the same bytes are the same blocks whatever their codec.
        info2 = ckptkv.save(sd, s, "raw", compress=False)
        assert info2["new_bytes"] == 0
        sd2 = {"x": (torch.randn(256, 256) * 0.02).to(torch.bfloat16)}
        info3 = ckptkv.save(sd2, s, "raw2", compress=False)
        assert info3["stored_new_bytes"] >= info3["new_bytes"]
        assert s.verify()["ok"]
    with ckptkv.Store(tmp_path / "r") as s:
        info = ckptkv.save(sd, s, "t", compress="grouped-zstd")
        assert info["stored_new_bytes"] < 0.9 * info["new_bytes"], info
        assert torch.equal(s.load("t")["bf16"], sd["bf16"])
        with pytest.raises(ckptkv.InvalidArgumentError, match="grouped-zstd"):
            s.begin("u", compress="lz4")
    with pytest.raises(ckptkv.InvalidArgumentError, match="compress"):
        ckptkv.Store(tmp_path / "x", compress="brotli")
