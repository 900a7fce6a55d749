"""Probe: MLA's prefill attention without a per-length plan (kernels/mla_prefill.py) against cuDNN's, at MLA's prefill
shape (32 heads, q/k 192 and v 128 per head, causal, bf16, the model's memory layout).

1. each launch setting of the Triton kernel against cuDNN warm at each length (median of 5, CUDA events), with the
   first call's compile time and the output's difference from cuDNN's;
2. the chosen setting at lengths it has not seen: first call against warm (nothing compiles);
3. with --model, the bench model's prefill at each length, first call then warm, layer by layer: when the host
   reaches each layer and when the GPU starts it (how much GPU work is queued when a layer's launches are made,
   which is what hides a cuDNN plan's build), and what each MLA layer's attention ran.

An earlier version built cuDNN's plan on a worker thread inside an unreplayed CUDA graph capture: the main thread's
torch.cuda.synchronize() during that capture raised (results/probe_plan_ahead_capture.log), so that way is closed.
Flash attention with v padded to 192 took 2.1-2.5x cuDNN's time there, the memory-efficient kernel 4.2-4.4x.

    python benchmarks/probe_mla_prefill.py --out-dir /tmp/probe --model 8192 32768
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

H, DQ, DV = 32, 192, 128
# (block_m, block_n, warps, stages, TMA loads)
SETTINGS = [(128, 128, 8, 2, False), (128, 64, 8, 3, False), (128, 128, 8, 2, True), (128, 64, 8, 3, True),
            (128, 64, 8, 2, True), (128, 128, 8, 3, True), (128, 64, 8, 4, True)]  # fmt: skip


def inputs(T, gen):
    """q, k, v of T tokens laid out as the model's prefill hands them to SDPA."""
    kv = torch.randn(1, T, H, 128 + DV, device="cuda", dtype=torch.bfloat16, generator=gen)
    k_pe = torch.randn(1, T, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(1, T, H, DQ, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
    k_nope, v = kv.split([128, DV], dim=-1)
    k = torch.cat([k_nope.transpose(1, 2), k_pe[:, None].expand(1, H, T, 64)], dim=-1)
    return q, k, v.transpose(1, 2)


def name(setting):
    bm, bn, w, s, tma = setting
    return f"{bm}x{bn} w{w} s{s}{' tma' if tma else ''}"


def gpu_ms(fn, reps=5):
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def host_s(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def timeline(lengths):
    """The bench model's prefill at each length, first call (a new length) then warm: per layer, host and GPU start
    times (ms from the forward's start), and in the first call what each MLA layer's attention ran and the clock's
    estimate of the GPU work queued ahead of it."""
    import kimi_linear.modeling_kimi_linear as modeling
    import kimi_linear_kernels as kernels
    from kimi_linear.configuration_kimi_linear import KimiLinearConfig

    config = Path(__file__).resolve().parent / "configs" / "bench_1b_hybrid.json"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = modeling.KimiLinearForCausalLM(KimiLinearConfig(**json.loads(config.read_text()))).bfloat16().eval()
    marks, paths = [], []

    def hook(module, args):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.append((time.perf_counter(), ev))

    for layer in model.model.layers:
        layer.register_forward_pre_hook(hook)
    fused, sdpa, queued = (
        kernels.mla_prefill_attention,
        F.scaled_dot_product_attention,
        modeling._PrefillClock.queued_ms,
    )
    kernels.mla_prefill_attention = lambda *a, **k: paths.append("triton") or fused(*a, **k)
    F.scaled_dot_product_attention = lambda *a, **k: paths.append("sdpa") or sdpa(*a, **k)
    modeling._PrefillClock.queued_ms = lambda self: (lambda ms: paths.append(f"queued {ms:.1f} ms") or ms)(queued(self))

    def one(x):
        marks.clear()
        paths.clear()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x, logits_to_keep=1)
        host = (time.perf_counter() - t0) * 1e3
        end.record()
        end.synchronize()
        layers = [[round((t - t0) * 1e3, 1), round(start.elapsed_time(ev), 1)] for t, ev in marks]
        return {"gpu_ms": start.elapsed_time(end), "host_ms": host, "layers": layers, "mla": list(paths)}

    rows = {}
    one(torch.randint(3, model.config.vocab_size, (1, 2048), device="cuda"))  # compiles every kernel
    try:
        for T in lengths:
            x = torch.randint(3, model.config.vocab_size, (1, T), device="cuda")
            first = one(x)
            warm = [one(x) for _ in range(3)][-1]
            rows[T] = {"first": first, "warm": warm}
            for name, r in (("first", first), ("warm", warm)):
                starts = " ".join(f"{h}/{g}" for h, g in r["layers"])
                print(f"T={T} {name}: GPU {r['gpu_ms']:.1f} ms, host {r['host_ms']:.1f} ms; MLA: {r['mla']}; "
                      f"layer starts host/GPU ms: {starts}", flush=True)  # fmt: skip
    finally:
        kernels.mla_prefill_attention, F.scaled_dot_product_attention = fused, sdpa
        modeling._PrefillClock.queued_ms = queued
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768, 65536])
    ap.add_argument("--new-lengths", type=int, nargs="+", default=[5001, 40000, 100003])
    ap.add_argument("--model", type=int, nargs="*", default=[], help="prefill lengths for the layer timeline")
    args = ap.parse_args()
    from kimi_linear_kernels.mla_prefill import mla_prefill

    gen = torch.Generator(device="cuda").manual_seed(0)
    import triton

    report = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "triton": triton.__version__,
              "card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "lengths": {}}  # fmt: skip
    print(f"{report['card']}, torch {report['torch']}, cuDNN {report['cudnn']}, triton {report['triton']}", flush=True)
    scale = DQ**-0.5
    compile_s = {}
    for T in args.lengths:
        q, k, v = inputs(T, gen)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        row = {"cudnn_ms": gpu_ms(lambda a=(q, k, v): F.scaled_dot_product_attention(*a, is_causal=True, scale=scale))}
        flops = T * T * H * (DQ + DV)  # causal: half of 2 * T^2 * H * (DQ + DV)
        for setting in SETTINGS:
            key = name(setting)
            run = lambda a=(q, k, v), c=setting: mla_prefill(*a, scale, *c)  # noqa: E731
            try:
                first = host_s(run)
            except Exception as e:  # noqa: BLE001 - a setting that does not fit the card is reported, not fatal
                row[key] = {"error": repr(e)[:300]}
                continue
            compile_s.setdefault(key, first)
            err = ((run().float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            ms = gpu_ms(run)
            row[key] = {"ms": ms, "x_cudnn": ms / row["cudnn_ms"], "tflops": flops / ms / 1e9, "rel_err": err}
        report["lengths"][T] = row
        cells = "  ".join(f"{k} {r['ms']:.2f} ({r['x_cudnn']:.2f}x)" if "ms" in r else f"{k} error"
                          for k, r in row.items() if k != "cudnn_ms")  # fmt: skip
        print(
            f"T={T}: cudnn {row['cudnn_ms']:.2f} ms ({flops / row['cudnn_ms'] / 1e9:.0f} TFLOP/s); {cells}", flush=True
        )
        del q, k, v, ref
    if args.lengths:
        report.update(new_lengths(args, report["lengths"], compile_s, mla_prefill, gen, scale))
    if args.model:
        report["timeline"] = timeline(args.model)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "probe_mla_prefill.json").write_text(json.dumps(report, indent=1))


def new_lengths(args, rows, compile_s, mla_prefill, gen, scale):
    """The fastest setting over args.lengths, then its first call at lengths not seen against warm."""
    report = {"first_call_s": compile_s}
    print("first call (compile) s: " + ", ".join(f"{k} {v:.2f}" for k, v in compile_s.items()), flush=True)
    ok = {k: statistics.mean(rows[T][k]["x_cudnn"] for T in args.lengths)
          for k in compile_s if all("ms" in rows[T].get(k, {}) for T in args.lengths)}  # fmt: skip
    best = min(ok, key=ok.get)
    setting = next(s for s in SETTINGS if name(s) == best)
    report["best"] = best
    report["new_lengths"] = {}
    for T in args.new_lengths:
        q, k, v = inputs(T, gen)
        run = lambda a=(q, k, v): mla_prefill(*a, scale, *setting)  # noqa: E731
        first = host_s(run)
        warm = statistics.median(host_s(run) for _ in range(3))
        report["new_lengths"][T] = {"first_s": first, "warm_s": warm}
        print(f"new length {T} ({best}): first {first * 1e3:.2f} ms, warm {warm * 1e3:.2f} ms", flush=True)
        del q, k, v
    return report


if __name__ == "__main__":
    main()
