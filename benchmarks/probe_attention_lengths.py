"""Probe: what a prompt of a new length costs in MLA's prefill attention (SDPA, 32 heads, q/k 192 and v 128 per head,
causal, bf16; cuDNN's kernel on an H100) as the model lays the tensors out and with every tensor in [B, S, H, D]
memory, each with and without PyTorch's TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (cuDNN's variable-length path, one graph
for every length). Each case runs in a fresh process: SDPA warm at 8192 tokens, then at each new length the first
call against the warm median of that length, and the output against the memory-efficient kernel's.

    python benchmarks/probe_attention_lengths.py --out-dir /tmp/probe
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LENGTHS = [32768, 50001, 50003, 65536, 131072, 8200]


def child(layout):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    h, dq, dv = 32, 192, 128
    gen = torch.Generator(device="cuda").manual_seed(0)

    def inputs(T):
        kv = torch.randn(1, T, h, 128 + dv, device="cuda", dtype=torch.bfloat16, generator=gen)
        k_pe = torch.randn(1, T, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        q = torch.randn(1, T, h, dq, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
        k_nope, v = kv.split([128, dv], dim=-1)
        if layout == "model":  # as MLA._expand: k concatenated in [B, H, S, D], v a view of the expanded rows
            k = torch.cat([k_nope.transpose(1, 2), k_pe[:, None].expand(1, h, T, 64)], dim=-1)
            v = v.transpose(1, 2)
        else:  # every tensor in [B, S, H, D] memory
            k = torch.cat([k_nope, k_pe[:, :, None].expand(1, T, h, 64)], dim=-1).transpose(1, 2)
            v = v.contiguous().transpose(1, 2)
        return q, k, v

    def call(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t, out

    rows = {}
    warm_up = functools.partial(call, *inputs(8192))
    for _ in range(3):
        timed(warm_up)
    del warm_up
    avoid = os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "0")
    for T in LENGTHS:
        fn = functools.partial(call, *inputs(T))
        first, out = timed(fn)
        warm = sorted(timed(fn)[0] for _ in range(3))[1]
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            ref = fn()
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        rows[T] = {"first_s": first, "warm_s": warm, "over_warm": first / warm - 1, "rel_max_err_vs_efficient": err}
        print(f"  [{layout}, avoid_recompile={avoid}] T={T}: first {first * 1e3:.1f} ms, warm {warm * 1e3:.1f} ms, "
              f"err {err:.1e}", file=sys.stderr, flush=True)  # fmt: skip
        del fn, out, ref
    print(json.dumps(rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--child", choices=["model", "bshd"])
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    import torch

    lib = Path(torch.__file__).parent / "lib" / "libtorch_cuda.so"
    knows = b"TORCH_CUDNN_SDPA_AVOID_RECOMPILE" in lib.read_bytes() if lib.exists() else None
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name(0)}; "
          f"libtorch_cuda names TORCH_CUDNN_SDPA_AVOID_RECOMPILE: {knows}", flush=True)  # fmt: skip
    report = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "card": torch.cuda.get_device_name(0), "env_known": knows, "cases": {}}  # fmt: skip
    for layout in ["model", "bshd"]:
        for avoid in ["0", "1"]:
            env = dict(os.environ, TORCH_CUDNN_SDPA_AVOID_RECOMPILE=avoid)
            res = subprocess.run([sys.executable, __file__, "--out-dir", str(args.out_dir), "--child", layout],
                                 env=env, capture_output=True, text=True)  # fmt: skip
            sys.stderr.write(res.stderr[-3000:])
            key = f"{layout}/avoid_recompile={avoid}"
            report["cases"][key] = (
                json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {"error": res.stderr[-500:]}
            )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "probe_attention_lengths.json").write_text(json.dumps(report, indent=1))
    print(f"{'case':28s} " + " ".join(f"{T:>16d}" for T in LENGTHS))
    for key, rows in report["cases"].items():
        cells = " ".join(f"{rows[str(T)]['over_warm'] * 100:+8.0f}% {rows[str(T)]['warm_s'] * 1e3:5.1f}ms"
                         if str(T) in rows else f"{'error':>16s}" for T in LENGTHS)  # fmt: skip
        print(f"{key:28s} {cells}")


if __name__ == "__main__":
    main()
