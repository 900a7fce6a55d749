"""LoRA fine-tuning on one GPU against several: finetune/lora.py run as one process, data parallel over --nproc
processes and sharded over them (--fsdp), with the same checkpoint, data, global batch and steps.

    python benchmarks/lora_scaling.py --out-dir benchmarks/results      # 2 GPUs (bash .ci/gpu lora-scaling)
    python benchmarks/lora_scaling.py --device cpu --config conversion/configs/tiny.json --seq-len 64 \\
        --global-batch 4 --steps 6 --out-dir /tmp/scaling                   # a smoke run on CPU (gloo)

A random checkpoint of --config (conversion/random_checkpoint.py, bf16 on CUDA, its byte-level tokenizer) and a
jsonl of documents (--corpus: a text file, one document per blank-line-separated paragraph; without it, seeded
pseudo-text) are written to a temporary folder; each mode then runs as its own command (torchrun for several
processes, the way `accelerate launch` sets them up) with --pack, rows of --seq-len tokens, LoRA rank --rank on
--targets. Per mode: tokens/s over all processes and seconds per step (median step after the first; the mean and
every step's seconds in the JSON), peak memory of the first process, the loss
curve, and its largest relative distance from the one-process curve (the processes average over their own tokens,
so the curves agree up to how the tokens split; the run's loss must fall). Writes lora_scaling.json and
lora_scaling.png (loss curves, tokens/s) to --out-dir and prints a table.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode_gpu import metadata  # noqa: E402

WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but "
    "have an had they you were their one all we can her has there been if more when will would who"
).split()


def documents(corpus, tokens_wanted, seed=0):
    """Paragraphs of --corpus, or seeded pseudo-text, until about tokens_wanted bytes (byte-level tokenizer)."""
    if corpus is not None:
        paragraphs = [p.strip() for p in Path(corpus).read_text(errors="replace").split("\n\n") if p.strip()]
    else:
        rng = random.Random(seed)
        paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400))) for _ in range(4096)]
    docs, size, i = [], 0, 0
    while size < tokens_wanted:
        docs.append(paragraphs[i % len(paragraphs)])
        size += len(docs[-1].encode()) + 1
        i += 1
    return docs


def run_mode(mode, args, ckpt, data, work):
    out = work / mode
    cmd = ["-m", "kimi_linear_finetune.lora", "--model", str(ckpt), "--data", str(data), "--out", str(out),
           "--pack", "--max-length", str(args.seq_len), "--batch-size", str(args.global_batch),
           "--steps", str(args.steps), "--rank", str(args.rank), "--targets", args.targets, "--lr", "1e-3",
           "--no-progress", "--seed", "0"]  # fmt: skip
    if args.device == "cpu":
        cmd += ["--device", "cpu", "--dtype", "float32"]
    if mode == "single":
        cmd = [sys.executable, *cmd]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc), *cmd]
        cmd += ["--fsdp"] if mode == "fsdp" else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", NCCL_NVLS_ENABLE="0")
    if args.device == "cpu":
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env)  # output streams through
    if proc.returncode != 0:
        return {"mode": mode, "status": f"failed ({proc.returncode})"}
    log = json.loads((out / "train_log.json").read_text())
    losses = [e["loss"] for e in log["log"]]
    timed = log["log"][1:] or log["log"]  # the first step compiles
    seconds = sorted(e["seconds"] for e in timed)
    median = seconds[len(seconds) // 2]  # later steps can still compile (new shapes): the median, not the mean
    tokens = sum(e["tokens"] for e in timed) / len(timed)
    return {"mode": mode, "status": "ok", "processes": log["processes"], "fsdp": log["fsdp"],
            "tokens_per_s": tokens / median, "s_per_step": median, "mean_s_per_step": sum(seconds) / len(seconds),
            "step_seconds": [e["seconds"] for e in log["log"]], "first_step_s": log["log"][0]["seconds"],
            "peak_memory_gb": log.get("peak_memory_gb"), "losses": losses,
            "wall_s": time.perf_counter() - start}  # fmt: skip


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    ok = [r for r in report["modes"] if r["status"] == "ok"]
    for r in ok:
        a.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{r['mode']} ({r['processes']} proc.)")
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.legend()
    bars = b.bar([r["mode"] for r in ok], [r["tokens_per_s"] for r in ok])
    b.bar_label(bars, fmt="%.0f")
    b.set_ylabel("tokens/s (all processes)")
    meta = report["metadata"]
    fig.suptitle(f"LoRA, {report['config']}, seq {report['seq_len']}, global batch {report['global_batch']} | "
                 f"{meta['card']} | torch {meta['torch']} | {meta['date_utc'][:10]} | {meta['git_commit']}",
                 fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=HERE / "configs" / "bench_1b_hybrid.json")
    ap.add_argument("--modes", nargs="+", default=["single", "ddp", "fsdp"], choices=["single", "ddp", "fsdp"])
    ap.add_argument("--nproc", type=int, default=2, help="processes for ddp and fsdp (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, default=4096, help="(default: %(default)s)")
    ap.add_argument(
        "--global-batch", type=int, default=8, help="rows per step over all processes (default: %(default)s)"
    )
    ap.add_argument("--steps", type=int, default=30, help="(default: %(default)s)")
    ap.add_argument("--rank", type=int, default=16, help="(default: %(default)s)")
    ap.add_argument("--targets", default="kda,mla,mlp,shared", help="LoRA presets (default: %(default)s)")
    ap.add_argument("--corpus", type=Path, help="a text file of paragraphs (default: seeded pseudo-text)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results", help="(default: %(default)s)")
    args = ap.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc and set(args.modes) - {"single"}:
        ap.error(f"--nproc {args.nproc} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    from kimi_linear_conversion.random_checkpoint import make_random_checkpoint

    work = Path(tempfile.mkdtemp(prefix="lora-scaling-"))
    ckpt = make_random_checkpoint(
        str(args.config), work / "ckpt", dtype="bfloat16" if args.device == "cuda" else "float32"
    )
    data = work / "train.jsonl"
    docs = documents(args.corpus, args.steps * args.global_batch * args.seq_len * 1.2)
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    report = {"metadata": metadata(torch.device(args.device)), "config": args.config.name, "seq_len": args.seq_len,
              "global_batch": args.global_batch, "steps": args.steps, "rank": args.rank, "targets": args.targets,
              "nproc": args.nproc, "modes": []}  # fmt: skip
    for mode in args.modes:
        print(f"=== {mode} ===", flush=True)
        report["modes"].append(run_mode(mode, args, ckpt, data, work))
    ref = next((r["losses"] for r in report["modes"] if r["mode"] == "single" and r["status"] == "ok"), None)
    print(f"\n{'mode':8s} {'procs':>5s} {'tokens/s':>10s} {'s/step':>8s} {'first s':>8s} {'peak GB':>8s} "
          f"{'loss first->last':>18s} {'max rel. dist. to single':>25s}")  # fmt: skip
    for r in report["modes"]:
        if r["status"] != "ok":
            print(f"{r['mode']:8s} {r['status']}")
            continue
        if ref is not None:
            r["max_rel_dist_to_single"] = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], ref))
        peak = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        print(f"{r['mode']:8s} {r['processes']:5d} {r['tokens_per_s']:10.0f} {r['s_per_step']:8.3f} "
              f"{r['first_step_s']:8.1f} {peak:>8s} {r['losses'][0]:8.4f}->{r['losses'][-1]:<8.4f} "
              f"{r.get('max_rel_dist_to_single', float('nan')):25.4f}")  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "lora_scaling.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out_dir / "lora_scaling.png")
    print(f"wrote {args.out_dir / 'lora_scaling.json'} and lora_scaling.png")


if __name__ == "__main__":
    main()
