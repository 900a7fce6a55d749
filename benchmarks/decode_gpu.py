"""Decode speed of the whole model: time per output token (TPOT) against context length, eager and from a CUDA graph,
for the hybrid and its all-MLA twin, next to transformers' built-in Kimi Linear and to the memory-bandwidth floor.

    python benchmarks/decode_gpu.py --out-dir benchmarks/results          # on a CUDA machine (~6 min on an H100)
    python benchmarks/decode_gpu.py --device cpu --configs conversion/configs/tiny.json --contexts 64 128  # smoke test

Models: benchmarks/configs/bench_1b_hybrid.json (6 KDA + 2 MLA layers, MoE 16 experts top-4 + shared expert) and
bench_1b_all_mla.json (the same with every layer MLA), random weights, --dtype (bfloat16). For each batch size in
--batches and context in --contexts:
  hybrid eager         ours, the default cache (KimiLinearCache), every decode step launched op by op
  hybrid cuda_graph    ours, KimiLinearStaticCache: the decode step captured once in a CUDA graph and replayed
  all-MLA cuda_graph   the all-MLA twin, the same way
  builtin eager        transformers' built-in KimiLinearForCausalLM (>= 5.17) on the hybrid config, its own cache
                       (needs fla-core on CUDA; a real prefill only, up to --builtin-max tokens)
  <config> floor       bytes one decode step must move / the card's copy bandwidth, measured in the same run: the
                       embedding rows, every attention, norm and dense weight, the router and shared expert, the
                       routed experts the batch is expected to touch under uniform routing (E (1 - (1 - k/E)^B) per
                       MoE layer), lm_head; KDA conv windows and float32 states read and written; MLA latents read.
The context comes from a real prefill (chunks of --prefill-chunk tokens, logits of the last token only) up to
--prefill-max tokens; beyond that the cache is filled with random values of the right shapes and dtypes instead (a
prefill of a million tokens takes minutes and changes nothing in the decode step but the values it reads). Our eager
variant decodes on the same cache tensors as the graph variant, after it. TPOT: --steps greedy steps after --warmup
untimed ones (the first graph step captures), wall time between device synchronisations, divided by the steps.
--left-pad F: a batch of prompts of different lengths, padded on the left: row b of B starts with
round(F * context * (b + 1) / B) padded tokens, carried in the attention mask of the prefill (or the random fill) and
of every decode step of ours (not the built-in model's; the bytes floor still counts the whole context).
A size that does not fit the card is reported as OOM. Also reported: cache bytes per token of context (per sequence),
hybrid against all-MLA. With a cold Triton cache the first prefill also pays fla's compilation and autotuning (about a
minute per kernel set, once for ours and once for the built-in model); `--prefill-max 0` fills every context with
random values and skips it, `--no-builtin` skips the built-in model.

Writes decode_gpu.json (rows, card, versions, date, commit) and decode_gpu.png (TPOT vs context, log-log) to --out-dir
and prints a table.
"""

import argparse
import datetime
import importlib.metadata as md
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kimi_linear.configuration_kimi_linear import KDA, KimiLinearConfig
from kimi_linear.modeling_kimi_linear import (
    KDAStaticLayerState,
    KimiLinearCache,
    KimiLinearForCausalLM,
    KimiLinearStaticCache,
    KimiMLAAttention,
)
from kimi_linear_kernels.tuned import record_if_tuned

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "benchmarks" / "configs" / f"bench_1b_{name}.json" for name in ("hybrid", "all_mla")]


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def git_commit():
    """The commit the numbers come from: KIMI_COMMIT first (the device machine's copy of the tree may carry a stale
    .git; .ci/gpu passes it in), else git's HEAD, else None. The GPU benchmarks' one source for it."""
    commit = os.environ.get("KIMI_COMMIT")
    if commit:
        return commit
    try:
        git = ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]
        return subprocess.run(git, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def metadata(device):
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "card": card,
        "device": str(device),
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "fla-core": version("fla-core"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
    }


def save_atomically(path, write):
    """write(tmp) to a temporary file beside path, then rename it onto path: a reader never finds it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def save_json(path, data):
    save_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def save_png(fig, path, dpi=110):
    save_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device):
    """Bytes read + written per second by a large device-to-device copy (the floor's unit)."""
    n = 2**28 if device.type == "cuda" else 2**24  # 1 GiB / 64 MiB of float32
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n * 4 / sorted(times)[len(times) // 2]


def expected_experts(E, k, B):
    """Distinct experts B tokens touch when each picks k of E uniformly at random."""
    return E * (1 - (1 - k / E) ** B)


def step_bytes(model, config, B, context, dtype):
    """Bytes one decode step of B sequences at this context must read or write (see the module docstring)."""
    size = torch.tensor([], dtype=dtype).element_size()
    weights, experts = 0, 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            experts += p.numel() * p.element_size()
        elif "embed_tokens" in name:
            weights += B * p.shape[1] * p.element_size()
        else:
            weights += p.numel() * p.element_size()
    moe_layers = config.mlp_types.count("moe")
    E, k = config.num_experts, config.num_experts_per_token
    per_expert = experts / max(1, moe_layers * E)
    weights += moe_layers * expected_experts(E, k, B) * per_expert
    H, K, W = config.kda_num_heads, config.kda_head_dim, config.kda_conv_size
    n_kda = config.layer_types.count(KDA)
    n_mla = len(config.layer_types) - n_kda
    width = config.kv_lora_rank + config.qk_rope_head_dim
    kda = n_kda * B * 2 * (H * K * K * 4 + 3 * H * K * (W - 1) * size)  # read + written
    mla = n_mla * B * (context + 1) * width * size  # read (one slot written)
    return weights + kda + mla


def cache_bytes_per_token(config, context, dtype):
    """Cache bytes per token of context, per sequence: MLA latents plus the KDA states spread over the context."""
    size = torch.tensor([], dtype=dtype).element_size()
    H, K, W = config.kda_num_heads, config.kda_head_dim, config.kda_conv_size
    n_kda = config.layer_types.count(KDA)
    n_mla = len(config.layer_types) - n_kda
    kda = n_kda * (H * K * K * 4 + 3 * H * K * (W - 1) * size)
    return n_mla * (config.kv_lora_rank + config.qk_rope_head_dim) * size + kda / context


def left_padding(B, context, fraction, device):
    """The attention mask [B, context] of --left-pad (see the module docstring), or None for no padding."""
    if not fraction:
        return None
    lead = torch.tensor([round(fraction * context * (b + 1) / B) for b in range(B)], device=device)
    return (torch.arange(context, device=device) >= lead[:, None]).long()


def fill(model, cache, B, context, args, device, mask=None):
    """Bring the cache to `context` tokens: a real prefill up to --prefill-max, random values beyond; mask: the
    prompts' left padding, or None."""
    if context <= args.prefill_max:
        ids = torch.randint(3, model.config.vocab_size, (B, context), device=device)
        for i in range(0, context, args.prefill_chunk):
            part = None if mask is None else mask[:, : i + args.prefill_chunk]
            model(ids[:, i : i + args.prefill_chunk], attention_mask=part, cache=cache, logits_to_keep=1)
        return "prefill"
    gen = torch.Generator(device=device).manual_seed(0)
    for layer in cache.layers:
        if isinstance(layer, KDAStaticLayerState):
            for window in layer.conv:
                window.normal_(generator=gen)
            layer.recurrent.normal_(0, 0.1, generator=gen)
        else:
            layer.buffer[:, :context].normal_(generator=gen)
    cache.record_prefill(context, None if mask is None else mask.bool())
    return "random"


def growing_view(static, config):
    """A KimiLinearCache on the static cache's tensors at its current length (room to grow without reallocating)."""
    cache = KimiLinearCache(config)
    for mine, theirs in zip(cache.layers, static.layers):
        if isinstance(theirs, KDAStaticLayerState):
            mine.conv, mine.recurrent = theirs.conv, theirs.recurrent
        else:
            mine.buffer = theirs.buffer
        mine.seen = theirs.seen
    return cache


def tpot_ms(model, cache, nxt, args, device, kwarg="cache", mask=None):
    """Milliseconds per greedy decode step; returns (ms, the cache after the steps). mask: the attention mask of the
    cached tokens, or None; each step passes it with a column of ones more (as generate() does)."""

    def step(cache, nxt, mask):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = model(nxt, **{kwarg: cache}, attention_mask=mask, use_cache=True)
        return out_cache(out, cache), out.logits[:, -1:].argmax(-1), mask

    for _ in range(args.warmup):
        cache, nxt, mask = step(cache, nxt, mask)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        cache, nxt, mask = step(cache, nxt, mask)
    sync(device)
    return (time.perf_counter() - start) / args.steps * 1e3, cache


def out_cache(out, fallback):
    got = out.get("cache")  # transformers >= 5.24; before, past_key_values
    got = got if got is not None else out.get("past_key_values")
    return got if got is not None else fallback


def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_ours(model, config, label, B, context, args, device, dtype):
    variants = ["cuda_graph", "eager"] if label == "hybrid" else ["cuda_graph"]
    rows = {v: dict(variant=f"{label} {v}", batch=B, context=context) for v in variants}
    length = context + 2 * (args.warmup + args.steps) + 2
    cache = None
    try:
        cache = KimiLinearStaticCache(config, max_length=length, batch_size=B, dtype=dtype, device=device)
        mask = left_padding(B, context, args.left_pad, device)
        how = fill(model, cache, B, context, args, device, mask)
        nxt = torch.randint(3, config.vocab_size, (B, 1), device=device)
        for v in variants:
            rows[v]["fill"] = how
            try:
                use = cache if v == "cuda_graph" else growing_view(cache, config)
                held = None if mask is None else torch.cat([mask, mask.new_ones(B, use.get_seq_length() - context)], 1)
                rows[v]["tpot_ms"], _ = tpot_ms(model, use, nxt, args, device, mask=held)
                rows[v]["decode_mode"] = cache.decode_mode if v == "cuda_graph" else "eager (KimiLinearCache)"
                rows[v]["status"] = "ok"
            except torch.OutOfMemoryError:
                rows[v]["status"] = "OOM"
            free(device)
        if cache.get_seq_length():  # what the cache holds, per token and sequence, after the graph variant's steps
            row = rows[variants[0]]
            row["cache_tokens"] = cache.get_seq_length()
            row["cache_bytes_per_token_measured"] = cache.nbytes()["total"] / (B * cache.get_seq_length())
    except torch.OutOfMemoryError:
        for row in rows.values():
            row.setdefault("status", "OOM")
    finally:
        del cache
        free(device)
    return list(rows.values())


def builtin_obstacle(device):
    import transformers

    if getattr(transformers, "KimiLinearForCausalLM", None) is None:
        return f"transformers {transformers.__version__} has no built-in KimiLinearForCausalLM (>= 5.17)"
    try:
        import fla  # noqa: F401

        fla_ok = True
    except ImportError:
        fla_ok = False
    if device.type == "cuda" and not fla_ok:
        return "the built-in model needs fla-core on CUDA"
    if device.type != "cuda" and fla_ok:
        return "fla-core is importable: the built-in model would send CPU tensors to Triton"
    return None


def load_builtin(config_path, device, dtype):
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        cfg = json.loads(Path(config_path).read_text())
        cfg.pop("auto_map", None)
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        config = transformers.AutoConfig.from_pretrained(tmp)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.KimiLinearForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def measure_builtin(model, B, context, args, device):
    row = dict(variant="builtin eager", batch=B, context=context, fill="prefill", decode_mode="eager (built-in)")
    if context > args.builtin_max:
        row["status"] = f"skipped (context > --builtin-max {args.builtin_max})"
        return row
    kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    try:
        ids = torch.randint(3, model.config.vocab_size, (B, context), device=device)
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, nxt = out_cache(out, None), out.logits[:, -1:].argmax(-1)
        del out
        row["tpot_ms"], _ = tpot_ms(model, cache, nxt, args, device, kwarg=kwarg)
        row["status"] = "ok"
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as err:  # noqa: BLE001 - a failing reference is recorded, not fatal
        row["status"] = f"error ({type(err).__name__}: {str(err)[:200]})"
    free(device)
    return row


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, B in zip(axes[0], batches):
        variants = dict.fromkeys(r["variant"] for r in result["rows"] if r["batch"] == B)
        for v in variants:
            pts = [
                (r["context"], r["tpot_ms"])
                for r in result["rows"]
                if r["variant"] == v and r["batch"] == B and r.get("tpot_ms") is not None
            ]
            if pts:
                style = "--" if v.endswith("floor") else "o-"
                ax.plot(*zip(*pts), style, label=v)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="context (tokens)",
            ylabel="time per output token (ms)",
            title=f"batch {B}",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    meta = result["meta"]
    pad = result["args"].get("left_pad")
    pad = f", left padding up to {pad:.0%} of the context" if pad else ""
    fig.suptitle(f"Kimi Linear decode, {meta['card']}, {result['dtype']}{pad}, {meta['date_utc'][:10]}", fontsize=10)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def table(result):
    lines = [f"{'variant':<22} {'batch':>5} {'context':>9} {'TPOT ms':>9} {'fill':>8}  status / decode mode"]
    for r in result["rows"]:
        t = f"{r['tpot_ms']:9.3f}" if r.get("tpot_ms") is not None else f"{'-':>9}"
        note = r.get("status", "") if r.get("status") != "ok" else r.get("decode_mode", "")
        lines.append(f"{r['variant']:<22} {r['batch']:>5} {r['context']:>9} {t} {r.get('fill', ''):>8}  {note}")
    lines.append("")
    lines.append("cache bytes per token of context, per sequence (MLA latents + KDA states spread over the context):")
    for ctx, per in result["cache_bytes_per_token"].items():
        cols = ", ".join(f"{label} {b:,.0f}" for label, b in per.items())
        ratio = per.get("hybrid", 0) / per["all-MLA"] if per.get("all-MLA") else None
        lines.append(f"  {ctx:>9}: {cols}" + (f"  (hybrid / all-MLA {ratio:.3f})" if ratio else ""))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--configs",
        nargs="+",
        default=[str(c) for c in CONFIGS],
        help="model configs; one with KDA layers runs as 'hybrid', one without as 'all-MLA' "
        "(default: the two bench_1b configs)",
    )
    ap.add_argument(
        "--contexts",
        nargs="+",
        type=int,
        default=[8192, 32768, 131072, 524288, 1048576],
        help="context lengths in tokens (default: %(default)s)",
    )
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="(default: %(default)s)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (default: %(default)s)")
    ap.add_argument(
        "--prefill-max",
        type=int,
        default=32768,
        help="real prefill up to this context, random cache values beyond (default: %(default)s)",
    )
    ap.add_argument("--prefill-chunk", type=int, default=8192, help="prefill piece (default: %(default)s)")
    ap.add_argument(
        "--builtin-max",
        type=int,
        default=32768,
        help="largest context for transformers' built-in model (default: %(default)s)",
    )
    ap.add_argument("--no-builtin", action="store_true", help="skip transformers' built-in model")
    ap.add_argument(
        "--mla-decode-products",
        action="store_true",
        help="MLA decode attention through two batched products instead of the one-pass Triton kernel "
        "(KimiMLAAttention.decode_kernel = False)",
    )
    ap.add_argument(
        "--left-pad",
        type=float,
        default=0.0,
        help="left padding, as a fraction of the context, of the batch's last row (see above; default: none)",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"), help="(default: %(default)s)")
    args = ap.parse_args(argv)
    KimiMLAAttention.decode_kernel = not args.mla_decode_products

    started = time.perf_counter()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    meta = metadata(device)
    bandwidth = copy_bandwidth(device)
    print(f"[{meta['card']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + written)]", file=sys.stderr)
    result = {
        "meta": meta,
        "dtype": args.dtype,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "args": vars(args),
        "rows": [],
        "cache_bytes_per_token": {},
    }
    configs = [(path, KimiLinearConfig(**json.loads(Path(path).read_text()))) for path in args.configs]
    total = sum(len(args.batches) * len(args.contexts) for _ in configs)
    done = 0
    for path, config in configs:
        label = "hybrid" if KDA in config.layer_types else "all-MLA"
        for ctx in args.contexts:
            result["cache_bytes_per_token"].setdefault(ctx, {})[label] = cache_bytes_per_token(config, ctx, dtype)
        torch.manual_seed(0)
        with torch.device(device):
            model = KimiLinearForCausalLM(config).to(dtype).eval()
        with torch.no_grad():
            for B in args.batches:
                for ctx in args.contexts:
                    done += 1
                    print(f"[{done}/{total}] {label} batch {B} context {ctx}", file=sys.stderr, flush=True)
                    floor = step_bytes(model, config, B, ctx, dtype)
                    result["rows"].append(
                        dict(
                            variant=f"{label} floor",
                            batch=B,
                            context=ctx,
                            bytes_per_step=floor,
                            tpot_ms=floor / bandwidth * 1e3,
                            status="ok",
                            decode_mode="bytes / copy bandwidth",
                        )
                    )
                    result["rows"] += measure_ours(model, config, label, B, ctx, args, device, dtype)
        del model
        free(device)
        if label == "hybrid" and not args.no_builtin:
            reason = builtin_obstacle(device)
            if reason is not None:
                print(f"[built-in model skipped: {reason}]", file=sys.stderr)
                result["builtin_skipped"] = reason
                continue
            model = load_builtin(path, device, dtype)
            with torch.no_grad():
                for B in args.batches:
                    for ctx in args.contexts:
                        print(f"[built-in] batch {B} context {ctx}", file=sys.stderr, flush=True)
                        result["rows"].append(measure_builtin(model, B, ctx, args, device))
            del model
            free(device)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "decode_gpu.json", result)
    plot(result, out / "decode_gpu.png")
    record_if_tuned(out, "decode")
    print(table(result))
    took = time.perf_counter() - started
    print(f"[wrote {out / 'decode_gpu.json'} and {out / 'decode_gpu.png'} in {took:.0f} s]", file=sys.stderr)


if __name__ == "__main__":
    main()
