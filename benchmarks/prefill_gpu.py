"""Long-context prefill of the whole model: the hybrid against its all-MLA twin, 128k to 1M tokens on one card.

    python benchmarks/prefill_gpu.py --out-dir benchmarks/results          # on a CUDA machine (bash .ci/gpu prefill)
    python benchmarks/prefill_gpu.py --device cpu --configs conversion/configs/tiny.json --contexts 256 512  # smoke

Models: benchmarks/configs/bench_1b_hybrid.json (6 KDA + 2 MLA layers) and bench_1b_all_mla.json (every layer MLA),
random weights, --dtype (bfloat16), batch 1. Each context is prefilled the way generate(prefill_chunk_size=...) does
it: pieces of --chunk tokens through the model's default cache (KDA layers carry their state, MLA layers attend from
each piece to the cached latents under a lower-right causal bias), logits of the last token only. Reported per
model and context: seconds from the first piece to the last (after a warm-up piece of the same size, so that
kernels are compiled), tokens/s, peak GPU memory, and the cache's bytes at the end. A case that runs past
--case-budget-s stops after the piece in flight and is reported with the tokens it reached ("over budget"); a size
that does not fit is reported as OOM. The table gives all-MLA / hybrid time per context (the paper: 2.3x at 512k and
2.9x at 1M on the full model).

Writes prefill_gpu.json (rows, card, versions, date, commit) and prefill_gpu.png to --out-dir and prints a table.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode_gpu import free, metadata, sync  # noqa: E402

from kimi_linear.configuration_kimi_linear import KDA, KimiLinearConfig  # noqa: E402
from kimi_linear.modeling_kimi_linear import KimiLinearCache, KimiLinearForCausalLM  # noqa: E402
from kimi_linear_kernels.tuned import record_if_tuned  # noqa: E402

CONFIGS = [HERE / "configs" / f"bench_1b_{name}.json" for name in ("hybrid", "all_mla")]


def prefill_case(model, context, args, device):
    row = {"context": context, "chunk": args.chunk}
    gen = torch.Generator(device="cpu").manual_seed(context)
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=gen).to(device)
    cache = None
    try:
        warm = KimiLinearCache(model.config)
        model(ids[:, : args.chunk], cache=warm, logits_to_keep=1)  # compiles what the pieces will use
        del warm
        free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cache = KimiLinearCache(model.config)
        sync(device)
        start = time.perf_counter()
        done = 0
        for i in range(0, context, args.chunk):
            model(ids[:, i : i + args.chunk], cache=cache, logits_to_keep=1)
            sync(device)
            done = min(context, i + args.chunk)
            if time.perf_counter() - start > args.case_budget_s and done < context:
                break
        seconds = time.perf_counter() - start
        row.update(tokens=done, seconds=seconds, tokens_per_s=done / seconds)
        row["status"] = "ok" if done == context else "over budget"
        row["cache_bytes"] = cache.nbytes()["total"]
        if device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    finally:
        del cache
        free(device)
    return row


def table(result):
    rows = result["rows"]
    lines = [
        f"{'context':>9} {'model':>8} {'status':>12} {'seconds':>9} {'tokens/s':>10} {'peak GB':>8} {'cache MB':>9}"
    ]
    for r in rows:
        lines.append(
            f"{r['context']:>9} {r['model']:>8} {r['status']:>12} {r.get('seconds', float('nan')):>9.2f} "
            f"{r.get('tokens_per_s', float('nan')):>10,.0f} {r.get('peak_memory_gb', float('nan')):>8.1f} "
            f"{r.get('cache_bytes', float('nan')) / 1e6:>9.1f}"
        )
    for ctx, ratio in result["all_mla_over_hybrid"].items():
        lines.append(f"  {ctx}: all-MLA / hybrid time {ratio:.2f}x")
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for model, marker in (("hybrid", "o"), ("all-MLA", "s")):
        pts = [(r["context"], r["seconds"]) for r in result["rows"] if r["model"] == model and r["status"] == "ok"]
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=model)
    for ctx, ratio in result["all_mla_over_hybrid"].items():
        ax.annotate(f"{ratio:.1f}x", (int(ctx), 0), xycoords=("data", "axes fraction"), ha="center", fontsize=8,
                    xytext=(0, 4), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens (batch 1)")
    ax.set_ylabel("prefill seconds")
    m = result["meta"]
    ax.set_title(f"Prefill, bench_1b | {m['card']} | torch {m['torch']} | {m['date_utc'][:10]} | {m['git_commit']}",
                 fontsize=8)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=[str(c) for c in CONFIGS], help="(default: the bench_1b pair)")
    ap.add_argument("--contexts", nargs="+", type=int, default=[131072, 524288, 1048576], help="(default: %(default)s)")
    ap.add_argument("--chunk", type=int, default=65536, help="prefill piece (default: %(default)s)")
    ap.add_argument("--case-budget-s", type=float, default=300.0, help="(default: %(default)s)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results", help="(default: %(default)s)")
    args = ap.parse_args(argv)
    if min(args.contexts) < 1 or args.chunk < 1:
        ap.error("--contexts and --chunk must be positive")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    result = {"meta": metadata(device), "dtype": args.dtype, "args": {**vars(args), "out_dir": str(args.out_dir)},
              "rows": [], "all_mla_over_hybrid": {}}  # fmt: skip
    for path in args.configs:
        config = KimiLinearConfig(**json.loads(Path(path).read_text()))
        label = "hybrid" if KDA in config.layer_types else "all-MLA"
        torch.manual_seed(0)
        with torch.device(device):
            model = KimiLinearForCausalLM(config).to(dtype).eval()
        with torch.no_grad():
            for ctx in args.contexts:
                print(f"[{label}] context {ctx}", file=sys.stderr, flush=True)
                row = {"model": label, "config": Path(path).name, **prefill_case(model, ctx, args, device)}
                print(f"  {row}", file=sys.stderr, flush=True)
                result["rows"].append(row)
        del model
        free(device)
    times = {(r["model"], r["context"]): r["seconds"] for r in result["rows"] if r["status"] == "ok"}
    for ctx in args.contexts:
        if ("hybrid", ctx) in times and ("all-MLA", ctx) in times:
            result["all_mla_over_hybrid"][str(ctx)] = times[("all-MLA", ctx)] / times[("hybrid", ctx)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = args.out_dir / ".prefill_gpu.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out_dir / "prefill_gpu.json")
    plot(result, args.out_dir / "prefill_gpu.png")
    record_if_tuned(args.out_dir, "prefill")
    print(table(result))
    return result


if __name__ == "__main__":
    main()
