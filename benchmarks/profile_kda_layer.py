"""Where one KDA layer's prefill and training time goes on a GPU: torch.profiler over the layer at the released size
(hidden 2304 as in bench_1b, 32 heads x 128, bf16), grouped by kernel, next to the layer's projections alone.

    python benchmarks/profile_kda_layer.py --out-dir benchmarks/results      # on a CUDA machine (bash .ci/gpu profile)

For each --lengths T: the forward under no_grad and (up to --train-max) forward + backward, after two untimed
calls (fla's kernels compile on the first); then one short convolution + SiLU alone (the layer runs three), timed
for the current F.conv1d, W shifted multiply-adds, and fla's causal_conv1d. Prints, per case, the wall time per
call and the kernels that take the most GPU time (self CUDA time, summed over --reps calls, divided by --reps), and
writes profile_kda_layer.json with the same rows, the card, versions and date. A diagnostic: the timings that count
are benchmarks/kda_gpu.py's.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from kda_gpu import measure, metadata  # noqa: E402


def build_layer():
    from kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from kimi_linear.modeling_kimi_linear import KimiDeltaAttention

    config = KimiLinearConfig(**json.loads((HERE / "configs" / "bench_1b_hybrid.json").read_text()))
    layer = KimiDeltaAttention(config, layer_idx=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
        layer.A_log.copy_(torch.empty_like(layer.A_log).uniform_(1, 16).log())
    return layer.cuda().bfloat16(), config.hidden_size


def profile_case(fn, reps, top):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / reps
    rows = []
    for e in prof.key_averages():
        cuda_us = getattr(e, "self_device_time_total", None)
        if cuda_us is None:
            cuda_us = getattr(e, "self_cuda_time_total", 0)
        if cuda_us > 0:
            rows.append({"name": e.key[:110], "gpu_ms_per_call": cuda_us / 1e3 / reps, "launches": e.count // reps})
    rows.sort(key=lambda r: -r["gpu_ms_per_call"])
    gpu_total = sum(r["gpu_ms_per_call"] for r in rows)
    return {"wall_ms": wall * 1e3, "gpu_ms": gpu_total, "top": rows[:top]}


def shifted_conv(x, weight):
    """Causal depthwise conv + SiLU as W shifted multiply-adds in [B, T, D] (no transposes), float32 sums."""
    W, T = weight.shape[-1], x.shape[1]
    xp = torch.cat([x.new_zeros(x.shape[0], W - 1, x.shape[2]), x], dim=1)
    w = weight[:, 0, :].float()
    acc = xp[:, :T].float() * w[:, 0]
    for i in range(1, W):
        acc = acc.addcmul(xp[:, i : i + T], w[:, i])
    return torch.nn.functional.silu(acc).to(x.dtype)


def conv_variants(T, D, W=4):
    """Milliseconds (median, CUDA events) of one short convolution + SiLU at [1, T, D] bf16, forward and forward +
    backward, for the layer's current implementation and two candidates."""
    from kimi_linear.modeling_kimi_linear import short_conv

    x = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(D, 1, W, device="cuda", dtype=torch.bfloat16) * 0.5
    variants = {"F.conv1d (current)": lambda x, w: short_conv(x, w)[0], "shifted multiply-adds": shifted_conv}
    try:
        from fla.modules.causal_conv1d import causal_conv1d

        variants["fla causal_conv1d"] = lambda x, w: causal_conv1d(x, w[:, 0, :], activation="silu")[0]
    except ImportError as err:
        print(f"note: no fla causal_conv1d ({err})", flush=True)
    rows = {}
    for name, fn in variants.items():
        xg, wg = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.no_grad():
            fwd = measure(lambda fn=fn: fn(x, weight))
        train = measure(lambda fn=fn, xg=xg, wg=wg: fn(xg, wg).float().sum().backward())
        rows[name] = {"forward_ms": fwd, "forward_backward_ms": train}
        print(f"  conv T={T}: {name:24s} forward {fwd:8.3f} ms   forward + backward {train:8.3f} ms", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 65536], help="(default: %(default)s)")
    ap.add_argument("--train-max", type=int, default=16384, help="longest fwd+bwd profiled (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="(default: %(default)s)")
    ap.add_argument("--top", type=int, default=20, help="kernels listed per case (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results", help="(default: %(default)s)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: needs a CUDA GPU (the profile is of GPU kernels)")
    import kimi_linear_kernels as kernels

    if kernels.kda_backend(torch.zeros(1, device="cuda")) != "triton":
        print(f"note: KDA runs on the PyTorch path here ({kernels.fla_status()[1]})", flush=True)
    layer, hidden = build_layer()
    report = {"metadata": metadata(), "cases": []}
    for T in args.lengths:
        x = torch.randn(1, T, hidden, device="cuda", dtype=torch.bfloat16)
        cases = [("forward", lambda x=x: layer(x)), ("projections only", lambda x=x: layer._raw(x))]
        if T <= args.train_max:
            xg = x.clone().requires_grad_(True)
            cases.append(("forward + backward", lambda xg=xg: layer(xg).sum().backward()))
        for name, fn in cases:
            with torch.no_grad() if name != "forward + backward" else torch.enable_grad():
                r = profile_case(fn, args.reps, args.top)
            r.update(T=T, case=name)
            report["cases"].append(r)
            print(f"\nT={T} {name}: {r['wall_ms']:.2f} ms wall, {r['gpu_ms']:.2f} ms of GPU kernels", flush=True)
            for row in r["top"]:
                print(f"  {row['gpu_ms_per_call']:9.3f} ms  x{row['launches']:<4d} {row['name']}", flush=True)
        layer.zero_grad(set_to_none=True)
        report.setdefault("short_conv", {})[T] = conv_variants(T, layer.q_proj.out_features)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "profile_kda_layer.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
