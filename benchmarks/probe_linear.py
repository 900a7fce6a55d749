"""Probe: the model's projections through kernels/gemm.py (a Triton product compiled once for every number of rows)
and torch's CUTLASS grouped product (torch._grouped_mm as one batch of one) against cuBLAS (F.linear), at the bench
model's 13 projection shapes and row counts from a short prompt to 128k tokens.

Per shape and row count: GPU time of a warm call (CUDA events around 10 calls enqueued back to back, median of 5),
host time per call, the host time of the first call at a row count the process has not run (cuBLAS chooses its
kernel then; the others have nothing to choose), and the error against float64. Then a sweep of tile settings at the
low-rank shapes (at most 576 inputs or outputs), 8000 and 32768 rows, for gemm's fixed tiles; with --sweep-shapes
wide, at the wide shapes, 2001-32768 rows, with larger tiles and grouped program orders too (can fixed tiles per
shape come near cuBLAS there?). With --model-calls, the model's wide calls as it makes them (up to three weights in
one launch), cuBLAS against gemm's fixed tiles, its WIDE ones and the ones it picks.
Prints tables, writes probe_linear.json and a PNG (GPU time over cuBLAS's per shape and row count).

    python benchmarks/probe_linear.py --out-dir /tmp/probe
"""

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from probe_first_shapes import SHAPES  # the bench model's 13 projection shapes (in, out), beside this script

# the router (2304 -> 16) multiplies in float32, as the model runs it
ROUTER = (2304, 16)
ROWS = [7, 100, 300, 2048, 8000, 12001, 32768, 50001, 131072]
SWEEP_ROWS = [8000, 32768]
# (BM, BN, BK, warps, stages)
SETTINGS = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
            (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (128, 32, 128, 4, 3), (64, 64, 64, 4, 4)]  # fmt: skip
# more for the wide shapes (--sweep-shapes wide): larger tiles, deeper pipelines, and programs in groups of 8 row
# blocks (a sixth entry, gemm's GROUP_M: each weight tile read once per group of row blocks; gemm.WIDE is the last
# but one)
WIDE_SETTINGS = [(128, 256, 64, 8, 4), (256, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 256, 32, 8, 5),
                 (64, 256, 64, 4, 4), (128, 128, 32, 4, 5), (128, 128, 64, 4, 4, 8), (128, 128, 64, 8, 4, 8),
                 (128, 256, 64, 8, 3, 8), (256, 128, 64, 8, 3, 8), (128, 256, 64, 8, 4, 8)]  # fmt: skip
WIDE_SWEEP_ROWS = [2001, 8000, 12001, 32768]
# --model-calls: the model's wide calls as it makes them (several weights in one launch), (name, in, outs)
MODEL_CALLS = [("KDA q/k/v", 2304, (4096, 4096, 4096)), ("dense MLP gate/up", 2304, (9216, 9216)),
               ("MLA q_proj", 2304, (6144,)), ("KDA o_proj", 4096, (2304,)), ("dense MLP down", 9216, (2304,)),
               ("shared expert gate/up", 2304, (1024, 1024))]  # fmt: skip
MODEL_CALL_ROWS = [2001, 3809, 5001, 8000, 32768]  # 3809: the rows a 12001-token prompt leaves to the product


def gpu_ms(fn, reps=10, runs=5):
    """GPU ms per call, calls enqueued back to back (so that launch gaps do not count), median of runs."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(runs):
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / reps)
    return statistics.median(out)


def host_us(fn, reps=20):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / reps * 1e6


def first_ms(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt * 1e3


def operands(M, k, n, gen):
    x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device="cuda", generator=gen) / k**0.5
    return x, w.float() if (k, n) == ROUTER else w.bfloat16()


def products(gemm):
    """name -> product(x, w) = x @ w.T: cuBLAS (F.linear; the router in float32 as the model runs it), torch's
    CUTLASS grouped product as one batch of one (bfloat16 only), and kernels/gemm.py."""

    def cublas(x, w):
        return F.linear(x.float(), w) if w.dtype == torch.float32 else F.linear(x, w)

    def grouped(x, w):
        if w.dtype == torch.float32:
            return F.linear(x.float(), w)
        return torch._grouped_mm(x[None], w.t()[None])[0]

    def triton(x, w, tiles=None):
        return gemm.products(x.to(w.dtype), w, tiles=tiles)[0]

    return {"cuBLAS": cublas, "grouped": grouped, "Triton": triton}


def each_linear(x, ws):
    return [F.linear(x, w) for w in ws]


def model_calls(gemm, gen):
    """GPU us of each MODEL_CALLS call at MODEL_CALL_ROWS: cuBLAS (F.linear per weight), gemm's fixed tiles, its WIDE
    ones, and the tiles it picks for that call on this GPU (gemm.tiles_for); printed and returned."""
    fixed = gemm.FIXED
    props = torch.cuda.get_device_properties(0)
    print(f"\nthe model's wide calls, GPU us (L2 {props.L2_cache_size / 2**20:.0f} MiB); fixed {fixed}, "
          f"WIDE {gemm.WIDE}")  # fmt: skip
    print(f"{'rows':>6} {'call':>22} {'weights MB':>10} {'cuBLAS':>8} {'fixed':>8} {'WIDE':>8} {'picked':>8} "
          f"{'fixed/cuBLAS':>12} {'WIDE/cuBLAS':>11} {'picked/cuBLAS':>13} picked tiles")  # fmt: skip
    out = {}
    for M in MODEL_CALL_ROWS:
        for name, K, ns in MODEL_CALLS:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            ws = [(torch.randn(n, K, device="cuda", generator=gen) / K**0.5).bfloat16() for n in ns]
            nbytes = sum(ns) * K * 2
            picked = gemm.tiles_for(sum(ns), props.shared_memory_per_block_optin)
            c = {"weights_mb": nbytes / 1e6, "picked": list(picked),
                 "cublas_us": gpu_ms(functools.partial(each_linear, x, ws)) * 1e3,
                 "fixed_us": gpu_ms(functools.partial(gemm.products, x, *ws, tiles=fixed)) * 1e3,
                 "wide_us": gpu_ms(functools.partial(gemm.products, x, *ws, tiles=gemm.WIDE)) * 1e3,
                 "picked_us": gpu_ms(functools.partial(gemm.products, x, *ws)) * 1e3}  # fmt: skip
            out[f"{M} {name}"] = c
            print(f"{M:>6} {name:>22} {c['weights_mb']:>10.1f} {c['cublas_us']:>8.1f} {c['fixed_us']:>8.1f} "
                  f"{c['wide_us']:>8.1f} {c['picked_us']:>8.1f} {c['fixed_us'] / c['cublas_us']:>12.2f} "
                  f"{c['wide_us'] / c['cublas_us']:>11.2f} {c['picked_us'] / c['cublas_us']:>13.2f} {picked}",
                  flush=True)  # fmt: skip
            del x, ws
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--rows", type=int, nargs="*", default=ROWS)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-shapes", choices=["low-rank", "wide"], default="low-rank",
                    help="the tile sweep over the low-rank shapes (at most 576 inputs or outputs; SWEEP_ROWS) or the "
                    "wide ones (WIDE_SWEEP_ROWS, SETTINGS and WIDE_SETTINGS) (default: %(default)s)")  # fmt: skip
    ap.add_argument("--model-calls", action="store_true",
                    help="time the model's wide calls (MODEL_CALLS, several weights in one launch) at MODEL_CALL_ROWS: "
                    "cuBLAS (one F.linear per weight), the fixed tiles and the tiles gemm.py picks")  # fmt: skip
    args = ap.parse_args()
    import triton

    try:
        from kimi_linear_kernels import gemm
    except ImportError:
        from kernels import gemm
    prods = products(gemm)
    gen = torch.Generator(device="cuda").manual_seed(0)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "card": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "triton": triton.__version__, "rows": {}, "sweep": {}}  # fmt: skip
    # compile every Triton setting the rule picks, and load the grouped product's kernels, at row counts not timed
    t = time.perf_counter()
    for M in (64, 4096):
        for k, n in SHAPES:
            x, w = operands(M, k, n, gen)
            prods["Triton"](x, w)
            prods["grouped"](x, w)
    torch.cuda.synchronize()
    report["warmup_s"] = time.perf_counter() - t
    print(f"{report['card']} | torch {report['torch']} | triton {report['triton']} | compiling and loading: "
          f"{report['warmup_s']:.1f} s", flush=True)  # fmt: skip
    names = list(prods)
    head = " ".join(f"{n:>8}" for n in names)
    print(f"\n{'rows':>7} {'in x out':>12} | first call host ms: {head} | warm GPU us: {head} | host us/call: {head} "
          f"| error vs float64: {head}")  # fmt: skip
    for M in args.rows:
        cells = report["rows"][M] = {}
        for k, n in SHAPES:
            x, w = operands(M, k, n, gen)
            fns = {name: functools.partial(f, x, w) for name, f in prods.items()}
            c = {f"{name}_first_ms": first_ms(fn) for name, fn in fns.items()}
            c |= {f"{name}_gpu_us": gpu_ms(fn) * 1e3 for name, fn in fns.items()}
            c |= {f"{name}_host_us": host_us(fn) for name, fn in fns.items()}
            if M <= 32768:
                ref = x.double() @ w.double().T
                c |= {f"{name}_err": ((fn().double() - ref).norm() / ref.norm()).item() for name, fn in fns.items()}
            cells[f"{k}x{n}"] = c

            def row(kind, fmt, c=c):
                return " ".join(format(c.get(f"{name}_{kind}", 0.0), fmt) for name in names)

            print(f"{M:>7} {f'{k}x{n}':>12} | {'':>19} {row('first_ms', '>8.2f')} | {'':>11} "
                  f"{row('gpu_us', '>8.1f')} | {'':>12} {row('host_us', '>8.1f')} | {'':>17} {row('err', '>8.1e')}",
                  flush=True)  # fmt: skip
            del x, w
        tot = {key: sum(c[key] for c in cells.values()) for key in next(iter(cells.values())) if "err" not in key}
        print(f"{M:>7} {'all 13':>12} | {'':>19} {row('first_ms', '>8.2f', tot)} | {'':>11} "
              f"{row('gpu_us', '>8.1f', tot)} | {'':>12} {row('host_us', '>8.1f', tot)} |", flush=True)  # fmt: skip
    if not args.no_sweep:
        fixed = gemm.FIXED[:5]  # as the settings write it: GROUP_M 1 left out
        wide = args.sweep_shapes == "wide"
        settings = [fixed] + [s for s in SETTINGS + (WIDE_SETTINGS if wide else []) if s != fixed]
        print(f"\nsweep at the {args.sweep_shapes} shapes: GPU us per setting (BM, BN, BK, warps, stages[, GROUP_M]); "
              f"* = the fixed {fixed}", flush=True)  # fmt: skip
        for M in WIDE_SWEEP_ROWS if wide else SWEEP_ROWS:
            for k, n in SHAPES:
                if (min(k, n) > 576) != wide:
                    continue
                x, w = operands(M, k, n, gen)
                res = {"cublas": gpu_ms(functools.partial(prods["cuBLAS"], x, w)) * 1e3}
                for s in settings:
                    try:
                        prods["Triton"](x, w, tiles=s)
                        res[str(s)] = gpu_ms(functools.partial(prods["Triton"], x, w, tiles=s)) * 1e3
                    except Exception as err:  # noqa: BLE001 (out of shared memory, for one)
                        res[str(s)] = repr(err)[:80]
                report["sweep"][f"{M} {k}x{n}"] = res
                ok = {s: v for s, v in res.items() if isinstance(v, float) and s != "cublas"}
                best = min(ok, key=ok.get)
                each = " ".join(f"{v:.0f}" for v in ok.values())
                print(f"{M:>7} {f'{k}x{n}':>12} cuBLAS {res['cublas']:8.1f} | best {best} {ok[best]:8.1f} | fixed "
                      f"{ok.get(str(fixed), float('nan')):8.1f} | {each}", flush=True)  # fmt: skip
                del x, w
    if args.model_calls:
        report["model_calls"] = model_calls(gemm, gen)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "probe_linear.json").write_text(json.dumps(report, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for k, n in SHAPES:
        ys = [report["rows"][M][f"{k}x{n}"] for M in args.rows]
        for name, style in (("Triton", "-"), ("grouped", "--")):
            ax.plot(args.rows, [c[f"{name}_gpu_us"] / c["cuBLAS_gpu_us"] for c in ys], style, marker="o",
                    label=f"{name} {k}x{n}")  # fmt: skip
    ax.set_xscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("rows (tokens)")
    ax.set_ylabel("GPU time / cuBLAS's")
    ax.set_title(f"kernels/gemm.py and torch._grouped_mm vs cuBLAS, bf16 ({report['card']}, torch {report['torch']}, "
                 f"triton {report['triton']}, {report['date']})", fontsize=9)  # fmt: skip
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out_dir / "probe_linear.png", dpi=120)


if __name__ == "__main__":
    main()
