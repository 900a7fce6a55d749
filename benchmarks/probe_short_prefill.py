"""Probe: where a prefill of a few thousand tokens spends its time, and what its first call at a new length adds.

The bench model's warm prefill takes about 45-50 ms at every length from 2k to 11k tokens (results/new_lengths_*),
so the host sets the pace there, and a first call at a new length still costs 5-15 ms more at 2k-7k tokens. This
probe, on the bench model (bench_1b_hybrid, random weights, bf16, after a first prefill at 32768 and 8192 tokens):

  hooks     per new length, the host time of each part of the model (attention, MoE or MLP, norms; forward hooks
            with no synchronisation, so a part that waits for the GPU shows it) in the first call and in a warm one,
            and each call's wall time and GPU kernel time
  profile   per new length, the first and a warm call under torch.profiler: the operators (with their input shapes)
            whose host time grew, and the warm call's operators by host time
  cprofile  per new length, the first and a warm call under cProfile: the Python functions whose own time grew, and
            the warm call's functions by own and by cumulative time (where the host time goes between operators)
  paths     in one process, rounds that alternate the wide projections of prompts over CUBLAS_ROWS tokens between
            cuBLAS blocks and the rows left to the product (the model's path) and whole on cuBLAS (F.linear, as before
            the blocks): a 32768-token prompt on one path, then warm calls at short lengths (the same path either
            way: does the long prompt's path change them?) and at long ones (what the rows left to the product cost)
  tiles     in one process, rounds that alternate kernels/gemm.py's tile choice (WIDE for calls of many output
            columns) with its fixed tiles for every call: warm calls from 2k to 32k tokens
  first     what a first call at a new length pays for: a new length after a 32768-token prompt, against a seen
            length after one, a seen length after a pause (host asleep, host busy, GPU busy, both busy), a warm call
            repeated (the measure's spread), a new length after a warm call, and a new length after a long prompt
            with Python's garbage collector off, one in a new attention bucket (each call's excess over its length's
            next calls; run it alone)
  launch    the host time of one launch of kernels/gemm.py's product (M = 16 rows: the GPU waits for the host) as
            `products` calls it, as a bare JIT launch, and as a launch of the compiled kernel, against F.linear

    python benchmarks/probe_short_prefill.py --out-dir /tmp/probe

Writes probe_short_prefill.json to --out-dir and prints tables.
"""

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def bench_model():
    import torch

    from kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = KimiLinearForCausalLM(KimiLinearConfig(**json.loads((HERE / "configs" / "bench_1b_hybrid.json")
                                                                     .read_text()))).bfloat16().eval()  # fmt: skip
    return model


def hooked_parts(model):
    """Forward hooks on every decoder layer's parts; returns a dict part -> list of host seconds, filled per call."""
    times = defaultdict(float)
    started = {}

    def pre(name):
        def hook(module, args):
            started[name] = time.perf_counter()

        return hook

    def post(name):
        def hook(module, args, output):
            times[name] += time.perf_counter() - started.pop(name)

        return hook

    for i, layer in enumerate(model.model.layers):
        for part, module in layer.named_children():
            name = f"{type(module).__name__}" if "norm" in part else f"{i}:{type(module).__name__}"
            module.register_forward_pre_hook(pre(name))
            module.register_forward_hook(post(name))
    return times


def gpu_kernel_ms(prof):
    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 1e3


def call(model, ids, times):
    import torch

    times.clear()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        model(ids, logits_to_keep=1)
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return {"wall_ms": (time.perf_counter() - t) * 1e3, "host_ms": host * 1e3,
            "parts_ms": {k: v * 1e3 for k, v in times.items()}}  # fmt: skip


def probe_hooks(model, lengths, ids):
    times = hooked_parts(model)
    rows = {}
    for T in lengths:
        x = ids(T)
        first = call(model, x, times)
        warm = [call(model, x, times) for _ in range(5)]
        med = {key: statistics.median(w[key] for w in warm) for key in ("wall_ms", "host_ms")}
        parts = {k: (v, statistics.median(w["parts_ms"][k] for w in warm)) for k, v in first["parts_ms"].items()}
        rows[T] = {"first_wall_ms": first["wall_ms"], "warm_wall_ms": med["wall_ms"], "first_host_ms": first["host_ms"],
                   "warm_host_ms": med["host_ms"], "parts_first_warm_ms": parts}  # fmt: skip
        grew = sorted(parts.items(), key=lambda kv: -(kv[1][0] - kv[1][1]))[:6]
        print(f"[hooks] T={T}: wall first {first['wall_ms']:.1f} warm {med['wall_ms']:.1f} ms; host until return "
              f"first {first['host_ms']:.1f} warm {med['host_ms']:.1f}; grew most: "
              + ", ".join(f"{k} {a:.2f}/{b:.2f}" for k, (a, b) in grew), flush=True)  # fmt: skip
    warm_parts = defaultdict(float)
    for k, (_, w) in rows[lengths[-1]]["parts_first_warm_ms"].items():
        warm_parts[k.split(":")[-1]] += w
    kinds = sorted(warm_parts.items(), key=lambda kv: -kv[1])
    print(f"[hooks] warm host time by kind of part at T={lengths[-1]} (ms): "
          + ", ".join(f"{k} {v:.2f}" for k, v in kinds), flush=True)  # fmt: skip
    return rows


def probe_profile(model, lengths, ids, top=15):
    import torch
    from torch.profiler import ProfilerActivity, profile

    def profiled(x):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            with torch.no_grad():
                model(x, logits_to_keep=1)
            torch.cuda.synchronize()
        ops = {(e.key, str(e.input_shapes)[:120]): e.self_cpu_time_total
               for e in prof.key_averages(group_by_input_shape=True) if e.device_type.name == "CPU"}  # fmt: skip
        return ops, gpu_kernel_ms(prof)

    rows = {}
    for T in lengths:
        x = ids(T)
        first, first_gpu = profiled(x)
        profiled(x)
        warm, warm_gpu = profiled(x)
        grew = sorted(((k, first[k] - warm.get(k, 0.0)) for k in first), key=lambda kv: -kv[1])[:top]
        heavy = sorted(warm.items(), key=lambda kv: -kv[1])[:top]
        rows[T] = {"first_host_us": sum(first.values()), "warm_host_us": sum(warm.values()), "first_gpu_ms": first_gpu,
                   "warm_gpu_ms": warm_gpu,
                   "grew": [{"op": k[0], "shapes": k[1], "first_us": first[k], "warm_us": warm.get(k, 0.0)}
                            for k, _ in grew],
                   "warm_heaviest": [{"op": k[0], "shapes": k[1], "us": v} for k, v in heavy]}  # fmt: skip
        print(f"[profile] T={T}: GPU kernels first {first_gpu:.1f} warm {warm_gpu:.1f} ms; operators by host time "
              f"grown (first us, warm us):", flush=True)  # fmt: skip
        for r in rows[T]["grew"]:
            print(f"   {r['first_us']:9.0f} {r['warm_us']:9.0f}  {r['op'][:60]} {r['shapes'][:90]}", flush=True)
        print(f"[profile] T={T}: warm call's heaviest operators by host time (us):", flush=True)
        for r in rows[T]["warm_heaviest"]:
            print(f"   {r['us']:9.0f}  {r['op'][:60]} {r['shapes'][:90]}", flush=True)
    return rows


def probe_cprofile(model, lengths, ids, top=20):
    import cProfile
    import pstats

    import torch

    def profiled(x):
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        with torch.no_grad():
            prof.enable()
            model(x, logits_to_keep=1)
            prof.disable()
        torch.cuda.synchronize()
        stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, ...)
        return {f"{Path(k[0]).name}:{k[1]}({k[2]})": (v[1], v[2] * 1e3, v[3] * 1e3) for k, v in stats.items()}

    rows = {}
    for T in lengths:
        x = ids(T)
        first = profiled(x)
        profiled(x)
        warm = profiled(x)
        grew = sorted(first, key=lambda k: -(first[k][1] - warm.get(k, (0, 0.0, 0.0))[1]))[:top]
        own = sorted(warm, key=lambda k: -warm[k][1])[:top]
        cum = sorted(warm, key=lambda k: -warm[k][2])[: 2 * top]
        rows[T] = {"first_ms": sum(v[1] for v in first.values()), "warm_ms": sum(v[1] for v in warm.values()),
                   "grew": [[k, *first[k], *warm.get(k, (0, 0.0, 0.0))] for k in grew],
                   "warm_own": [[k, *warm[k]] for k in own],
                   "warm_cumulative": [[k, *warm[k]] for k in cum]}  # fmt: skip
        print(f"[cprofile] T={T}: own time in all functions first {rows[T]['first_ms']:.1f} warm "
              f"{rows[T]['warm_ms']:.1f} ms; grew most (calls, own ms first / warm):", flush=True)  # fmt: skip
        for k in grew:
            print(f"   {first[k][0]:6d} {first[k][1]:8.2f} {warm.get(k, (0, 0.0))[1]:8.2f}  {k[:110]}", flush=True)
        print(f"[cprofile] T={T}: warm call by own time (calls, own ms, cumulative ms):", flush=True)
        for k in own:
            print(f"   {warm[k][0]:6d} {warm[k][1]:8.2f} {warm[k][2]:8.2f}  {k[:110]}", flush=True)
        print(f"[cprofile] T={T}: warm call by cumulative time (calls, own ms, cumulative ms):", flush=True)
        for k in cum:
            print(f"   {warm[k][0]:6d} {warm[k][1]:8.2f} {warm[k][2]:8.2f}  {k[:110]}", flush=True)
    return rows


def alternate(model, ids, lengths, sides, tag, rounds=3, reps=7):
    """Warm wall ms per length on each side, in one process: sides {name: a function that puts that side in place},
    every length run once on every side first (no first calls below), then rounds that run each side in turn over the
    lengths in order (median of reps calls each); printed as [tag] lines and returned."""
    xs = {T: ids(T) for T in lengths}
    rows = {name: defaultdict(list) for name in sides}
    wall_ms = lambda x: call(model, x, {})["wall_ms"]  # noqa: E731
    for put in sides.values():
        put()
        for x in xs.values():
            wall_ms(x)
    for _ in range(rounds):
        for name, put in sides.items():
            put()
            for T, x in xs.items():
                rows[name][T].append(statistics.median(wall_ms(x) for _ in range(reps)))
    a, b = sides
    print(f"[{tag}] warm wall ms, median of {reps} calls per round, {rounds} rounds; {a} / {b}:")
    out = {}
    for T in xs:
        ra, rb = rows[a][T], rows[b][T]
        out[T] = {f"{a}_ms": ra, f"{b}_ms": rb}
        print(f"[{tag}] T={T:6d}: {a} {' '.join(f'{v:6.1f}' for v in ra)} | {b} {' '.join(f'{v:6.1f}' for v in rb)}"
              f" | ratio of medians {statistics.median(ra) / statistics.median(rb):.3f}", flush=True)  # fmt: skip
    return out


def probe_paths(model, ids, short, long):
    """The model's path for prompts over CUBLAS_ROWS (cuBLAS blocks, the rest to the product) against whole on cuBLAS;
    each round starts with a 32768-token prompt on its path."""
    import torch.nn.functional as F

    import kimi_linear_kernels as kernels

    blocks = kernels.products

    def whole(x, *weights, cublas_rows=None):
        if cublas_rows is not None and x.numel() > cublas_rows * x.shape[-1]:
            return [F.linear(x, w) for w in weights]
        return blocks(x, *weights, cublas_rows=cublas_rows)

    def put(path):
        return lambda: setattr(kernels, "products", path)

    try:
        return alternate(model, ids, [32768, *short, *long], {"blocks": put(blocks), "whole": put(whole)}, "paths")
    finally:
        kernels.products = blocks


def probe_tiles(model, ids, lengths):
    """gemm's tile choice (WIDE for calls of many output columns) against its fixed tiles for every call."""
    from kimi_linear_kernels import gemm

    wide = gemm.WIDE

    def put(tiles):
        def side():
            gemm.WIDE = tiles
            gemm._tiles.cache_clear()

        return side

    try:
        return alternate(model, ids, lengths, {"picked": put(wide), "fixed": put(gemm.FIXED)}, "tiles")
    finally:
        put(wide)()


def probe_first(model, ids, seen=2001, reps=4, pause_s=0.3):
    """What a first call at a new length pays for: conditions run in turn, reps times each, every "new" length one
    not run before (seen + 3 * k tokens, so that its warm time is seen's); per call its wall ms, its excess over the
    median of 3 calls at the same length right after it, and the host ms until the call returned.
      long>new      a 32768-token prompt, then a new length (as cold_start.py's first short prompt)
      long>seen     a 32768-token prompt, then `seen` (warm): the long prompt's wake, no new length
      pause>seen    a 32768-token prompt and a call at `seen`, pause_s idle, then `seen` again: a wait alone
      spin>seen     as pause>seen with the host busy in a Python loop for pause_s instead of asleep: the GPU idles,
                    the host does not
      gpu>seen      as pause>seen with the GPU busy for pause_s (a sleep kernel) while the host waits for it in a
                    synchronize, as it waits for a long prompt
      both>seen     as pause>seen with the GPU busy (a sleep kernel) and the host busy in a Python loop: neither idles
      seen>seen     a warm call at `seen`, then `seen` again: nothing new, the spread of the measure itself
      seen>new      a warm call at `seen`, then a new length: a new length alone
      long>new gc   as long>new with Python's garbage collector off for both calls
      long>bucket   a 32768-token prompt, then a new length in a new 1024-token bucket of MLA's prefill attention (a
                    shape without a cuDNN plan: 3100 + 1024 k tokens); the other new lengths share seen's bucket
    Run it alone (--parts first): other parts would have run those buckets. Printed as [first] lines and returned."""
    import gc

    import torch

    x_long, x_seen = ids(32768), ids(seen)
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(10**8)
    torch.cuda.synchronize()
    cycles_per_s = 10**8 / (time.perf_counter() - start)  # the sleep kernel's clock, for gpu>seen's pause
    fresh = iter(range(seen + 3, seen + 3 * 10_000, 3))

    def measured(x):
        first = call(model, x, {})
        again = statistics.median(call(model, x, {})["wall_ms"] for _ in range(3))
        return {"wall_ms": first["wall_ms"], "host_ms": first["host_ms"], "excess_ms": first["wall_ms"] - again}

    def long_new():
        call(model, x_long, {})
        return measured(ids(next(fresh)))

    def long_seen():
        call(model, x_long, {})
        return measured(x_seen)

    def after_wait(wait):  # a long prompt and a call at `seen`, the wait, then `seen` again
        def run():
            call(model, x_long, {})
            call(model, x_seen, {})
            wait()
            return measured(x_seen)

        return run

    def spin():
        end = time.perf_counter() + pause_s
        while time.perf_counter() < end:
            pass

    def gpu_busy():
        torch.cuda._sleep(int(pause_s * cycles_per_s))
        torch.cuda.synchronize()

    def both_busy():
        torch.cuda._sleep(int(pause_s * cycles_per_s))
        spin()
        torch.cuda.synchronize()

    def seen_seen():
        call(model, x_seen, {})
        return measured(x_seen)

    def seen_new():
        call(model, x_seen, {})
        return measured(ids(next(fresh)))

    buckets = iter(range(3100, 3100 + 1024 * reps, 1024))

    def long_bucket():
        call(model, x_long, {})
        return measured(ids(next(buckets)))

    def long_new_gc():
        gc.disable()
        try:
            return long_new()
        finally:
            gc.enable()

    conditions = {"long>new": long_new, "long>seen": long_seen, "pause>seen": after_wait(lambda: time.sleep(pause_s)),
                  "spin>seen": after_wait(spin), "gpu>seen": after_wait(gpu_busy), "both>seen": after_wait(both_busy),
                  "seen>seen": seen_seen, "seen>new": seen_new, "long>new gc": long_new_gc,
                  "long>bucket": long_bucket}  # fmt: skip
    for _ in range(3):  # x_long, x_seen and the 3-token steps warm
        call(model, x_long, {}), call(model, x_seen, {})
    rows = {name: [] for name in conditions}
    for _ in range(reps):
        for name, run in conditions.items():
            rows[name].append(run())
    warm = statistics.median(call(model, x_seen, {})["wall_ms"] for _ in range(7))
    print(f"[first] seen {seen} tokens, warm {warm:.1f} ms (new lengths {seen} + 3 k); per condition, {reps} runs: "
          f"excess over the same length's next calls (ms), wall ms", flush=True)  # fmt: skip
    for name, rs in rows.items():
        excess = " ".join(f"{r['excess_ms']:6.2f}" for r in rs)
        wall = " ".join(f"{r['wall_ms']:6.1f}" for r in rs)
        print(f"[first] {name:>12}: excess {excess} | wall {wall}", flush=True)
    return {"seen": seen, "warm_ms": warm, "pause_s": pause_s, "sleep_cycles_per_s": cycles_per_s,
            "conditions": rows}  # fmt: skip


def probe_launch(reps=2000):
    import torch
    import torch.nn.functional as F

    from kimi_linear_kernels import gemm

    x = torch.randn(16, 2304, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(n, 2304, device="cuda", dtype=torch.bfloat16) for n in (128, 128, 32)]
    outs = [torch.empty(16, w.shape[0], device="cuda", dtype=torch.bfloat16) for w in ws]
    ns = [w.shape[0] for w in ws]
    bm, bn, bk, warps, stages, group_m = gemm._tiles(x.device, sum(ns))  # the tiles products() takes
    grid = (sum(gemm.cdiv(n, bn) for n in ns),)
    consts = dict(EVEN_K=2304 % bk == 0, BM=bm, BN=bn, BK=bk, GROUP_M=group_m)
    args = (x, *ws, *outs, 16, *ns, 2304, 2304)
    opts = dict(num_warps=warps, num_stages=stages)
    compiled = gemm._products[grid](*args, **consts, **opts)
    launch_compiled = compiled[(*grid, 1, 1)]  # a CompiledKernel takes all three grid sizes
    all_args = (*args, *consts.values())

    from probe_linear import host_us  # beside this script

    def per_call_us(fn):
        for _ in range(50):
            fn()
        return host_us(fn, reps)

    with torch.no_grad():
        rows = {
            "F.linear x3": per_call_us(lambda: [F.linear(x, w) for w in ws]),
            "F.linear x1": per_call_us(lambda: F.linear(x, ws[0])),
            "products x3": per_call_us(lambda: gemm.products(x, *ws)),
            "products x1": per_call_us(lambda: gemm.products(x, ws[0])),
            "jit launch x3": per_call_us(lambda: gemm._products[grid](*args, **consts, **opts)),
            "compiled launch x3": per_call_us(lambda: launch_compiled(*all_args)),
            "torch.empty x3": per_call_us(lambda: [torch.empty(16, n, device="cuda", dtype=x.dtype) for n in ns]),
        }
    for o in outs:
        o.zero_()
    launch_compiled(*all_args)
    ok = all(torch.allclose(o.float(), F.linear(x, w).float(), atol=0.05, rtol=0.02) for o, w in zip(outs, ws))
    print("[launch] host us per call: " + ", ".join(f"{k} {v:.1f}" for k, v in rows.items())
          + f"; compiled launch output matches F.linear: {ok}", flush=True)  # fmt: skip
    return {"host_us": rows, "compiled_launch_matches": ok}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hook-lengths", type=int, nargs="+", default=[2001, 3001, 4001, 5001, 6007, 7001, 9001])
    ap.add_argument("--profile-lengths", type=int, nargs="+", default=[2501, 4501, 6501])
    ap.add_argument("--cprofile-lengths", type=int, nargs="+", default=[3501, 5501])
    ap.add_argument("--paths-short", type=int, nargs="+", default=[2001, 3001, 4001, 5001])
    ap.add_argument("--paths-long", type=int, nargs="+", default=[9001, 10007, 12001, 16001])
    ap.add_argument("--tiles-lengths", type=int, nargs="+", default=[2001, 4001, 8000, 12001, 16001, 32768])
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["launch", "hooks", "profile", "cprofile"],
        choices=["launch", "hooks", "profile", "cprofile", "paths", "tiles", "first"],
    )
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()
    import torch

    sys.path.insert(0, str(HERE))
    from kda_gpu import metadata

    report = {"metadata": metadata()}
    if "launch" in args.parts:
        report["launch"] = probe_launch()
    model = bench_model()
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = lambda T: torch.randint(3, model.config.vocab_size, (1, T), device="cuda", generator=gen)  # noqa: E731
    with torch.no_grad():
        for T in (32768, 8192, 8192):  # the first prefill (compiles, precompiles) and the memory pool's peak
            model(ids(T), logits_to_keep=1)
    torch.cuda.synchronize()
    if "paths" in args.parts:
        report["paths"] = probe_paths(model, ids, args.paths_short, args.paths_long)
    if "tiles" in args.parts:
        report["tiles"] = probe_tiles(model, ids, args.tiles_lengths)
    if "first" in args.parts:
        report["first"] = probe_first(model, ids)
    if "cprofile" in args.parts:  # before the hooks, which it would count
        report["cprofile"] = probe_cprofile(model, args.cprofile_lengths, ids)
    if "hooks" in args.parts:
        report["hooks"] = probe_hooks(model, args.hook_lengths, ids)
    if "profile" in args.parts:
        report["profile"] = probe_profile(model, args.profile_lengths, ids)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "probe_short_prefill.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out_dir / 'probe_short_prefill.json'}")


if __name__ == "__main__":
    main()
