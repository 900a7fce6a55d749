"""CPU decode: milliseconds per decode step of the whole model on the growing cache (generate()'s cache on a CPU),
batch 1, greedy, and of the prefill of the --prompt tokens before them, for this tree and, with --baseline DIR
(another checkout of this repo, e.g. `git archive REV | tar x -C DIR`), that tree's model with the same weights, the
two timed in turn in one process.

Run it from the repo root (the script form, never `python -m`):

    python benchmarks/cpu_decode.py --baseline .baseline        # about two minutes on 2 cores

Configs (random weights, seed 0):
    default  default_model/config.json: the main job's model (8 layers, hidden 256, KDA 4 x 64 heads, 8 experts)
    wide     benchmarks/configs/cpu_prefill.json: 4 layers, hidden 1024, KDA 16 x 128 heads (the released KDA width)
Dtypes: --dtypes (float32, bfloat16). For each config and dtype: both sides' first decode step's logits must agree
(relative error printed), then --repeats rounds of --steps decode steps per side, the sides' order alternating by
round; the median round is reported. The float32 and half-type rows show what the dtype costs on this CPU (half-type
matrix products without AVX512-BF16 / AMX run far slower than float32's).

Writes benchmarks/results/cpu_decode.json (rounds, medians, ratios, versions, date) and cpu_decode.png and prints a
table.
"""

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from cpu_prefill import metadata  # noqa: E402
from decode_gpu import save_json, save_png  # noqa: E402
from moe_layer import load_baseline  # noqa: E402

from kimi_linear import configuration_kimi_linear, modeling_kimi_linear  # noqa: E402

CONFIGS = {"default": REPO / "default_model" / "config.json", "wide": HERE / "configs" / "cpu_prefill.json"}


def build(modeling, configuration, name, dtype, state=None):
    d = json.loads(CONFIGS[name].read_text())
    d.pop("auto_map", None)
    torch.manual_seed(0)
    model = modeling.KimiLinearForCausalLM(configuration.KimiLinearConfig(**d)).to(dtype).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


@torch.no_grad()
def decode_round(model, cache_cls, ids, steps):
    """(ms per decode step over `steps` greedy steps after a prefill of ids, ms of the prefill, the first step's
    logits)."""
    cache = cache_cls(model.config)
    start = time.perf_counter()
    nxt = model(ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    prefill = (time.perf_counter() - start) * 1e3
    first = None
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(nxt, cache=cache).logits
        first = logits.float() if first is None else first
        nxt = logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps * 1e3, prefill, first


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [f"{r['config']}\n{r['dtype']}" for r in rows]
    sides = [s for s in ("baseline", "this tree") if all(s in r["ms_per_step"] for r in rows)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.8 * len(rows), 4))
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        xs = [j + (i - (len(sides) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r["ms_per_step"][side] for r in rows], width, label=side)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms per decode step (batch 1)")
    ax.legend()
    meta = report["meta"]
    fig.suptitle(f"Kimi Linear CPU decode | {meta['cpu_model']} | torch {meta['torch']} | {meta['date_utc'][:10]} | "
                 f"{meta['git_commit']}", fontsize=8)  # fmt: skip
    fig.tight_layout()
    save_png(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="decode steps per round (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds per side (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout of this repo, timed beside")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sides = {"this tree": (modeling_kimi_linear, configuration_kimi_linear)}
    if args.baseline is not None:
        base = load_baseline(args.baseline)
        sides = {"baseline": (base, importlib.import_module("kimi_linear_baseline.configuration_kimi_linear")), **sides}
    report = {"meta": metadata(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    meta = report["meta"]
    print(f"{meta['cpu_model']} | torch {meta['torch']} | transformers {meta['transformers']} | {meta['date_utc']} | "
          f"{meta['git_commit']}", file=sys.stderr)  # fmt: skip
    ids = torch.randint(3, 500, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    for name in args.configs:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            models = {}
            for side, (modeling, configuration) in sides.items():
                state = next(iter(models.values()))[0].state_dict() if models else None
                models[side] = (build(modeling, configuration, name, dtype, state), modeling.KimiLinearCache)
            rounds, prefills = {side: [] for side in models}, {side: [] for side in models}
            firsts = {side: decode_round(*models[side], ids, 1)[2] for side in models}  # also the warm-up
            ref = firsts["this tree"]
            agree = {side: ((f - ref).norm() / ref.norm()).item() for side, f in firsts.items()}
            for r in range(args.repeats):
                for side in list(models)[:: 1 if r % 2 == 0 else -1]:
                    step_ms, prefill_ms, _ = decode_round(*models[side], ids, args.steps)
                    rounds[side].append(step_ms)
                    prefills[side].append(prefill_ms)
            row = dict(config=name, dtype=dtype_name, rounds=rounds, prefill_rounds=prefills,
                       logits_rel_err_vs_this_tree=agree,
                       ms_per_step={side: statistics.median(v) for side, v in rounds.items()},
                       prefill_ms={side: statistics.median(v) for side, v in prefills.items()})  # fmt: skip
            if "baseline" in rounds:
                row["speedup"] = row["ms_per_step"]["baseline"] / row["ms_per_step"]["this tree"]
            report["rows"].append(row)
            cols = "  ".join(f"{side} {ms:8.2f} ms/step, prefill {row['prefill_ms'][side]:8.1f} ms"
                             for side, ms in row["ms_per_step"].items())  # fmt: skip
            extra = (
                f"  speed-up {row['speedup']:.2f}x, logits agree to {agree['baseline']:.1e}" if "speedup" in row else ""
            )
            print(f"{name:8} {dtype_name:9} {cols}{extra}", flush=True)
            del models
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_json(args.out_dir / "cpu_decode.json", report)
    plot(report, args.out_dir / "cpu_decode.png")
    print(f"[wrote {args.out_dir / 'cpu_decode.json'} and cpu_decode.png]", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
