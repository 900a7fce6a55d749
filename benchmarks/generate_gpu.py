"""Whole generate() calls as a user makes them: wall time from the call to the tokens, for generate()'s default cache
beside each cache named, on the bench model (benchmarks/configs/bench_1b_hybrid.json, random weights, bf16):

  default   model.generate(ids, ...) with no cache_implementation: what a user gets (the static cache and a CUDA
            graph on one CUDA device, the growing cache elsewhere; before that choice, always the growing cache)
  dynamic   cache_implementation="dynamic": KimiLinearCache, every decode step launched op by op
  static    cache_implementation="static": KimiLinearStaticCache, the decode step captured in a CUDA graph at the
            first decode step of each call (a fresh cache per call) and replayed for the rest

For each batch in --batches, prompt length in --prompts and number of new tokens in --new: greedy, min_new_tokens =
max_new_tokens (every call makes exactly that many), one untimed call, then the median of --repeats timed calls
(device synchronised before and after). The default's cache and decode mode are recorded with each row. A short
generation pays the graph's capture (two warm-up steps and the capture) in every call; the table shows where that
is repaid.

    python benchmarks/generate_gpu.py --out-dir benchmarks/results     # on a CUDA machine, a few minutes
    python benchmarks/generate_gpu.py --device cpu --config conversion/configs/tiny.json --prompts 16 --new 2 4

Writes generate_gpu.json (rows, card, versions, date, commit) and generate_gpu.png and prints a table.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gpu import metadata, out_cache, save_json, save_png, sync  # noqa: E402

from kimi_linear.configuration_kimi_linear import KimiLinearConfig  # noqa: E402
from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHES = {"default": None, "dynamic": "dynamic", "static": "static"}


def timed_generate(model, ids, new, implementation, repeats, device):
    """(median seconds of a generate() call, the cache of the last call)."""
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    if implementation is not None:
        kwargs["cache_implementation"] = implementation
    times, out = [], None
    for i in range(repeats + 1):  # the first call untimed: kernels compiled, allocator settled
        sync(device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        sync(device)
        if i:
            times.append(time.perf_counter() - start)
        assert out.sequences.shape[1] == ids.shape[1] + new
    return statistics.median(times), out_cache(out, None)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["batch"], r["prompt"]) for r in result["rows"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False, sharey=True)
    for ax, (B, T) in zip(axes[0], keys):
        for name in CACHES:
            pts = [(r["new"], r["ms_per_token"]) for r in result["rows"]
                   if (r["batch"], r["prompt"], r["cache"]) == (B, T, name)]  # fmt: skip
            if pts:
                ax.plot(*zip(*pts), "o-", label=name)
        ax.set(xscale="log", yscale="log", xlabel="new tokens per call", title=f"batch {B}, prompt {T}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("ms per new token (whole call)")
    axes[0][0].legend()
    meta = result["meta"]
    fig.suptitle(f"Kimi Linear generate() | {meta['card']} | torch {meta['torch']} | {meta['date_utc'][:10]} | "
                 f"{meta['git_commit']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    save_png(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "benchmarks" / "configs" / "bench_1b_hybrid.json"))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="(default: %(default)s)")
    ap.add_argument("--prompts", nargs="+", type=int, default=[128, 4096], help="(default: %(default)s)")
    ap.add_argument("--new", nargs="+", type=int, default=[2, 8, 32, 128], help="(default: %(default)s)")
    ap.add_argument("--caches", nargs="+", choices=list(CACHES), default=list(CACHES), help="(default: all)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row (default: %(default)s)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    meta = metadata(device)
    config = KimiLinearConfig(**json.loads(Path(args.config).read_text()))
    torch.manual_seed(0)
    with torch.device(device):
        model = KimiLinearForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    result = {"meta": meta, "dtype": args.dtype, "args": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    print(f"{meta['card']} | torch {meta['torch']} | transformers {meta['transformers']} | {meta['date_utc']} | "
          f"{meta['git_commit']}", file=sys.stderr)  # fmt: skip
    header = f"{'batch':>5} {'prompt':>6} {'new':>5} {'cache':>8} {'call ms':>10} {'ms/token':>9}  chosen, decode mode"
    lines = [header]
    print(header, flush=True)
    for B in args.batches:
        for T in args.prompts:
            ids = torch.randint(3, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(T)).to(device)
            for new in args.new:
                for name in args.caches:
                    seconds, cache = timed_generate(model, ids, new, CACHES[name], args.repeats, device)
                    row = dict(batch=B, prompt=T, new=new, cache=name, call_ms=seconds * 1e3,
                               ms_per_token=seconds * 1e3 / new, chosen=type(cache).__name__,
                               decode_mode=getattr(cache, "decode_mode", None) or "eager")  # fmt: skip
                    result["rows"].append(row)
                    line = (f"{B:>5} {T:>6} {new:>5} {name:>8} {row['call_ms']:>10.1f} {row['ms_per_token']:>9.2f}  "
                            f"{row['chosen']}, {row['decode_mode']}")  # fmt: skip
                    lines.append(line)
                    print(line, flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_json(args.out_dir / "generate_gpu.json", result)
    plot(result, args.out_dir / "generate_gpu.png")
    print(f"[wrote {args.out_dir / 'generate_gpu.json'} and generate_gpu.png]", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
