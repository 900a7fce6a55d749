"""Where one decode step of the whole model goes, kernel by kernel: the CUDA-graph replay and the same step eager.

    python benchmarks/profile_decode.py --out-dir benchmarks/results                 # a CUDA machine (~1 min)
    python benchmarks/profile_decode.py --device cpu --config conversion/configs/tiny.json --context 64   # smoke

The model (--config, default benchmarks/configs/bench_1b_hybrid.json; random weights, bf16 on CUDA) gets a static
cache filled to --context tokens with random values (as decode_gpu.py does past its prefill limit), then --steps
greedy decode steps run under torch.profiler, first replayed from the CUDA graph, then eagerly on a growing cache
over the same tensors. Per variant: wall time per step, GPU kernel time per step (their sum), kernels launched per
step, and the kernels by total time; with the floor (bytes a step must move / copy bandwidth, decode_gpu.py) beside
it. Wall time well above kernel time means gaps between kernels (launches, host work); kernel time well above the
floor means kernels that move or compute more than they must. Writes profile_decode.json and prints the tables.
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode_gpu import (  # noqa: E402
    copy_bandwidth,
    fill,
    growing_view,
    metadata,
    out_cache,
    step_bytes,
    sync,
)

from kimi_linear.configuration_kimi_linear import KimiLinearConfig  # noqa: E402
from kimi_linear.modeling_kimi_linear import (  # noqa: E402
    KimiLinearForCausalLM,
    KimiLinearStaticCache,
    KimiMLAAttention,
)


def profile_steps(model, cache, nxt, steps, device):
    """(wall seconds per step, {kernel name: [total us, calls]}) over `steps` greedy steps after two untimed ones."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # the graph variant captures on its first step
        out = model(nxt, cache=cache, use_cache=True)
        cache, nxt = out_cache(out, cache), out.logits[:, -1:].argmax(-1)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, cache=cache, use_cache=True)
            cache, nxt = out_cache(out, cache), out.logits[:, -1:].argmax(-1)
        sync(device)
        wall = (time.perf_counter() - start) / steps
    return wall, kernel_table(prof, steps, device), cache


def kernel_table(prof, steps, device):
    """{name: [microseconds per step, launches per step]} of a torch.profiler run over `steps` steps: the CUDA
    kernels on a GPU, the top-level operators on a CPU."""
    kernels = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        on_device = e.device_type == torch.autograd.DeviceType.CUDA if device.type == "cuda" else e.cpu_parent is None
        if on_device:
            k = kernels[e.name]
            k[0] += (e.device_time if device.type == "cuda" else e.cpu_time_total) / steps
            k[1] += 1 / steps
    return dict(kernels)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=HERE / "configs" / "bench_1b_hybrid.json")
    ap.add_argument("--context", type=int, default=8192, help="(default: %(default)s)")
    ap.add_argument("--batch", type=int, default=1, help="(default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps (default: %(default)s)")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per variant (default: %(default)s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results", help="(default: %(default)s)")
    ap.add_argument(
        "--mla-decode-products", action="store_true", help="KimiMLAAttention.decode_kernel off (two batched products)"
    )
    args = ap.parse_args()
    KimiMLAAttention.decode_kernel = not args.mla_decode_products
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = KimiLinearConfig(**json.loads(args.config.read_text()))
    torch.manual_seed(0)
    with torch.device(device):
        model = KimiLinearForCausalLM(config).to(dtype).eval()
    length = args.context + 2 * args.steps + 8
    cache = KimiLinearStaticCache(config, max_length=length, batch_size=args.batch, dtype=dtype, device=device)
    fill_args = argparse.Namespace(prefill_max=0, prefill_chunk=8192)
    fill(model, cache, args.batch, args.context, fill_args, device)
    nxt = torch.randint(3, config.vocab_size, (args.batch, 1), device=device)
    bandwidth = copy_bandwidth(device)
    floor_us = step_bytes(model, config, args.batch, args.context, dtype) / bandwidth * 1e6
    report = {"metadata": metadata(device), "config": args.config.name, "context": args.context, "batch": args.batch,
              "floor_us": floor_us, "copy_bandwidth_bytes_per_s": bandwidth, "variants": {}}  # fmt: skip
    with torch.no_grad():
        for variant in ("cuda_graph", "eager"):
            use = cache if variant == "cuda_graph" else growing_view(cache, config)
            wall, kernels, _ = profile_steps(model, use, nxt, args.steps, device)
            mode = cache.decode_mode if variant == "cuda_graph" else "eager"
            busy = sum(t for t, _ in kernels.values())
            launched = sum(n for _, n in kernels.values())
            top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]
            report["variants"][variant] = {"decode_mode": mode, "wall_us": wall * 1e6, "kernel_us": busy,
                                           "kernels_per_step": launched,
                                           "top": [{"name": n, "us": t, "calls": c} for n, (t, c) in top]}  # fmt: skip
            print(f"\n{variant} ({mode}): {wall * 1e6:.0f} us per step wall, {busy:.0f} us of kernels, "
                  f"{launched:.0f} kernels per step; floor {floor_us:.0f} us")  # fmt: skip
            for n, (t, c) in top:
                print(f"  {t:9.1f} us  x{c:5.1f}  {n[:110]}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "profile_decode.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
