"""Probe: launch settings of the fused LoRA kernels (kernels/lora.py) on the card, each kernel alone at the bench
model's shapes (4096 tokens, rank 16), then a whole adapted layer's forward + backward with the settings in force
against PEFT's arithmetic (the twin, float32 adapter products). Prints tables; --out-dir gets probe_lora.json.

    python benchmarks/probe_lora_kernels.py --out-dir /tmp/probe
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
from triton.testing import do_bench

from kimi_linear_kernels import lora

SHAPES = [(2304, 4096), (4096, 2304), (2304, 128), (128, 4096), (2304, 32), (9216, 2304), (2304, 9216)]  # (in, out)


def us(fn):
    try:
        return do_bench(fn, warmup=10, rep=50) * 1e3
    except Exception as err:  # a setting that does not compile here: reported, not fatal
        print(f"  failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
        return float("inf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out-dir", type=Path)
    args = ap.parse_args()
    M, r = args.rows, args.rank
    import triton

    print(f"{torch.cuda.get_device_name(0)} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    report = {"card": torch.cuda.get_device_name(0), "rows": M, "rank": r, "down": [], "outer": [], "up": [],
              "layer": []}  # fmt: skip
    defaults = (dict(lora.DOWN), dict(lora.UP), dict(lora.OUTER), lora.PRECISION)

    def restore():
        lora.DOWN, lora.UP, lora.OUTER, lora.PRECISION = (dict(defaults[0]), dict(defaults[1]), dict(defaults[2]),
                                                          defaults[3])  # fmt: skip

    for prec, bm, bk, stages in itertools.product(["ieee", "tf32x3"], [16, 32], [64, 128, 256], [3]):
        lora.PRECISION, lora.DOWN = prec, {"BM": bm, "BK": bk, "num_warps": 4, "num_stages": stages}
        row = {"prec": prec, "BM": bm, "BK": bk, "stages": stages}
        for K in (2304, 4096, 9216):
            x = torch.randn(M, K, device=dev, generator=gen).bfloat16()
            a = torch.randn(r, K, device=dev, generator=gen)
            row[f"K={K}"] = us(lambda: lora._down_call(x, a, a.stride(0), a.stride(1), r, 1.0))  # noqa: B023
        report["down"].append(row)
        restore()
    for prec, bm, bn, stages in itertools.product(["ieee", "tf32x3"], [64, 128], [32, 64], [3]):
        lora.PRECISION, lora.OUTER = prec, {"BM": bm, "BN": bn, "num_warps": 4, "num_stages": stages}
        row = {"prec": prec, "BM": bm, "BN": bn, "stages": stages}
        for N in (2304, 4096, 128):
            y = torch.randn(M, N, device=dev, generator=gen).bfloat16()
            z = torch.randn(M, r, device=dev, generator=gen)
            p = torch.empty(r, N, device=dev)
            row[f"N={N}"] = us(lambda: lora._outer_call(z, y, p, 1.0, None, None, None, 1.0))  # noqa: B023
        report["outer"].append(row)
        restore()
    for prec, (bm, bn) in itertools.product(["ieee", "tf32x3"], [(64, 128), (128, 128), (64, 256)]):
        lora.PRECISION, lora.UP = prec, {"BM": bm, "BN": bn, "num_warps": 4 if bm * bn <= 8192 else 8, "num_stages": 2}
        row = {"prec": prec, "BM": bm, "BN": bn}
        for N in (2304, 4096):
            y = torch.randn(M, N, device=dev, generator=gen).bfloat16()
            z = torch.randn(M, r, device=dev, generator=gen)
            b = torch.randn(N, r, device=dev, generator=gen)
            row[f"N={N}"] = us(lambda: lora._up_call(y, z, b, b.stride(1), b.stride(0), 1.0))  # noqa: B023
        report["up"].append(row)
        restore()

    for name in ("down", "outer", "up"):
        rows = report[name]
        cols = [k for k in rows[0] if "=" in k]
        rows.sort(key=lambda row: sum(row[c] for c in cols))
        print(f"\n{name}: fastest settings first (us per call at {M} rows, rank {r})")
        for row in rows[:8] + [row for row in rows if row.get("prec") == "ieee"][:1]:
            print("  " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    print(f"\nlayer forward + backward, settings in force {lora.DOWN} {lora.UP} {lora.OUTER} {lora.PRECISION}")
    for K, N in SHAPES:
        x = torch.randn(M, K, device=dev, generator=gen).bfloat16().requires_grad_()
        w = (torch.randn(N, K, device=dev, generator=gen) / K**0.5).bfloat16()
        a = torch.randn(r, K, device=dev, generator=gen).requires_grad_()
        b = torch.randn(N, r, device=dev, generator=gen).requires_grad_()
        dy = torch.randn(M, N, device=dev, generator=gen).bfloat16()
        row = {"in": K, "out": N}
        for impl, fn in (("fused", lora.lora_linear), ("peft", lora.lora_linear_torch), ("base", None)):
            if fn is None:
                step = lambda: torch.autograd.grad(torch.nn.functional.linear(x, w), x, dy)  # noqa: B023, E731
            else:
                step = lambda: torch.autograd.grad(fn(x, w, None, a, b, 2.0), (x, a, b), dy)  # noqa: B023, E731
            row[impl] = us(step)
        report["layer"].append(row)
        print(f"  {K:5d} -> {N:5d}: fused {row['fused']:7.1f} us  PEFT {row['peft']:7.1f} us  base linear alone "
              f"{row['base']:7.1f} us")  # fmt: skip
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "probe_lora.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
