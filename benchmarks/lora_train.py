"""LoRA training throughput: this repo's Kimi Linear against transformers' built-in Kimi Linear (with fla-core
installed, so its KDA runs fla's kernels), both with PEFT LoRA of the same configuration, on the same model config.

    python benchmarks/lora_train.py --out-dir benchmarks/results                      # a CUDA machine with fla-core
    python benchmarks/lora_train.py --device cpu --config conversion/configs/tiny.json --seq-len 64 --steps 2 \\
        --impls ours --out-dir /tmp/lora-smoke                                          # a smoke run on CPU

Each implementation gets a model with random weights (bf16 on CUDA, float32 on CPU) built from --config
(default benchmarks/configs/bench_1b_hybrid.json), LoRA rank --rank on the nn.Linear projections both
implementations name alike (KDA q/k/v/o, the forget-gate and output-gate low-rank pairs, b_proj; MLA q_proj,
kv_a_proj_with_mqa, kv_b_proj, o_proj; dense MLP and shared experts; the built-in model keeps its routed experts in
fused 3-D parameters that PEFT cannot wrap, so routed experts are left out for both; `ours+experts` adds them for
this repo alone: the cost of training every expert's adapter), AdamW on the adapters,
batches of --batch x --seq-len random tokens, loss over every position. --warmup steps first (the first one
includes compilation and fla's autotuning, reported separately), then --steps timed steps: tokens/s, seconds per
step, peak memory. Writes lora_train.json and lora_train.png and prints a table.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kimi_linear_kernels.tuned import record_if_tuned

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "f_a_proj", "f_b_proj", "g_a_proj", "g_b_proj", "b_proj",
           "kv_a_proj_with_mqa", "kv_b_proj", "gate_proj", "up_proj", "down_proj"]  # fmt: skip


def build(impl, config, dtype, device):
    torch.manual_seed(0)
    if impl.startswith("ours"):
        from kimi_linear.configuration_kimi_linear import KimiLinearConfig
        from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM
    else:
        from transformers import KimiLinearConfig, KimiLinearForCausalLM
    with torch.device(device):
        return KimiLinearForCausalLM(KimiLinearConfig(**config)).to(dtype)


def run(impl, args, config, dtype, device):
    import peft

    model = build(impl, config, dtype, device)
    targets = TARGETS + (["w1", "w2", "w3"] if impl == "ours+experts" else [])  # w1/w2/w3: the routed experts
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(3, config["vocab_size"], (args.batch, args.seq_len), device=device, generator=gen)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
        print(f"[{impl}] step {i + 1}: {times[-1]:.3f} s, loss {loss:.4f}", flush=True)
    timed = times[args.warmup :]
    per_step = sorted(timed)[len(timed) // 2]
    top = profile_steps(step, args, device) if args.profile else None
    row = {
        "impl": impl,
        "trainable_parameters": sum(p.numel() for p in params),
        "adapted_modules": sum(1 for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)),
        "first_step_s": times[0],
        "median_step_s": per_step,
        "tokens_per_s": args.batch * args.seq_len / per_step,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
    }
    if top is not None:
        row["profile_top"] = top
    return row


def profile_steps(step, args, device, steps=3):
    """The kernels of `steps` more training steps by time per step (torch.profiler), printed and returned."""
    from profile_decode import kernel_table
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    table = kernel_table(prof, steps, torch.device(device))
    busy = sum(t for t, _ in table.values())
    print(f"  kernels per step: {sum(n for _, n in table.values()):.0f}, {busy / 1e3:.1f} ms of kernel time")
    top = sorted(table.items(), key=lambda kv: -kv[1][0])[: args.profile]
    for name, (us, calls) in top:
        print(f"  {us / 1e3:8.2f} ms  x{calls:6.1f}  {name[:110]}")
    return [{"name": n, "us": t, "calls": c} for n, (t, c) in top]


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "tokens_per_s" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar([r["impl"] for r in rows], [r["tokens_per_s"] for r in rows], color=["C0", "C1"][: len(rows)])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("training tokens / s (LoRA, median step)")
    m = report["metadata"]
    ax.set_title(f"{report['config']} seq {report['seq_len']} x {report['batch']} | {m.get('card', 'cpu')} | "
                 f"{m['date_utc'][:10]}", fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=HERE / "configs" / "bench_1b_hybrid.json")
    ap.add_argument(
        "--impls",
        nargs="+",
        default=["ours", "builtin", "ours+experts"],
        choices=["ours", "builtin", "ours+experts"],
        help="ours+experts: also every routed expert's w1/w2/w3 (grouped LoRA; the built-in model's "
        "fused experts take no PEFT adapter) (default: %(default)s)",
    )
    ap.add_argument("--seq-len", type=int, default=4096, help="(default: %(default)s)")
    ap.add_argument("--batch", type=int, default=1, help="(default: %(default)s)")
    ap.add_argument("--rank", type=int, default=16, help="(default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="(default: %(default)s)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (default: %(default)s)")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the timed steps, profile 3 more and list the N costliest kernels (default: off)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results", help="(default: %(default)s)")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from decode_gpu import metadata  # card (or CPU), versions, date, commit: the same record on either device

    meta = metadata(torch.device(args.device))
    config = json.loads(args.config.read_text())
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    report = {"metadata": meta, "config": args.config.name, "seq_len": args.seq_len, "batch": args.batch,
              "rank": args.rank, "targets": TARGETS, "rows": []}  # fmt: skip
    for impl in args.impls:
        try:
            report["rows"].append(run(impl, args, config, dtype, args.device))
            if args.device == "cuda":
                torch.cuda.empty_cache()
        except Exception as err:  # e.g. the built-in class missing from this transformers, or out of memory
            print(f"[{impl}] failed: {type(err).__name__}: {err}", flush=True)
            report["rows"].append({"impl": impl, "error": f"{type(err).__name__}: {str(err)[:300]}"})
    rows = {r["impl"]: r for r in report["rows"] if "tokens_per_s" in r}
    if "ours" in rows and "builtin" in rows:
        report["speedup"] = rows["ours"]["tokens_per_s"] / rows["builtin"]["tokens_per_s"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "lora_train.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out_dir / "lora_train.png")
    record_if_tuned(args.out_dir, "lora")
    print(f"\n{'impl':13s} {'tokens/s':>10s} {'s/step':>8s} {'first step s':>13s} {'peak GB':>8s}")
    for r in report["rows"]:
        if "tokens_per_s" in r:
            peak = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
            cells = f"{r['tokens_per_s']:10.0f} {r['median_step_s']:8.3f} {r['first_step_s']:13.1f} {peak:>8s}"
            print(f"{r['impl']:13s} {cells}")
        else:
            print(f"{r['impl']:13s} {r['error']}")
    if "speedup" in report:
        print(f"ours / built-in: {report['speedup']:.2f}x")
    print(f"wrote {args.out_dir / 'lora_train.json'} and lora_train.png")


if __name__ == "__main__":
    main()
