"""Compare the new-length results of several cold_start.py runs (two commits run in turn on one card): per length,
first / warm ms and the first call's excess over warm and, where the run has one, over its control (the same
length seen, at the same place in a later pass), per run; then per commit the median excess and how many
lengths stayed within the issue's 5%. Prints a table, writes new_lengths.json and new_lengths.png.

    python benchmarks/compare_new_lengths.py --out-dir benchmarks/results NAME=cold_start.json NAME=...
"""

import argparse
import json
import statistics
from pathlib import Path


def paid(c):
    """The letters of what a first call paid for (where its run recorded it)."""
    first = c.get("first_call", {})
    return "".join(letter for letter, hit in [
        ("C", c.get("compiled_at_launch")),
        ("B", any(ms >= 10 for _, ms in c.get("plan_builds", []))),
        ("L", first.get("kernel_loads")),
        ("G", any(gen == 2 for gen, _ in first.get("gc", []))),
        ("M", first.get("device_allocs")),
    ] if hit)  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=PATH of a cold_start.json; runs of one commit share NAME's part "
                    "before the first '#' (e.g. 0875e24#1=a.json 0875e24#2=b.json)")  # fmt: skip
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--name", default="new_lengths", help="file name stem (default: %(default)s)")
    args = ap.parse_args()
    runs = {}
    for spec in args.runs:
        name, _, path = spec.partition("=")
        data = json.loads(Path(path).read_text())
        mode = next(m for m in data["modes"] if m["mode"] == "precompiled")
        runs[name] = {"metadata": data["metadata"], "new_lengths": mode["new_lengths"],
                      "first_prefill_s": mode["first_prefill"]["first_s"],
                      "first_train_step_s": mode["first_train_step"]["first_s"]}  # fmt: skip
    lengths = list(next(iter(runs.values()))["new_lengths"])
    print(
        "first/warm ms, first over warm, first over control (the same length seen, at the same place in a later "
        "pass; cold_start.py --control-passes); what the first call paid for: C Triton compiled, B a cuDNN attention "
        "plan built (>= 10 ms), L Triton kernels loaded onto the GPU, G a full garbage collection, M cudaMalloc"
    )
    print(f"{'length':>7} | " + " | ".join(f"{n:>35}" for n in runs))
    for L in lengths:
        cells = []
        for r in runs.values():
            c = r["new_lengths"].get(L)
            ms = f"{c['first_s'] * 1e3:6.1f}/{c['warm_s'] * 1e3:6.1f}" if c else ""
            ctl = f" {100 * c['over_control']:+6.1f}%" if c and "over_control" in c else " " * 8
            cells.append(f"{ms} {100 * c['over_warm']:+6.1f}%{ctl} {paid(c):5}" if c else "")
        print(f"{L:>7} | " + " | ".join(f"{c:>35}" for c in cells))
    summary = {}
    for name, r in runs.items():
        commit = name.split("#")[0]
        over = [c["over_warm"] for c in r["new_lengths"].values()]
        s = summary.setdefault(commit, {"over_warm": [], "over_control": [], "first_prefill_s": [],
                                        "first_train_step_s": []})  # fmt: skip
        s["over_warm"] += over
        s["over_control"] += [c["over_control"] for c in r["new_lengths"].values() if "over_control" in c]
        s["first_prefill_s"].append(r["first_prefill_s"])
        s["first_train_step_s"].append(r["first_train_step_s"])
    for commit, s in summary.items():
        s["median_over_warm"] = statistics.median(s["over_warm"])
        s["within_5_percent"] = f"{sum(v <= 0.05 for v in s['over_warm'])}/{len(s['over_warm'])}"
        control = ""
        if s["over_control"]:
            s["median_over_control"] = statistics.median(s["over_control"])
            s["within_5_percent_of_control"] = f"{sum(v <= 0.05 for v in s['over_control'])}/{len(s['over_control'])}"
            control = (f"; over control: median {100 * s['median_over_control']:+.1f}%, within 5%: "
                       f"{s['within_5_percent_of_control']}")  # fmt: skip
        print(
            f"{commit}: over warm: median {100 * s['median_over_warm']:+.1f}%, within 5%: {s['within_5_percent']}"
            f"{control}; first prefill {s['first_prefill_s']} s, first training step {s['first_train_step_s']} s"
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"runs": runs, "summary": summary}
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, r in runs.items():
        xs = sorted(int(L) for L in lengths if L in r["new_lengths"])  # in length order, not run order
        over = [100 * r["new_lengths"][str(x)]["over_warm"] for x in xs]
        line = ax.plot(xs, over, marker="o", label=f"{name} / warm")
        ctl = [x for x in xs if "over_control" in r["new_lengths"][str(x)]]
        if ctl:
            ax.plot(ctl, [100 * r["new_lengths"][str(x)]["over_control"] for x in ctl], marker="x", ls=":",
                    color=line[0].get_color(), label=f"{name} / control")  # fmt: skip
    ax.axhline(5, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("prompt length (tokens), new to the process")
    ax.set_ylabel("first call over warm (o) and over control (x), %")
    meta = next(iter(runs.values()))["metadata"]
    ax.set_title(f"bench_1b_hybrid prefill at new lengths ({meta.get('card')}, torch {meta.get('torch')}, "
                 f"{meta.get('date_utc', '')[:10]})", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out_dir / f"{args.name}.png", dpi=120)


if __name__ == "__main__":
    main()
