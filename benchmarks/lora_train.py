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
this repo alone: the cost of training every expert's adapter; `ours` trains as finetune/lora.py does: PEFT's layers
with the adapter products fused and each step replayed from a CUDA graph (finetune/train_step.py; its first step
runs eagerly, its second is captured); `ours-eager` the same without the graph, `ours-peft` also with PEFT's own
forward), AdamW on the adapters,
batches of --batch x --seq-len random tokens, loss over every position. --warmup steps first (the first one
includes compilation and fla's autotuning, reported separately), then --rounds rounds of --steps timed steps, the
implementations taking turns (all stay in memory), so a card whose speed drifts moves them alike: tokens/s from the
median step over all rounds, the ratio per round, seconds per step, each implementation's own peak memory.
Writes lora_train.json and lora_train.png and prints a table.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kimi_linear_finetune.train_step import TrainStep
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


class Trainer:
    """One implementation with PEFT LoRA and AdamW, ready to take timed training steps."""

    def __init__(self, impl, args, config, dtype, device):
        import peft

        self.impl, self.device = impl, device
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        model = build(impl, config, dtype, device)
        targets = TARGETS + (["w1", "w2", "w3"] if impl == "ours+experts" else [])  # w1/w2/w3: the routed experts
        lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, task_type="CAUSAL_LM")
        self.model = peft.get_peft_model(model, lora)
        fused = impl in ("ours", "ours-eager", "ours+experts")
        if fused:  # as train_lora does: the adapter products fused where they serve
            from kimi_linear_finetune.fast_lora import fuse_lora, fused_layers

            fuse_lora(self.model)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        graphed = device == "cuda" and impl in ("ours", "ours+experts")  # as train_lora does on one GPU
        self.runner = TrainStep(self.model, self.opt, cuda_graph=graphed)
        gen = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(3, config["vocab_size"], (args.batch, args.seq_len), device=device, generator=gen)
        self.batch = {"input_ids": ids, "labels": ids}
        self.row = {
            "impl": impl,
            "trainable_parameters": sum(p.numel() for p in self.params),
            "adapted_modules": sum(
                1 for _, m in self.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
            ),
        }
        if fused:
            self.row["fused_layers"] = fused_layers(self.model)  # of adapted_modules, the rest on PEFT's forward
        self.times, self.host_times = [], []
        if device == "cuda":  # this implementation's own peak: the other models' tensors sit still meanwhile
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup):
            t, _, loss = self.timed()
            self.row.setdefault("first_step_s", t)
            print(f"[{impl}] warm-up step {i + 1}: {t:.3f} s, loss {loss:.4f}", flush=True)
        if device == "cuda":
            self.row["peak_memory_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9

    def step(self):
        return self.runner(self.batch)[0]

    def timed(self):
        """(seconds, host seconds, loss) of one step. The host's share is the time until every launch of the step
        was issued (the GPU may still be working): close to the step's time, the step waits on Python and launches,
        not on the GPU."""
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = self.step()
        host = time.perf_counter() - start
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, host, float(loss)

    def round(self, steps):
        """`steps` timed steps; returns their median seconds."""
        times, hosts, _ = zip(*(self.timed() for _ in range(steps)))
        self.times += times
        self.host_times += hosts
        return _median(times)

    def host_checks(self, steps):
        """Two checks on where a step's time goes besides the GPU: the host syncs one step makes (CUDA's sync debug
        mode: each would stall the launch queue), and the median of `steps` steps with Python's garbage collector
        paused (its pauses land inside steps at random)."""
        import gc
        import warnings

        if self.device != "cuda":
            return
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        # each synchronizing call warns "called a synchronizing CUDA operation"; the mode's one-time notice that it
        # is a prototype does not count
        syncs = [str(w.message).splitlines()[0][:160] for w in caught if "called a synchronizing" in str(w.message)]
        gc.collect()
        gc.disable()
        try:
            paused = _median([self.timed()[0] for _ in range(steps)])
        finally:
            gc.enable()
        self.row.update(host_syncs_per_step=len(syncs), host_sync_examples=syncs[:5], median_step_gc_paused_s=paused)
        print(f"[{self.impl}] host syncs in one step: {len(syncs)} {syncs[:3]}; median step with the garbage "
              f"collector paused: {paused:.3f} s", flush=True)  # fmt: skip

    def result(self, args):
        per_step = _median(self.times)
        self.row.update(median_step_s=per_step, tokens_per_s=args.batch * args.seq_len / per_step,
                        step_times_s=self.times, median_host_s=_median(self.host_times))  # fmt: skip
        if self.runner.cuda_graph:
            self.row.update(graph_replays=self.runner.replayed, eager_steps=self.runner.eager,
                            graph_error=self.runner.graph_error)  # fmt: skip
        self.row.setdefault("peak_memory_gb", None)
        return self.row


def _median(values):
    return sorted(values)[len(values) // 2]


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


def host_profile(step, top, steps=3):
    """Where the host's time goes in `steps` more training steps: Python's cProfile, the `top` functions by their own
    time (itself slows Python down, so the shares matter, not the totals), printed and returned."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    prof.disable()
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())
    rows = sorted(((f"{Path(f).name}:{line} {fn}", v[2] / steps, v[1] / steps) for (f, line, fn), v in
                   stats.stats.items()), key=lambda r: -r[1])[:top]  # fmt: skip
    print(f"  host (cProfile): {total / steps * 1e3:.1f} ms of Python per step; own time per step:")
    for name, t, calls in rows:
        print(f"  {t * 1e3:8.2f} ms  x{calls:7.0f}  {name[:110]}")
    return {"total_ms_per_step": total / steps * 1e3, "top": [{"name": n, "ms": t * 1e3, "calls": c}
                                                               for n, t, c in rows]}  # fmt: skip


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "tokens_per_s" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(
        [r["impl"] for r in rows], [r["tokens_per_s"] for r in rows], color=[f"C{i}" for i in range(len(rows))]
    )
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
        choices=["ours", "ours-eager", "ours-peft", "builtin", "ours+experts"],
        help="ours: this repo as finetune/lora.py trains it (the adapter products fused, fast_lora.py, each step "
        "replayed from a CUDA graph, train_step.py); ours-eager: without the graph; ours-peft: also with PEFT's own "
        "LoRA forward; ours+experts: also every routed expert's w1/w2/w3 (the "
        "built-in model's fused experts take no PEFT adapter) (default: %(default)s)",
    )
    ap.add_argument("--seq-len", type=int, default=4096, help="(default: %(default)s)")
    ap.add_argument("--batch", type=int, default=1, help="(default: %(default)s)")
    ap.add_argument("--rank", type=int, default=16, help="(default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="(default: %(default)s)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round (default: %(default)s)")
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds, the implementations taking turns (default: %(default)s)"
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the timed steps, profile 3 more and list the N costliest kernels, then 3 more under cProfile and "
        "the N Python functions with the most own time (default: off)",
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
    # Every implementation is built and warmed up first (all stay in memory), then timed in --rounds rounds of
    # --steps steps each, the implementations taking turns: a card whose speed drifts over minutes (clocks,
    # neighbours) moves every implementation alike, and each round gives its own ratio.
    trainers, rows = [], {}
    for impl in args.impls:
        try:
            trainers.append(Trainer(impl, args, config, dtype, args.device))
        except Exception as err:  # e.g. the built-in class missing from this transformers, or out of memory
            print(f"[{impl}] failed: {type(err).__name__}: {err}", flush=True)
            rows[impl] = {"impl": impl, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    rounds = []
    for r in range(args.rounds):
        medians = {t.impl: t.round(args.steps) for t in trainers}
        rounds.append(medians)
        print(f"round {r + 1}: " + "  ".join(f"{k} {v:.3f} s/step" for k, v in medians.items()), flush=True)
    for t in trainers:
        t.host_checks(args.steps)
    for t in trainers:
        rows[t.impl] = t.result(args)
        if args.profile:
            print(f"[{t.impl}] profile:", flush=True)
            rows[t.impl]["profile_top"] = profile_steps(t.step, args, args.device)
            rows[t.impl]["host_profile"] = host_profile(t.step, args.profile)
    report["rows"] = [rows[impl] for impl in args.impls]
    report["rounds_s_per_step"] = rounds
    if "ours" in rows and "builtin" in rows and "tokens_per_s" in rows["ours"] and "tokens_per_s" in rows["builtin"]:
        report["speedup"] = rows["ours"]["tokens_per_s"] / rows["builtin"]["tokens_per_s"]
        report["speedup_per_round"] = [r["builtin"] / r["ours"] for r in rounds]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "lora_train.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out_dir / "lora_train.png")
    record_if_tuned(args.out_dir, "lora")
    base = rows.get("builtin", {}).get("tokens_per_s")
    print(f"\n{'impl':13s} {'tokens/s':>10s} {'s/step':>8s} {'host s':>7s} {'first step s':>13s} {'peak GB':>8s}"
          f" {'x built-in':>10s}")  # fmt: skip
    for r in report["rows"]:
        if "tokens_per_s" in r:
            peak = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
            cells = f"{r['tokens_per_s']:10.0f} {r['median_step_s']:8.3f} {r['median_host_s']:7.3f}"
            cells += f" {r['first_step_s']:13.1f} {peak:>8s} {r['tokens_per_s'] / base if base else float('nan'):10.2f}"
            print(f"{r['impl']:13s} {cells}")
        else:
            print(f"{r['impl']:13s} {r['error']}")
    if "speedup" in report:
        per_round = ", ".join(f"{x:.2f}x" for x in report["speedup_per_round"])
        print(f"ours / built-in: {report['speedup']:.2f}x (median step over all rounds; per round {per_round})")
    print(f"wrote {args.out_dir / 'lora_train.json'} and lora_train.png")


if __name__ == "__main__":
    main()
