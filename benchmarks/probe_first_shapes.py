"""Probe: what the first matrix product at a new number of rows costs on the host (cuBLAS, bf16), at the bench
model's projection shapes. The bench model's first prefill at a new length spends 12-20 ms more host time in its
first layers than a warm one (benchmarks/results/probe_mla_prefill.log); at short lengths, where the host sets the
pace, that is the prompt's extra time. Per row count: the host time of each shape's first call, against its second.
Runs with CUDA_MODULE_LOADING=EAGER beside the default (LAZY), to see how much is cuBLAS loading kernels on first use
rather than choosing them per shape, and with PyTorch's cuBLASLt path preferred.

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child()
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
