"""MLA decode attention on the latents: the one-pass Triton kernel (kernels/mla_decode.py) against the model's two
batched products (KimiMLAAttention._attend_one) and float64, at the bench model's shape (32 heads, 576-value
latents, 512 values), over contexts and batch sizes, with a sweep of the kernel's launch settings. CUDA graph
timings (triton.testing.do_bench_cudagraph, median); floor = latent bytes / the card's copy bandwidth.

    python benchmarks/probe_mla_decode.py --out-dir benchmarks/results     # on a CUDA machine, about a minute
Writes mla_decode.json and prints a table.
"""

import argparse
import json
import sys
import types
from functools import partial
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gpu import copy_bandwidth, metadata  # noqa: E402

from kimi_linear.modeling_kimi_linear import KimiMLAAttention  # noqa: E402
from kimi_linear_kernels import mla_decode  # noqa: E402

H, D, DV = 32, 576, 512


def rel_rms(a, ref):
    return ((a.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072, 524288])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-latent-gib", type=float, default=12, help="skip shapes whose latents exceed this")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    twin = types.SimpleNamespace(decode_kernel=False, scaling=192**-0.5, kv_lora_rank=DV)
    sweep = [dict(block_s=bs, num_warps=w, num_stages=st, min_chunk=mc)
             for bs in (32, 64) for w in (4, 8) for st in (1, 2) for mc in (128, 512)]  # fmt: skip
    rows = []
    for B in args.batches:
        for S in args.contexts:
            if B * S * D * 2 > args.max_latent_gib * 2**30:
                continue
            g = torch.Generator(device=dev).manual_seed(S + B)
            q = torch.randn(B, H, D, device=dev, generator=g).bfloat16()
            lat = torch.randn(B, S, D, device=dev, generator=g).bfloat16()
            ref = None
            if B * S <= 2**17:
                p = (q.double() @ lat.double().transpose(1, 2) * twin.scaling).softmax(-1)
                ref = p @ lat.double()[..., :DV]
            row = {"B": B, "S": S, "floor_us": B * S * D * 2 / bw * 1e6}
            torch_fn = partial(KimiMLAAttention._attend_one, twin, q, lat, None)
            row["torch_us"] = do_bench_cudagraph(torch_fn, rep=100) * 1e3
            if ref is not None:
                row["torch_err"] = rel_rms(torch_fn(), ref)
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            for cfg in sweep:
                splits = max(1, min(-(-S // cfg["min_chunk"]), 2 * sms // B))
                name = "bs{block_s}_w{num_warps}_st{num_stages}_c{min_chunk}".format(**cfg)
                launch = {k: v for k, v in cfg.items() if k != "min_chunk"}
                fn = partial(mla_decode.mla_decode, q, lat, None, twin.scaling, DV, splits=splits, **launch)
                try:
                    out = fn()
                    row[f"{name}_us"] = do_bench_cudagraph(fn, rep=100) * 1e3
                    if ref is not None:
                        row[f"{name}_err"] = rel_rms(out, ref)
                except Exception as err:  # a setting that does not compile (shared memory): say so, go on
                    row[f"{name}_us"] = f"{type(err).__name__}: {str(err)[:80]}"
            best = min((k for k in row if k.startswith("bs") and k.endswith("_us") and isinstance(row[k], float)),
                       key=row.get, default=None)  # fmt: skip
            row["best"] = best
            print(
                f"B={B:3d} S={S:7d} floor {row['floor_us']:8.1f} us  torch {row['torch_us']:8.1f} us"
                f" (err {row.get('torch_err', float('nan')):.2e})  best {best} {row.get(best, float('nan')):8.1f} us"
                f" (err {row.get(best[:-3] + '_err', float('nan')) if best else float('nan'):.2e})",
                flush=True,
            )
            print(
                "   "
                + "  ".join(
                    f"{k[:-3]}={v:.1f}"
                    for k, v in row.items()
                    if k.startswith("bs") and k.endswith("_us") and isinstance(v, float)
                ),
                flush=True,
            )
            rows.append(row)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"metadata": metadata(dev), "copy_bandwidth_Bps": bw, "rows": rows}
    (args.out_dir / "mla_decode.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
