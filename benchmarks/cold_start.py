"""Cold start on the GPU: how long the first prefill and the first training step of a fresh process take, with
fla's own autotuning and with this repo's pre-chosen configurations (kernels/tuned.py), and whether a prompt of
a length not seen before costs anything over a warm call of that length.

    python benchmarks/cold_start.py --out-dir benchmarks/results            # on a CUDA machine with fla-core

Each mode runs in its own fresh process with an empty Triton cache (TRITON_CACHE_DIR in a new temporary folder),
on the bench_1b_hybrid model (benchmarks/configs/, random weights, bf16):
  autotune   KIMI_FLA_PINNED=0: fla autotunes every kernel on first use (the baseline)
  pinned     the pre-chosen configurations, kernels compiled one by one as calls reach them (KIMI_FLA_PRECOMPILE=0)
  precompiled  the pre-chosen configurations and the recorded kernel variants compiled side by side on first use
             (kernels/precompile.py; the default)
Per mode: first prefill of --prefill-len tokens and its warm median; first training step (forward + backward,
--train-len tokens, loss over all positions) and its warm median; then, for each --new-lengths, the first prefill at
that length against the warm median at the same length (with --prefill-graphs N, after capturing prefill graphs
for up to N tokens: the lengths they hold replay them). "Compile + tune" = first call - warm call. Then
--control-passes more passes over the new lengths in the same order: each length's first call, now at a seen length,
after the same calls as before; their median is the control, which isolates what the length's novelty costs from
what any call pays after another length's calls (a short prompt paced by the host pays a few ms after a long one).
Every Triton kernel variant compiled at a launch is listed per call (fla's and this repo's own), and every cuDNN
attention plan the model built (its rounded length and host ms); and for each first call, the Triton kernels it
loaded onto the GPU, Python's garbage collections and the CUDA allocator's device allocations; then one more new
length (--profile-new) runs first and warm under torch.profiler, listing the operators whose host time grew.
With --record PATH, the autotune mode then runs every other path the model takes and writes the configurations it
chose to PATH (kernels/tuned.py format), and the pinned mode uses that file; without it, the pinned mode uses the
file installed with kimi_linear_kernels.

Writes cold_start.json and cold_start.png to --out-dir and prints a table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "configs" / "bench_1b_hybrid.json"


def child(args):
    t_start = time.perf_counter()
    import torch

    from kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM, KimiMLAAttention

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = KimiLinearForCausalLM(KimiLinearConfig(**json.loads(CONFIG.read_text()))).bfloat16()
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = lambda T: torch.randint(3, model.config.vocab_size, (1, T), device="cuda", generator=gen)  # noqa: E731
    out = {"mode": args.child, "setup_s": time.perf_counter() - t_start}

    def first_and_warm(fn, reps=3, after_first=None):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        first_call = after_first() if after_first is not None else None
        warm = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            warm.append(time.perf_counter() - start)
        warm = sorted(warm)[len(warm) // 2]
        return {"first_s": first, "warm_s": warm, "overhead_s": first - warm, "first_call": first_call}

    def prefill(T):
        x = ids(T)
        model.eval()

        @torch.no_grad()
        def run():
            model(x, logits_to_keep=1)

        return run

    def train_step(T):
        x = ids(T)
        model.train()

        def step():
            model(x, labels=x, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    from kimi_linear_kernels import precompile

    # every Triton kernel variant compiled at a launch (fla's that precompile missed, and this repo's own)
    with precompile.compile_events(only_fla=False) as events:
        builds = getattr(KimiMLAAttention, "builds", [])  # cuDNN attention plans built, (rounded length, host ms)

        def measured(name, fn):
            before, built = len(events), len(builds)
            with first_call_costs() as costs:
                r = first_and_warm(fn, after_first=costs)
            r["compiled_at_launch"] = sorted({e["name"].rpartition(".")[2] for e in events[before:] if not e["warmup"]})
            r["plan_builds"] = [list(b) for b in builds[built:]]
            r["precompiled"] = [list(h) for h in precompile.history]
            precompile.history.clear()
            print(f"[{args.child}] {name}: {r}", flush=True)
            return r

        out["first_prefill"] = measured("first prefill", prefill(args.prefill_len))
        out["first_train_step"] = measured("first training step", train_step(args.train_len))
        if args.prefill_graphs:
            model.eval()
            torch.cuda.synchronize()
            start = time.perf_counter()
            buckets = model.capture_prefill_graphs(args.prefill_graphs)
            out["prefill_graphs"] = {"max_tokens": args.prefill_graphs, "buckets": buckets,
                                     "capture_s": time.perf_counter() - start}  # fmt: skip
            print(f"[{args.child}] prefill graphs: {out['prefill_graphs']}", flush=True)
        out["new_lengths"] = {}
        for T in args.new_lengths:
            out["new_lengths"][T] = r = measured(f"new length {T}", prefill(T))
            r["over_warm"] = r["overhead_s"] / r["warm_s"]
            r["prefill_mode"] = getattr(model, "prefill_mode", None)
        # the same sequence again, each length now seen: its first call comes after the same calls as the new one
        # did (the previous length's warm calls, a fresh input), so first - control is what the length's novelty
        # cost, with the wake of the calls before it taken out
        controls = {T: [] for T in args.new_lengths}
        for _ in range(args.control_passes):
            for T in args.new_lengths:
                controls[T].append(first_and_warm(prefill(T))["first_s"])
        for T, seen in controls.items():
            if seen:
                r = out["new_lengths"][T]
                r["control_s"] = sorted(seen)[len(seen) // 2]
                r["over_control"] = (r["first_s"] - r["control_s"]) / r["control_s"]
                r["control_runs_s"] = seen
        if args.profile_new:
            out["profile_new"] = profile_new_length(prefill(args.profile_new), args.profile_new)
    out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if args.record:
        from kimi_linear_kernels.tuned import PASSES, exercise, record

        for dtype, backward in PASSES:  # the recorder's own passes, so that the file covers what it covers
            exercise(dtype, backward)
        record(args.record, card=torch.cuda.get_device_name(0))
        out["recorded"] = str(args.record)
    Path(args.result).write_text(json.dumps(out))


@contextmanager
def first_call_costs():
    """What else a call can pay for once, beside compiles and plan builds: within the block, Triton kernels loaded onto
    the GPU (a compiled variant's first launch in the process: name, ms), Python garbage collections (generation,
    ms) and the CUDA caching allocator's device allocations (cudaMalloc calls). Yields a function that returns them
    so far."""
    import gc

    import torch
    from triton import knobs

    loads, collections, started = [], [], {}
    allocs = lambda: torch.cuda.memory_stats().get("num_device_alloc", 0)  # noqa: E731
    allocs_before = allocs()

    def load_start(module, function, name, *_):
        started["load"] = time.perf_counter()

    def load_end(module, function, name, *_):
        loads.append([name, (time.perf_counter() - started.pop("load", time.perf_counter())) * 1e3])

    def collected(phase, info):
        if phase == "start":
            started["gc"] = time.perf_counter()
        else:
            collections.append(
                [info["generation"], (time.perf_counter() - started.pop("gc", time.perf_counter())) * 1e3]
            )

    rt = knobs.runtime
    chains = hasattr(rt.kernel_load_start_hook, "add")  # older Triton: plain hooks, loads not recorded
    if chains:
        rt.kernel_load_start_hook.add(load_start)
        rt.kernel_load_end_hook.add(load_end)
    gc.callbacks.append(collected)
    try:
        yield lambda: {"kernel_loads": list(loads) if chains else None, "gc": list(collections),
                       "device_allocs": allocs() - allocs_before}  # fmt: skip
    finally:
        if chains:
            rt.kernel_load_start_hook.remove(load_start)
            rt.kernel_load_end_hook.remove(load_end)
        gc.callbacks.remove(collected)


def profile_new_length(fn, T, top=12):
    """Where a first call at a new length spends its extra time: the first and a warm call under torch.profiler, the
    operators whose host time (self CPU) grew most, and each call's total; printed and returned."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def self_cpu():
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return {e.key: e.self_cpu_time_total for e in prof.key_averages()}

    first, warm = self_cpu(), self_cpu()
    grew = sorted(((k, first[k] - warm.get(k, 0.0)) for k in first), key=lambda kv: -kv[1])[:top]
    rows = [{"op": k, "first_us": first[k], "warm_us": warm.get(k, 0.0)} for k, _ in grew]
    print(f"[profile] first call at new length {T} vs a warm one, operators by host time grown (us):", flush=True)
    for r in rows:
        print(f"  {r['first_us']:12.0f} {r['warm_us']:12.0f}  {r['op'][:100]}", flush=True)
    return {"length": T, "first_total_us": sum(first.values()), "warm_total_us": sum(warm.values()), "top": rows}


def run_mode(mode, args):
    env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix=f"triton-{mode}-"))
    env["KIMI_FLA_PINNED"] = "0" if mode == "autotune" else "1"
    env["KIMI_FLA_PRECOMPILE"] = "1" if mode == "precompiled" else "0"
    if mode != "autotune" and args.record:
        env["KIMI_FLA_TUNED"] = str(args.record)  # the choices the autotune run just made
    cmd = [sys.executable, __file__, "--child", mode, "--prefill-len", str(args.prefill_len),
           "--train-len", str(args.train_len), "--new-lengths", *map(str, args.new_lengths),
           "--profile-new", str(args.profile_new), "--control-passes", str(args.control_passes),
           "--prefill-graphs", str(args.prefill_graphs)]  # fmt: skip
    if mode == "autotune" and args.record:
        cmd += ["--record", str(args.record)]
    result_file = Path(env["TRITON_CACHE_DIR"]) / "result.json"
    cmd += ["--result", str(result_file)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env)  # output streams through: a run cut short still shows how far it got
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode})")
    result = json.loads(result_file.read_text())
    result["process_wall_s"] = time.perf_counter() - start
    # what importing fla's KDA ops costs a fresh process after torch (inside the first prefill's overhead above;
    # nothing is compiled): as the model imports them (fla's package __init__ files deferred, kernels/__init__.py)
    # and as a plain `import fla.ops.kda` does
    for key, imports in [("fla_import_s", "import kimi_linear_kernels as k; k._import_kda_ops()"),
                         ("fla_plain_import_s", "import fla.ops.kda")]:  # fmt: skip
        probe = f"import time, torch; t = time.perf_counter(); {imports}; print(time.perf_counter() - t)"
        result[key] = float(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                           check=True).stdout.split()[-1])  # fmt: skip
    return result


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = report["modes"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = ["first prefill", "first training step"]
    width = 0.8 / len(modes)
    for i, m in enumerate(modes):
        vals = [m["first_prefill"]["overhead_s"], m["first_train_step"]["overhead_s"]]
        bars = ax.bar([j + i * width for j in range(2)], vals, width, label=m["mode"])
        ax.bar_label(bars, fmt="%.1f s")
    ax.axhline(30, color="k", ls="--", lw=1, label="30 s target")
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(2)], labels)
    ax.set_ylabel("compile + tune (first call - warm call), s")
    meta = report["metadata"]
    ax.set_title(f"Cold start, bench_1b_hybrid | {meta['card']} | fla-core {meta['fla-core']} | "
                 f"triton {meta['triton']} | {meta['date_utc'][:10]}", fontsize=8)  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill-len", type=int, default=8192, help="(default: %(default)s)")
    ap.add_argument("--train-len", type=int, default=4096, help="(default: %(default)s)")
    ap.add_argument(
        "--new-lengths",
        type=int,
        nargs="+",
        default=[131072, 50001, 32768],
        help="(default: %(default)s; an odd length checks Triton's per-divisibility specialisation; the largest "
        "first, so that the memory pool's growth to a new peak lands in one first call, not in each)",
    )
    ap.add_argument(
        "--profile-new",
        type=int,
        default=40000,
        help="after the new lengths, one more new length profiled (first vs warm call, host time by operator) to show "
        "what a first call still pays; 0: off (default: %(default)s)",
    )
    ap.add_argument(
        "--control-passes",
        type=int,
        default=3,
        help="after the new lengths, passes over the same lengths in the same order, each length's first call then "
        "seen: their median is its control, the call a new length is compared with beside its warm median "
        "(default: %(default)s)",
    )
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["autotune", "pinned", "precompiled"],
        choices=["autotune", "pinned", "precompiled"],
    )
    ap.add_argument(
        "--prefill-graphs",
        type=int,
        default=0,
        help="after the first training step, capture prefill graphs for prompts of up to this many tokens "
        "(KimiLinearForCausalLM.capture_prefill_graphs, timed); the new lengths they hold replay them. 0: off "
        "(default: %(default)s)",
    )
    ap.add_argument("--record", type=Path, help="the autotune mode writes its chosen configurations here")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results", help="(default: %(default)s)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(HERE))
    from kda_gpu import metadata

    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"metadata": metadata(), "config": CONFIG.name, "prefill_len": args.prefill_len,
              "train_len": args.train_len, "modes": []}  # fmt: skip
    for mode in args.modes:
        report["modes"].append(run_mode(mode, args))
    (args.out_dir / "cold_start.json").write_text(json.dumps(report, indent=1))
    head = f"{'mode':12s} {'prefill first/warm s':>22s} {'train first/warm s':>22s}"
    print(f"\n{head}  new lengths (first/warm/control s)")
    for m in report["modes"]:
        p, t = m["first_prefill"], m["first_train_step"]
        new = "  ".join(f"{T}: {r['first_s']:.3f}/{r['warm_s']:.3f}" + (f"/{r['control_s']:.3f}" * ("control_s" in r))
                        for T, r in m["new_lengths"].items())  # fmt: skip
        cells = f"{p['first_s']:10.1f}/{p['warm_s']:<10.3f} {t['first_s']:10.1f}/{t['warm_s']:<10.3f}"
        graphs, captured = m.get("prefill_graphs"), ""
        if graphs:
            captured = f"; {len(graphs['buckets'])} prefill graphs captured in {graphs['capture_s']:.1f} s"
        print(
            f"{m['mode']:12s} {cells}  {new}  (importing fla's KDA ops: {m['fla_import_s']:.1f} s of the first "
            f"prefill, {m.get('fla_plain_import_s', float('nan')):.1f} s as a plain import{captured})"
        )
    plot(report, args.out_dir / "cold_start.png")
    print(f"wrote {args.out_dir / 'cold_start.json'} and cold_start.png")


if __name__ == "__main__":
    main()
