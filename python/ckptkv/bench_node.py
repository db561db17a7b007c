"""``python3 -m ckptkv.bench_node``: the ranks of one node saving one
checkpoint, side by side in one run: N rank processes each writing their
tensors' raw bytes to a file (the disk's ceiling), each ``torch.save``-ing
their file (what DeepSpeed's default engine does), and the same N
processes saving into one ckptkv store through its node writer, which
commits the tag once all N have committed.

    PYTHONPATH=build/python /usr/bin/python3 -m ckptkv.bench_node              # 4 x 256 MiB
    PYTHONPATH=build/python /usr/bin/python3 -m ckptkv.bench_node --json --repeat 3

Each rank holds ``--mib`` MiB of fp32: half of it the same on every rank
(the replicated weights of ZeRO-1/2 data parallelism), half its own (its
optimizer partition). The ranks start, build their tensors and (for
ckptkv) open the store, then wait for a start signal; the clock runs from
that signal to the last rank's return from its commit (torch.save: its
file written and fsynced). Figures per run:

- ``seconds``: signal to the last rank done;
- ``written_bytes``: bytes the processes wrote (``/proc/<pid>/io``
  write_bytes of every rank and, for ckptkv, of the writer);
- ``disk_bytes``: the files, or the store directory, afterwards;
- ``rank_peak_rss``: the largest rank's peak RSS (its tensors included);
- ``writer_peak_rss``: ckptkvd's peak RSS (VmHWM);
- ``writer_start_s``: for ckptkv, the first rank's open, which starts the
  writer (outside the clock).

``ckptkv_vs_torch_save`` and ``ckptkv_vs_raw_write`` are ratios of
``seconds`` within one repeat (below 1: ckptkv faster); medians over
repeats. The rows' order turns from one repeat to the next. Each repeat
uses a fresh store, so the replicated half is the only dedup. Nothing
here asserts a speed.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from . import bench

ROWS = ("raw_write_files", "torch_save_files", "ckptkv_node_store")
KINDS = (("raw", "raw_write_files"), ("torch", "torch_save_files"),
         ("ckptkv", "ckptkv_node_store"))


def _tensors(mib, rank):
    import torch
    half = (mib << 20) // 8  # fp32 elements in half of it
    shared = torch.rand(half, generator=torch.Generator().manual_seed(1))
    own = torch.rand(half, generator=torch.Generator().manual_seed(100 + rank))
    return {"replicated": shared, "own": own}


def _io_written(pid="self"):
    io = bench.io_counters(pid)
    return io[1] if io else 0


def _worker(args):
    """One rank: build, (open), say ready, wait for go, save, report."""
    import torch
    import ckptkv
    rank, world = args.rank, args.world
    state = _tensors(args.mib, rank)
    t0 = time.monotonic()
    store = None
    if args.kind == "ckptkv":
        store = ckptkv.Store(args.target, rank=rank, world_size=world)
    opened = time.monotonic() - t0
    print("ready %.6f" % opened, flush=True)
    while not os.path.exists(args.go):
        time.sleep(0.001)
    start = os.stat(args.go).st_mtime
    if args.kind == "ckptkv":
        w = store.begin("step1")
        w.save(state, "rank%d.pt" % rank)
        w.commit()
    else:
        path = os.path.join(args.target, "rank%d.pt" % rank)
        if args.kind == "raw":  # the ceiling: the tensors' bytes, nothing else
            with open(path, "wb") as f:
                for t in state.values():
                    f.write(memoryview(t.numpy()).cast("B"))
        else:
            torch.save(state, path)
        bench.fsync_path(path)
        bench.fsync_path(args.target, directory=True)
    done = time.time()
    peak = bench.status_bytes("VmHWM") or 0
    print("done %.6f %d %d" % (done - start, _io_written(), peak), flush=True)
    if store is not None:
        store.close()


def writer_pid(store):
    """The pid of the ckptkvd process that holds `store` (OWNER names the
    holder of its lock), or None."""
    try:
        pid = int(open(os.path.join(store, "OWNER")).read().split()[0])
        if b"ckptkvd" in open("/proc/%d/cmdline" % pid, "rb").read():
            return pid
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_one(kind, work, ranks, mib):
    target = os.path.join(work, "store" if kind == "ckptkv" else "files")
    os.makedirs(target if kind != "ckptkv" else work, exist_ok=True)
    go = os.path.join(work, "go-" + kind)
    env = dict(os.environ)
    for v in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE"):
        env.pop(v, None)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "ckptkv.bench_node", "--worker", kind, "--rank", str(r),
         "--world", str(ranks), "--mib", str(mib), "--target", target, "--go", go],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in range(ranks)]
    opened = []
    for p in procs:
        line = p.stdout.readline().split()
        if not line or line[0] != "ready":
            p.wait()
            raise RuntimeError("a %s rank did not start: %s" % (kind, p.stderr.read()))
        opened.append(float(line[1]))
    writer = writer_pid(target) if kind == "ckptkv" else None
    writer_io0 = _io_written(writer) if writer else 0
    bench.drop_cache([work], "auto")
    with open(go, "w"):
        pass
    done = []
    for p in procs:
        line = p.stdout.readline().split()
        if not line or line[0] != "done":
            p.wait()
            raise RuntimeError("a %s rank failed: %s" % (kind, p.stderr.read()))
        done.append((float(line[1]), int(line[2]), int(line[3])))
    # The writer lingers a moment after its last client: read it first.
    writer_io = (_io_written(writer) - writer_io0) if writer else 0
    writer_rss = (bench.status_bytes("VmHWM", writer) or 0) if writer else 0
    for p in procs:
        p.wait()
    row = {
        "seconds": max(d[0] for d in done),
        "written_bytes": sum(d[1] for d in done) + writer_io,
        "disk_bytes": bench.tree_bytes(target),
        "rank_peak_rss": max(d[2] for d in done),
        "logical_bytes": ranks * (mib << 20),
    }
    if kind == "ckptkv":
        row["writer_peak_rss"] = writer_rss
        row["writer_written_bytes"] = writer_io
        row["writer_start_s"] = max(opened)
        import ckptkv
        for _ in range(200):
            if writer_pid(target) is None:
                break
            time.sleep(0.05)
        with ckptkv.Store(target, read_only=True) as s:
            info = s.tag("step1")
            row["new_bytes"] = info["new_bytes"]
            assert len(info["files"]) == ranks, info
    return row


def run(args):
    base = tempfile.mkdtemp(prefix="ckptkv-bench-node-", dir=args.dir)
    repeats = []
    try:
        for i in range(args.repeat):
            rep = {}
            # The order turns from repeat to repeat: on a shared disk a row
            # pays for the writeback of the one before.
            for kind, name in KINDS[i % len(KINDS):] + KINDS[:i % len(KINDS)]:
                work = os.path.join(base, "r%d-%s" % (i, kind))
                os.makedirs(work)
                rep[name] = run_one(kind, work, args.ranks, args.mib)
                shutil.rmtree(work, ignore_errors=True)
            rep["ckptkv_vs_torch_save"] = (rep["ckptkv_node_store"]["seconds"] /
                                           rep["torch_save_files"]["seconds"])
            rep["ckptkv_vs_raw_write"] = (rep["ckptkv_node_store"]["seconds"] /
                                          rep["raw_write_files"]["seconds"])
            repeats.append(rep)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    median = {name: {k: statistics.median(r[name][k] for r in repeats)
                     for k in repeats[0][name]} for name in ROWS}
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release()},
        "ranks": args.ranks, "mib_per_rank": args.mib, "repeats": repeats, "median": median,
        "ckptkv_vs_torch_save": statistics.median(r["ckptkv_vs_torch_save"] for r in repeats),
        "ckptkv_vs_raw_write": statistics.median(r["ckptkv_vs_raw_write"] for r in repeats),
    }


def print_table(doc, out=sys.stdout):
    mib = 1 << 20
    out.write("%d ranks x %d MiB (half replicated), %d repeat(s), medians\n"
              % (doc["ranks"], doc["mib_per_rank"], len(doc["repeats"])))
    out.write("%-20s %9s %12s %12s %14s %14s\n" % ("row", "seconds", "written MiB", "disk MiB",
                                                  "rank peak MiB", "writer peak MiB"))
    for name in ROWS:
        r = doc["median"][name]
        out.write("%-20s %9.3f %12.1f %12.1f %14.1f %14s\n" % (
            name, r["seconds"], r["written_bytes"] / mib, r["disk_bytes"] / mib,
            r["rank_peak_rss"] / mib,
            "%.1f" % (r["writer_peak_rss"] / mib) if "writer_peak_rss" in r else "-"))
    out.write("ckptkv / torch.save seconds: %.2f (per repeat: %s)\n" % (
        doc["ckptkv_vs_torch_save"],
        ", ".join("%.2f" % r["ckptkv_vs_torch_save"] for r in doc["repeats"])))
    out.write("ckptkv / raw write seconds: %.2f (per repeat: %s)\n" % (
        doc["ckptkv_vs_raw_write"],
        ", ".join("%.2f" % r["ckptkv_vs_raw_write"] for r in doc["repeats"])))
    c = doc["median"]["ckptkv_node_store"]
    out.write("writer start (first open, outside the clock): %.2f s\n" % c["writer_start_s"])


def parse(argv):
    p = argparse.ArgumentParser(
        prog="python3 -m ckptkv.bench_node",
        description="N rank processes saving one checkpoint: torch.save files vs one store")
    p.add_argument("--ranks", type=int, default=4, help="rank processes (default 4)")
    p.add_argument("--mib", type=int, default=256, help="MiB per rank (default 256)")
    p.add_argument("--repeat", type=int, default=1, help="repeats; figures are medians")
    p.add_argument("--dir", default=None, help="parent of the work directory (removed after)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--worker", choices=["raw", "torch", "ckptkv"], help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--go", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.ranks < 2 or a.mib < 1 or a.repeat < 1:
        p.error("--ranks must be 2 or more, --mib and --repeat 1 or more")
    return a


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.worker:
        args.kind = args.worker
        _worker(args)
        return 0
    doc = run(args)
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
