"""Probe: what the first matrix product at a new number of rows costs on the host (cuBLAS, bf16), at the bench
model's projection shapes. The bench model's first prefill at a new length spends 12-20 ms more host time in its
first layers than a warm one (benchmarks/results/probe_mla_prefill.log); at short lengths, where the host sets the
pace, that is the prompt's extra time. Per row count: the host time of each shape's first call, against its second.
Runs with CUDA_MODULE_LOADING=EAGER beside the default (LAZY), to see how much is cuBLAS loading kernels on first use
rather than choosing them per shape, and with PyTorch's cuBLASLt path preferred. Then, with --threads, whether
that choice can be made ahead on other threads: worker threads run each shape once at a new row count on a side
stream, and the main thread's first calls at that row count are timed after the workers finish (is the choice
shared across threads?) and while they run (does it overlap?); with --handles, whether the choice is kept per
thread or for the process, and per exact row count (for the process, per exact count: results/probe_first_shapes_
handles.*). Worker threads that make the model's choices ahead of a prefill at a new length were tried twice and
made that prefill slower (6e708b5 with threads per prefill, 373cca1 with threads kept for the process; both
reverted; results/probe_first_shapes_model*.*, results/cold_start_*_same_call.json). With --ladder, each shape's
first call at eleven new row counts, under CUDA_MODULE_LOADING=LAZY and EAGER, with and without running every shape
at 14 row counts first: the 2-4 ms first calls stay in every mode, so they are cuBLAS's choice at that exact shape,
not kernel loading (results/probe_first_shapes_ladder.*; the low-rank shapes, which take them most often, now run
through kernels/gemm.py).

    python benchmarks/probe_first_shapes.py --out-dir /tmp/probe
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# (in, out) of the bench model's projections (bench_1b_hybrid: hidden 2304, 32 heads x 128, MLA 192 / 128 per head,
# dense MLP 9216, expert 1024)
SHAPES = [(2304, 4096), (4096, 2304), (2304, 128), (128, 4096), (2304, 32), (2304, 18432), (9216, 2304),
          (2304, 6144), (2304, 576), (512, 8192), (2304, 2048), (1024, 2304), (2304, 16)]  # fmt: skip
ROWS = [2048, 8000, 8001, 8016, 9100, 32768, 32001, 50001, 131072, 8000 + 4096]


def child():
    t = time.perf_counter()
    import torch

    torch.zeros(1, device="cuda")
    if os.environ.get("PROBE_BLAS"):
        torch.backends.cuda.preferred_blas_library(os.environ["PROBE_BLAS"])
    init_s = time.perf_counter() - t
    ws = [torch.randn(o, i, device="cuda", dtype=torch.bfloat16) for i, o in SHAPES]
    rows = {}
    for M in ROWS:
        xs = [torch.randn(M, i, device="cuda", dtype=torch.bfloat16) for i, _ in SHAPES]
        torch.cuda.synchronize()
        first, second = 0.0, 0.0
        for x, w in zip(xs, ws):
            for n in range(2):
                t = time.perf_counter()
                torch.nn.functional.linear(x, w)
                dt = time.perf_counter() - t
                first, second = (first + dt, second) if n == 0 else (first, second + dt)
            torch.cuda.synchronize()
        rows[M] = {"first_ms": first * 1e3, "second_ms": second * 1e3}
        del xs
    card = torch.cuda.get_device_name(0)
    print(json.dumps({"init_s": init_s, "torch": torch.__version__, "card": card, "rows": rows}))


def child_threads():
    import threading

    import torch

    torch.zeros(1, device="cuda")
    ws = [torch.randn(o, i, device="cuda", dtype=torch.bfloat16) for i, o in SHAPES]

    def products(M):
        return [torch.randn(M, i, device="cuda", dtype=torch.bfloat16) for i, _ in SHAPES]

    def timed(xs):
        per = []
        for x, w in zip(xs, ws):
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            per.append(time.perf_counter() - t)
        return sum(per) * 1e3

    def warm(xs, parts, done):
        def work(idx):
            t = time.perf_counter()
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                for j in idx:
                    torch.nn.functional.linear(xs[j], ws[j])
            done.append(time.perf_counter() - t)

        order = list(range(len(SHAPES)))[::-1]  # the main thread goes first to last
        threads = [threading.Thread(target=work, args=(order[k::parts],)) for k in range(parts)]
        for th in threads:
            th.start()
        return threads

    timed(products(2048))
    torch.cuda.synchronize()
    rows = {}
    for variant in ("none", "joined-1", "joined-4", "concurrent-1", "concurrent-4", "concurrent-13", "none"):
        for base in (8000, 32000):
            M = base + len(rows) + 1
            xs = products(M)
            torch.cuda.synchronize()
            done, threads = [], []
            if variant != "none":
                threads = warm(xs, int(variant.split("-")[1]), done)
                if variant.startswith("joined"):
                    for th in threads:
                        th.join()
                    torch.cuda.synchronize()
            main_ms = timed(xs)
            for th in threads:
                th.join()
            torch.cuda.synchronize()
            rows[f"{variant}@{M}"] = {"main_first_ms": main_ms, "second_ms": timed(xs),
                                      "worker_ms": [round(d * 1e3, 2) for d in done]}  # fmt: skip
            print(f"{variant:14s} M={M}: main thread {main_ms:.1f} ms first, {rows[f'{variant}@{M}']['second_ms']:.1f} "
                  f"warm; workers {rows[f'{variant}@{M}']['worker_ms']} ms", file=sys.stderr, flush=True)  # fmt: skip
            del xs
    print(json.dumps({"torch": torch.__version__, "card": torch.cuda.get_device_name(0), "rows": rows}))


def child_handles():
    """Is cuBLAS's per-shape choice kept per thread or per process, and per exact row count? Each step's first call
    on the main thread, at row counts chosen so that no earlier step decides it, one process per BLAS backend."""
    import threading

    import torch

    torch.zeros(1, device="cuda")
    if os.environ.get("PROBE_BLAS"):
        torch.backends.cuda.preferred_blas_library(os.environ["PROBE_BLAS"])
    ws = [torch.randn(o, i, device="cuda", dtype=torch.bfloat16) for i, o in SHAPES]

    def run(M):
        xs = [torch.randn(M, i, device="cuda", dtype=torch.bfloat16) for i, _ in SHAPES]
        torch.cuda.synchronize()
        t = time.perf_counter()
        for x, w in zip(xs, ws):
            torch.nn.functional.linear(x, w)
        dt = (time.perf_counter() - t) * 1e3
        torch.cuda.synchronize()
        return dt

    def on_thread(M):
        out = []
        th = threading.Thread(target=lambda: out.append(run(M)))
        th.start()
        th.join()
        return out[0]

    steps = [("main", 2048), ("main", 2048), ("thread", 20000), ("main", 20000), ("main", 40000), ("main", 40000),
             ("main", 40001), ("main", 40064), ("main", 41000), ("thread", 60000), ("main", 60000), ("main", 60001),
             ("main", 9000), ("thread", 9001), ("main", 14000), ("main", 14000)]  # fmt: skip
    rows = []
    for who, M in steps:
        ms = run(M) if who == "main" else on_thread(M)
        rows.append({"thread": who, "rows": M, "host_ms": ms})
        print(f"  {who:6s} M={M:6d}: {ms:6.1f} ms", file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "card": torch.cuda.get_device_name(0),
                "blas": os.environ.get("PROBE_BLAS") or "default",
                "steps": rows,
            }
        )
    )


LADDER = [64, 256, 1024, 2048, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536, 131072]
SEQUENCE = [8000, 8001, 9100, 12001, 12002, 16000, 20000, 32001, 50001, 100003, 131071]


def child_ladder():
    """Per shape, the host ms of the first call at each row count of SEQUENCE, in a process that ran nothing before
    (PROBE_PREWARM unset) or ran every shape once at each row count of LADDER first: are the ~4 ms first calls cuBLAS
    loading a kernel it had not used yet (gone after the ladder, and under CUDA_MODULE_LOADING=EAGER) or its choice
    at that exact shape?"""
    import torch

    torch.zeros(1, device="cuda")
    ws = [torch.randn(o, i, device="cuda", dtype=torch.bfloat16) for i, o in SHAPES]
    prewarm_s = 0.0
    if os.environ.get("PROBE_PREWARM"):
        t = time.perf_counter()
        for M in LADDER:
            for (i, _), w in zip(SHAPES, ws):
                torch.nn.functional.linear(torch.empty(M, i, device="cuda", dtype=torch.bfloat16), w)
            torch.cuda.synchronize()
        prewarm_s = time.perf_counter() - t
    rows = {}
    for M in SEQUENCE:
        xs = [torch.randn(M, i, device="cuda", dtype=torch.bfloat16) for i, _ in SHAPES]
        torch.cuda.synchronize()
        per = []
        for x, w in zip(xs, ws):
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            per.append(round((time.perf_counter() - t) * 1e3, 2))
            torch.cuda.synchronize()
        rows[M] = per
        print(f"  M={M:6d}: {sum(per):6.1f} ms; per shape {per}", file=sys.stderr, flush=True)
        del xs
    print(json.dumps({"torch": torch.__version__, "card": torch.cuda.get_device_name(0), "prewarm_s": prewarm_s,
                      "shapes": SHAPES, "rows": rows}))  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--threads", action="store_true", help="only the worker-thread probe")
    ap.add_argument("--handles", action="store_true", help="only the per-thread / per-row-count probe")
    ap.add_argument("--ladder", action="store_true", help="only the per-shape probe: kernel loading or choice?")
    args = ap.parse_args()
    if args.child:
        if args.ladder:
            return child_ladder()
        return child_threads() if args.threads else child_handles() if args.handles else child()
    if args.ladder:
        runs = {}
        for mode in ("LAZY", "EAGER", "LAZY+prewarm", "EAGER+prewarm"):
            env = dict(os.environ, CUDA_MODULE_LOADING=mode.split("+")[0], PROBE_PREWARM="1" if "+" in mode else "")
            cmd = [sys.executable, __file__, "--out-dir", str(args.out_dir), "--child", "--ladder"]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            print(f"{mode}:\n{res.stderr[-4000:]}", flush=True)
            runs[mode] = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else res.stderr[-2000:]
            if isinstance(runs[mode], dict):
                print(f"  prewarm {runs[mode]['prewarm_s']:.2f} s", flush=True)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "probe_first_shapes_ladder.json").write_text(json.dumps(runs, indent=1))
        return
    if args.handles:
        runs = []
        for blas in ("", "cublaslt"):
            cmd = [sys.executable, __file__, "--out-dir", str(args.out_dir), "--child", "--handles"]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PROBE_BLAS=blas))
            print(f"BLAS backend {blas or 'default'}:\n{res.stderr[-3000:]}", flush=True)
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else res.stderr[-2000:])
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "probe_first_shapes_handles.json").write_text(json.dumps(runs, indent=1))
        return
    if args.threads:
        cmd = [sys.executable, __file__, "--out-dir", str(args.out_dir), "--child", "--threads"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        print(res.stderr[-6000:], flush=True)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "probe_first_shapes_threads.json").write_text(res.stdout)
        return
    report = {"date": time.strftime("%Y-%m-%d"), "modes": {}}
    for mode in ("LAZY", "EAGER", "LAZY+cublaslt"):
        env = dict(os.environ, CUDA_MODULE_LOADING=mode.split("+")[0], PROBE_BLAS=mode.partition("+")[2])
        cmd = [sys.executable, __file__, "--out-dir", str(args.out_dir), "--child"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-2000:])
            continue
        r = report["modes"][mode] = json.loads(res.stdout.strip().splitlines()[-1])
        cells = "  ".join(f"{M}: {v['first_ms']:.1f}/{v['second_ms']:.1f}" for M, v in r["rows"].items())
        print(f"CUDA_MODULE_LOADING={mode}: CUDA init {r['init_s']:.2f} s; host ms of {len(SHAPES)} products, "
              f"first/second call, per row count: {cells}", flush=True)  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "probe_first_shapes.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
