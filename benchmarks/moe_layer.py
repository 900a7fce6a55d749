"""One MoE layer (router, routed experts, shared expert): routed experts as grouped matrix products (the default)
against the per-expert loop (the reference), for prefill, decode and a training step.

Run it from the repo root (the script form, never `python -m`):

    python benchmarks/moe_layer.py                                   # CPU, float32: tiny and mid (about 2 min)
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --configs tiny mid released

Configs (MoE dimensions only; random weights, std 0.02):
    tiny      conversion/configs/tiny.json: hidden 64, expert width 32, 8 experts, top-2, 1 shared
    mid       the MoE of ../shared/bench/bench_1b_hybrid.json: hidden 2304, expert width 1024, 16 experts,
              top-4, 1 shared
    many      the released expert count at small widths (hidden 256, width 128, 256 experts, top-8): what the
              per-forward bookkeeping over 256 experts costs
    released  the released layer: hidden 2304, width 1024, 256 experts, top-8, 1 shared (3.6 GB of experts in
              bfloat16; too big for a small CPU machine in float32)

Cases: prefill (1 x 512 tokens, no grad), decode (1 token, no grad), train (1 x 512 tokens, forward + backward
with gradients for every parameter). Each timed call is repeated --repeats times, grouped and loop interleaved;
the median is reported. Also reported: the first grouped call (which stacks the expert weights, one copy) and the
per-forward check that the stacked weights are current (median of --repeats rounds of 200 calls), and with
--baseline DIR (another checkout of this repo, e.g. `git archive REV | tar x -C DIR`) the same check of DIR's layer,
same weights, rounds taken in turn with this one's. Outputs agree (relative error printed) before timing.

Writes benchmarks/results/moe_layer_<device>.json (raw timings, medians, settings, versions, date).
"""

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kimi_linear.configuration_kimi_linear import KimiLinearConfig
from kimi_linear.modeling_kimi_linear import KimiLinearMoE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gpu import git_commit  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CONFIGS = {
    "tiny": {},  # tiny.json as it is
    "mid": dict(hidden_size=2304, moe_intermediate_size=1024, num_experts=16, num_experts_per_token=4),
    "many": dict(hidden_size=256, moe_intermediate_size=128, num_experts=256, num_experts_per_token=8),
    "released": dict(hidden_size=2304, moe_intermediate_size=1024, num_experts=256, num_experts_per_token=8),
}
CASES = {"prefill": (512, False), "decode": (1, False), "train": (512, True)}  # tokens, backward


def build(name, device, dtype):
    d = json.loads((REPO / "conversion" / "configs" / "tiny.json").read_text())
    d.update(CONFIGS[name])
    d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]  # only checked, not used by the MoE
    cfg = KimiLinearConfig(**d)
    torch.manual_seed(0)
    with torch.device(device):
        moe = KimiLinearMoE(cfg).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    return moe, cfg


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def call(moe, x, grouped, backward):
    moe.grouped = grouped
    if backward:
        moe.zero_grad(set_to_none=True)
        moe(x).float().square().mean().backward()
    else:
        with torch.no_grad():
            moe(x)


def timed(device, fn, *args):
    sync(device)
    t = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - t


def check_seconds(moe, flat, n=200):
    """Seconds per call of the per-forward check that the stacked expert weights are current (_grouped_weights)."""
    moe._grouped_weights(flat)
    t = time.perf_counter()
    for _ in range(n):
        moe._grouped_weights(flat)
    return (time.perf_counter() - t) / n


def load_baseline(folder):
    """modeling_kimi_linear of another checkout of this repo (a folder, e.g. `git archive REV | tar x -C DIR`),
    imported as the package kimi_linear_baseline beside this one."""
    folder = Path(folder).resolve()
    if not (folder / "modeling_kimi_linear.py").is_file():
        raise SystemExit(f"--baseline {folder}: no modeling_kimi_linear.py there; pass a checkout of this repo")
    spec = importlib.util.spec_from_file_location(
        "kimi_linear_baseline", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return importlib.import_module("kimi_linear_baseline.modeling_kimi_linear")


def run_config(name, args, bar):
    moe, cfg = build(name, args.device, getattr(torch, args.dtype))
    result = {"config": CONFIGS[name] or "tiny.json", "cases": {}}
    gen = torch.Generator(device=args.device).manual_seed(1)
    for case, (tokens, backward) in CASES.items():
        if case not in args.cases:
            continue
        x = torch.randn(1, tokens, cfg.hidden_size, device=args.device, dtype=moe.gate.weight.dtype, generator=gen)
        x.requires_grad_(backward)
        with torch.no_grad():
            moe._stacked = None  # fresh: the first grouped call stacks
            first = timed(args.device, call, moe, x, True, False)
            moe.grouped = True
            out = moe(x)
            moe.grouped = False
            ref = moe(x)
        err = ((out - ref).double().norm() / ref.double().norm()).item()
        for grouped in (True, False):  # warm-up
            call(moe, x, grouped, backward)
        times = {"grouped": [], "loop": []}
        for _ in range(args.repeats):
            for variant in ("grouped", "loop"):
                times[variant].append(timed(args.device, call, moe, x, variant == "grouped", backward))
            bar.update()
        moe.grouped = True
        med = {v: statistics.median(t) for v, t in times.items()}
        result["cases"][case] = {
            "tokens": tokens,
            "backward": backward,
            "rel_err_grouped_vs_loop": err,
            "first_grouped_call_s": first,
            "times_s": times,
            "median_s": med,
            "speedup": med["loop"] / med["grouped"],
        }
    flat = torch.randn(1, cfg.hidden_size, device=args.device, dtype=moe.gate.weight.dtype)
    sides = {"": moe}  # result key prefix -> layer
    if args.baseline_module is not None:  # the other checkout's layer, same weights, timed in turn with this one's
        base = args.baseline_module.KimiLinearMoE(cfg).to(device=args.device, dtype=moe.gate.weight.dtype)
        base.load_state_dict(moe.state_dict())
        sides["baseline_"] = base
    for grad in (False, True):  # inference; training also passes every parameter to autograd
        runs = {key: [] for key in sides}
        with torch.set_grad_enabled(grad):
            for _ in range(args.repeats):
                for key, layer in sides.items():
                    runs[key].append(check_seconds(layer, flat))
        for key, secs in runs.items():
            result[f"{key}check_per_forward_s" + ("_with_grad" if grad else "")] = statistics.median(secs)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=list(CONFIGS))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "moe_layer_{device}.json")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout of this repo: its per-forward check is timed beside this one's")  # fmt: skip
    args = ap.parse_args()
    args.baseline_module = load_baseline(args.baseline) if args.baseline else None
    if args.threads:
        torch.set_num_threads(args.threads)

    load_start = os.getloadavg()
    results = {}
    with tqdm(total=len(args.configs) * len(args.cases) * args.repeats, desc="moe layer") as bar:
        for name in args.configs:
            results[name] = run_config(name, args, bar)

    print(f"\n{'config':<9} {'case':<8} {'grouped':>11} {'loop':>11} {'speed-up':>9} {'rel err':>9} {'1st call':>10}")
    for name, r in results.items():
        for case, c in r["cases"].items():
            g, lo = c["median_s"]["grouped"], c["median_s"]["loop"]
            print(
                f"{name:<9} {case:<8} {g * 1e3:>9.3f}ms {lo * 1e3:>9.3f}ms {c['speedup']:>8.2f}x "
                f"{c['rel_err_grouped_vs_loop']:>9.1e} {c['first_grouped_call_s'] * 1e3:>8.1f}ms"
            )
        for key, side in (("", ""), ("baseline_", " (baseline)")):
            if f"{key}check_per_forward_s" in r:
                print(
                    f"{name:<9} per-forward bookkeeping of the stacked weights{side}: "
                    f"{r[key + 'check_per_forward_s'] * 1e6:.0f} us "
                    f"({r[key + 'check_per_forward_s_with_grad'] * 1e6:.0f} us with autograd)"
                )

    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "git_commit": git_commit(),
        # unknown where KIMI_COMMIT names the tree (.ci/gpu's copy on the device carries a stale .git)
        "model_file_modified_since_commit": None
        if os.environ.get("KIMI_COMMIT")
        else bool(git("status", "--porcelain", "modeling_kimi_linear.py")),
        "loadavg_at_start": load_start,
        "loadavg_at_end": os.getloadavg(),
        "baseline": str(args.baseline) if args.baseline else None,
    }
    out = Path(str(args.out).format(device=args.device.split(":")[0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"metadata": meta, "results": results}, indent=1))
    tmp.rename(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
