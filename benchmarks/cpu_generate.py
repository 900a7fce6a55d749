"""The main job's generation on a CPU, as generate.py runs it (the embedded default model in float32, greedy), timed
under generate()'s own torch.no_grad and under torch.inference_mode (what generate.py wraps it in on a CPU: no
autograd bookkeeping per operation), in rounds that alternate which mode goes first, in one process.

Run it from the repo root (the script form, never `python -m`):

    python benchmarks/cpu_generate.py                    # about a minute on 2 cores

Each round generates --new-tokens tokens after the --prompt in both modes; the tokens must be equal. Reports tokens/s
per round, their medians, and the median of the rounds' ratios (each round's two runs back to back, so a slow
period of the machine weighs on both). Writes benchmarks/results/cpu_generate.json (rounds, medians, versions, date)
and cpu_generate.png, and prints a table.
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from cpu_prefill import metadata  # noqa: E402
from decode_gpu import save_json, save_png  # noqa: E402

MODES = {"no_grad (generate's own)": contextlib.nullcontext, "inference_mode": torch.inference_mode}


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, rounds in report["tokens_per_s"].items():
        ax.plot(range(1, len(rounds) + 1), rounds, marker="o", label=f"{mode}: median {report['median'][mode]:.1f}")
    ax.set_xlabel("round")
    ax.set_ylabel("tokens/s (greedy, batch 1)")
    ax.legend()
    meta = report["meta"]
    fig.suptitle(f"Kimi Linear main job on a CPU | {meta['cpu_model']} | torch {meta['torch']} | "
                 f"{meta['date_utc'][:10]} | {meta['git_commit']}", fontsize=8)  # fmt: skip
    fig.tight_layout()
    save_png(fig, path)


def main(argv=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "default_model", help="(default: the embedded model)")
    ap.add_argument("--prompt", default="To be, or not to be", help="(default: %(default)r)")
    ap.add_argument("--new-tokens", type=int, default=200, help="(default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=12, help="(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    if args.new_tokens < 1 or args.rounds < 1:
        ap.error("--new-tokens and --rounds must be positive")
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    meta = metadata()
    print(f"{meta['cpu_model']} | torch {meta['torch']} | transformers {meta['transformers']} | {meta['date_utc']} | "
          f"{meta['git_commit']}", file=sys.stderr)  # fmt: skip

    def run(mode):
        with MODES[mode]():
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
            seconds = time.perf_counter() - start
        return out, (out.shape[1] - inputs["input_ids"].shape[1]) / seconds

    for mode in MODES:  # warm-up
        run(mode)
    speeds = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        outs = {}
        for mode in list(MODES)[:: 1 if r % 2 == 0 else -1]:
            outs[mode], tps = run(mode)
            speeds[mode].append(tps)
        first, *others = outs.values()
        if not all(torch.equal(first, o) for o in others):
            raise SystemExit(f"round {r + 1}: the modes generated different tokens")
        print(f"round {r + 1:2d}: " + "  ".join(f"{m} {speeds[m][-1]:6.1f} tokens/s" for m in MODES), file=sys.stderr)
    base, new = list(MODES)
    ratios = [b / a for a, b in zip(speeds[base], speeds[new])]
    report = {
        "meta": meta,
        "args": {k: str(v) for k, v in vars(args).items()},
        "new_tokens": int(first.shape[1] - inputs["input_ids"].shape[1]),
        "tokens_per_s": speeds,
        "median": {m: statistics.median(v) for m, v in speeds.items()},
        "ratio_per_round": ratios,
        "median_ratio": statistics.median(ratios),
        "rounds_faster": sum(x > 1 for x in ratios),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_json(args.out_dir / "cpu_generate.json", report)
    plot(report, args.out_dir / "cpu_generate.png")
    print(f"\n{'mode':28s} {'median tokens/s':>16s}")
    for m in MODES:
        print(f"{m:28s} {report['median'][m]:16.1f}")
    print(f"inference_mode / no_grad, median of {args.rounds} paired rounds: {report['median_ratio']:.3f} "
          f"(faster in {report['rounds_faster']} of {args.rounds})")  # fmt: skip
    print(f"wrote {args.out_dir / 'cpu_generate.json'} and cpu_generate.png")


if __name__ == "__main__":
    main()
