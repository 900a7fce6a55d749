"""MLA decode attention as the static cache's decode step runs it: one query per row and head against a buffer of
`buffer` latent slots of which the first `used` are written (generate() sizes the buffer to the prompt plus
max_new_tokens; a user cache may be larger), `pad` of them left padding in half the rows. Times of the one-pass
kernel (kernels/mla_decode.py) from CUDA graphs (triton.testing.do_bench_cudagraph, median), all at the bench
model's shape (32 heads, 576-value latents, 512 values), bf16:

  mask    the whole buffer under a per-slot mask (padding and unwritten slots hidden): the static cache before spans
  span    each row's span of slots, first real slot to the step's own, bounds read on the device: the static cache now
  grown   exactly the written slots (a per-slot mask only when there is padding): what the growing cache
          (KimiLinearCache) reads, which a fixed-shape, graph-replayed step cannot do
  floor   the written latents' bytes / the card's copy bandwidth, measured in the same run

The slots outside the spans hold NaN (the span must never read them); the outputs are checked against float64
where that fits in memory.

    python benchmarks/mla_decode_span.py --out-dir benchmarks/results     # on a CUDA machine, about a minute
Writes mla_decode_span.json and mla_decode_span.png and prints a table.
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gpu import copy_bandwidth, metadata, save_json, save_png  # noqa: E402

from kimi_linear_kernels import mla_decode  # noqa: E402

H, D, DV = 32, 576, 512
SCALE = 192**-0.5
K = 1024
# (batch, buffer slots, written slots, left padding in half the rows)
CASES = [(B, ctx + 256, ctx, 0) for B in (1, 16) for ctx in (8 * K, 128 * K, 512 * K, 1024 * K)]
CASES += [(16, 1024 * K + 256, 1024 * K, 1000), (16, 128 * K, 8 * K, 0), (64, 32 * K, 2 * K, 0)]


def rel_rms(a, ref):
    return ((a.double() - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()


def run_case(B, S, used, pad, dev, bw):
    g = torch.Generator(device=dev).manual_seed(S + B)
    q = torch.randn(B, H, D, device=dev, generator=g).bfloat16()
    lat = torch.randn(B, S, D, device=dev, generator=g).bfloat16()
    first = torch.zeros(B, dtype=torch.long, device=dev)
    first[::2] = pad
    last = torch.tensor([used - 1], device=dev)
    slots = torch.arange(S, device=dev)
    keep = (slots >= first[:, None]) & (slots <= last)
    lat[~keep] = float("nan")  # never to be read
    row = {"B": B, "buffer": S, "used": used, "pad": pad, "floor_us": B * used * D * 2 / bw * 1e6}
    variants = {
        "mask": partial(mla_decode.mla_decode, q, lat.nan_to_num(0.0), keep, SCALE, DV),
        "span": partial(mla_decode.mla_decode, q, lat, None, SCALE, DV, span=(first, last)),
        "grown": partial(
            mla_decode.mla_decode, q, lat[:, :used].nan_to_num(0.0), keep[:, :used] if pad else None, SCALE, DV
        ),  # fmt: skip
    }
    ref = None
    if B * used <= 1 << 17:
        scores = (q.double() @ lat[:, :used].nan_to_num(0.0).double().transpose(1, 2)) * SCALE
        scores = scores.masked_fill(~keep[:, None, :used], float("-inf"))
        ref = scores.softmax(-1) @ lat[:, :used, :DV].nan_to_num(0.0).double()
    for name, fn in variants.items():
        out = fn()
        row[f"{name}_finite"] = bool(out.isfinite().all())
        if ref is not None:
            row[f"{name}_err"] = rel_rms(out, ref)
        row[f"{name}_us"] = do_bench_cudagraph(fn, rep=200) * 1e3
    return row


def plot(meta, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, B in zip(axes, (1, 16)):
        fitted = [r for r in rows if r["B"] == B and r["buffer"] == r["used"] + 256 and not r["pad"]]
        x = [r["used"] for r in fitted]
        for key, style in [("mask", "o-"), ("span", "s-"), ("grown", "^--"), ("floor", "k:")]:
            ax.plot(x, [r[f"{key}_us"] for r in fitted], style, label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached tokens")
        ax.set_title(f"batch {B}")
    axes[0].set_ylabel("us per MLA layer decode attention")
    axes[0].legend()
    fig.suptitle(f"MLA decode attention | {meta['card']} | torch {meta['torch']} | triton {meta['triton']} | "
                 f"{meta['date_utc'][:10]} | {meta['git_commit'][:7]}", fontsize=8)  # fmt: skip
    fig.tight_layout()
    save_png(fig, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    dev = torch.device("cuda")
    meta = metadata(dev)
    bw = copy_bandwidth(dev)
    print(f"{meta['card']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date_utc']} | copy "
          f"{bw / 1e12:.2f} TB/s")  # fmt: skip
    print(f"{'B':>3} {'buffer':>8} {'used':>8} {'pad':>5} | {'mask us':>9} {'span us':>9} {'grown us':>9} "
          f"{'floor us':>9} | mask/span | span/floor | finite, err (span)")  # fmt: skip
    rows = []
    for case in CASES:
        row = run_case(*case, dev, bw)
        rows.append(row)
        err = row.get("span_err")
        print(f"{row['B']:>3} {row['buffer']:>8} {row['used']:>8} {row['pad']:>5} | {row['mask_us']:>9.1f} "
              f"{row['span_us']:>9.1f} {row['grown_us']:>9.1f} {row['floor_us']:>9.1f} | "
              f"{row['mask_us'] / row['span_us']:>9.2f} | {row['span_us'] / row['floor_us']:>10.2f} | "
              f"{row['span_finite']}, {'-' if err is None else f'{err:.1e}'}", flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"metadata": meta, "copy_bandwidth_Bps": bw, "rows": rows}
    save_json(args.out_dir / "mla_decode_span.json", report)
    plot(meta, rows, args.out_dir / "mla_decode_span.png")


if __name__ == "__main__":
    main()
