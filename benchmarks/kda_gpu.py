"""KDA on the GPU, per layer at the released dimensions (32 heads x 128, conv kernel 4): decode step time vs
batch and prefill time vs length, with their baselines measured in the same run.

    python benchmarks/kda_gpu.py --out-dir benchmarks/results           # on a CUDA machine with fla-core
    bash .ci/gpu bench                                                  # the same on the lent card (no internet)

Decode (one token per sequence, in place on the cache's tensors), for B in --batches:
  ours        kimi_linear_kernels.kda_decode_fused: conv windows + SiLU + L2 norm + gate + beta + state update +
              output in one Triton launch (several launch configurations; the default is marked)
  fla         fla-core's fused_recurrent_kda on precomputed q, k, v, g, beta (the kernel alone: fla's layer adds
              the convs, norm and gate as separate launches)
  torch       kda_decode_torch, the PyTorch twin, on the GPU
Each is timed eagerly (triton.testing.do_bench, launch overhead included) and replayed from a CUDA graph
(do_bench_cudagraph), median, stepping through enough input sets (>= 256 MiB of state) that the L2 cache cannot
hold them. Bandwidth counts the float32 state read and written once per step; the card's copy
bandwidth (bytes read + written by a 1 GiB device-to-device copy) is measured in the same run.

Prefill (B = 1, bfloat16), for T in --lengths, forward and (up to --train-max tokens) forward + backward: fla's
chunk_kda with the L2 norm, gate and sigmoid inside (the call our model makes), our whole KDA layer (projections,
convs, chunk_kda, gated norm, output; inference prefill beyond 128k tokens in pieces through the state), and SDPA
causal attention at MLA's shape (32 heads, q/k 192, v 128) up to --sdpa-max tokens. Median of as many runs as fit
in 2 s after one untimed call.

Writes kda_gpu.json and kda_gpu.png to --out-dir and prints a table.
"""

import argparse
import datetime
import importlib.metadata as md
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

import kimi_linear_kernels as kernels
from kimi_linear.configuration_kimi_linear import KimiLinearConfig
from kimi_linear.modeling_kimi_linear import KimiDeltaAttention, kda_decode_torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gpu import git_commit  # noqa: E402

H, K, W = 32, 128, 4
D = H * K
REPO = Path(__file__).resolve().parents[1]


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def metadata():
    return {
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla-core": version("fla-core"),
        "transformers": version("transformers"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        # a cold start is only cold with an empty Triton cache
        "triton_cache_entries_at_start": len(list((Path.home() / ".triton" / "cache").glob("*"))),
    }  # fmt: skip


def copy_bandwidth():
    x = torch.randn(2**28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3)


def decode_inputs(B):
    g = torch.Generator(device="cuda").manual_seed(B)
    rnd = lambda *s, scale=1.0: torch.randn(*s, device="cuda", generator=g) * scale  # noqa: E731
    return dict(
        xq=rnd(B, D).bfloat16(), xk=rnd(B, D).bfloat16(), xv=rnd(B, D).bfloat16(),
        conv_q=rnd(B, D, W - 1).bfloat16(), conv_k=rnd(B, D, W - 1).bfloat16(), conv_v=rnd(B, D, W - 1).bfloat16(),
        wq=rnd(D, 1, W, scale=0.5).bfloat16(), wk=rnd(D, 1, W, scale=0.5).bfloat16(),
        wv=rnd(D, 1, W, scale=0.5).bfloat16(),
        g_raw=rnd(B, D).bfloat16(), A_log=rnd(1, 1, H, 1), dt_bias=rnd(D), b_raw=rnd(B, H).bfloat16(),
        state=rnd(B, H, K, K),
    )  # fmt: skip


def timed(fn):
    eager = do_bench(fn, warmup=25, rep=200, return_mode="median")
    try:
        graph = do_bench_cudagraph(fn, rep=200, return_mode="median")
    except Exception as err:  # a path that cannot be captured: record why, keep the eager figure
        print(f"  (no CUDA graph: {type(err).__name__}: {str(err)[:120]})")
        graph = float("nan")
    return {"eager_us": eager * 1e3, "graph_us": graph * 1e3}


def guarded(row, key, fn):
    """row[key] = fn(), or 'OOM' when the card runs out of memory at this size."""
    try:
        row[key] = fn()
    except torch.OutOfMemoryError:
        row[key] = "OOM"
    torch.cuda.empty_cache()


CONFIGS = [(32, 4), (64, 4), (64, 8), (128, 8)]  # (block_v, num_warps) swept for ours


def bench_decode(batches, copy_bw):
    return [decode_row(B, copy_bw) for B in batches]


def decode_row(B, copy_bw):
    from fla.ops.kda import fused_recurrent_kda

    # Enough independent input sets that together they outgrow the L2 cache: one timed call steps through all of
    # them (so a small batch is not timed out of the cache), and the time is divided by their number.
    state_bytes = 2 * B * H * K * K * 4
    n_sets = max(1, -(-256 * 2**20 // state_bytes))
    sets = [decode_inputs(B) for _ in range(n_sets)]
    row = {"B": B, "state_bytes": state_bytes, "input_sets": n_sets}

    def each(fn):
        t = timed(lambda: [fn(inp) for inp in sets])
        return {k_: v_ / n_sets for k_, v_ in t.items()}

    for bv, nw in CONFIGS:
        row[f"ours_bv{bv}_w{nw}"] = each(
            lambda inp, bv=bv, nw=nw: kernels.kda_decode_fused(**inp, block_v=bv, num_warps=nw)
        )
    row["ours_default"] = each(lambda inp: kernels.kda_decode_fused(**inp))
    row["torch"] = each(lambda inp: kda_decode_torch(*inp.values()))
    fla_sets = []
    for _ in range(n_sets):
        q = F.normalize(torch.randn(B, 1, H, K, device="cuda"), dim=-1).bfloat16()
        k = F.normalize(torch.randn(B, 1, H, K, device="cuda"), dim=-1).bfloat16()
        v = torch.randn(B, 1, H, K, device="cuda").bfloat16()
        g = -torch.rand(B, 1, H, K, device="cuda")
        beta = torch.rand(B, 1, H, device="cuda").bfloat16()
        fla_sets.append(dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=torch.randn(B, H, K, K, device="cuda")))
    t = timed(lambda: [fused_recurrent_kda(**f, output_final_state=True) for f in fla_sets])
    row["fla_kernel"] = {k_: v_ / n_sets for k_, v_ in t.items()}
    for t in list(row.values()):
        if isinstance(t, dict):
            t["bandwidth_frac_graph"] = row["state_bytes"] / (t["graph_us"] * 1e-6) / copy_bw
    best = min((k_ for k_ in row if k_.startswith("ours_bv")), key=lambda k_: row[k_]["graph_us"])
    ours = row["ours_default"]
    print(f"decode B={B:4d}: ours {ours['graph_us']:7.1f} us (graph) {ours['eager_us']:7.1f} us (eager) "
          f"{ours['bandwidth_frac_graph']:5.0%} of copy BW | best {best} {row[best]['graph_us']:.1f} us | "
          f"fla kernel {row['fla_kernel']['graph_us']:.1f} us | torch {row['torch']['graph_us']:.1f} us",
          flush=True)  # fmt: skip
    return row


def bench_prefill(lengths, sdpa_max, train_max):
    cfg = KimiLinearConfig(
        hidden_size=2304, num_hidden_layers=1, num_attention_heads=32, head_dim=72, num_experts=0,
        linear_attn_config={"kda_layers": [1], "full_attn_layers": [], "num_heads": H, "head_dim": K,
                            "short_conv_kernel_size": W},
    )  # fmt: skip
    layer = KimiDeltaAttention(cfg, 0).cuda().bfloat16()
    with torch.no_grad():
        layer.A_log.copy_(torch.empty(1, 1, H, 1).uniform_(1, 16).log())
        layer.dt_bias.copy_(torch.empty(D).uniform_(-4, -1))
    return [prefill_row(T, layer, sdpa_max, train_max) for T in lengths]


def measure(fn, budget_s=2.0, max_reps=20):
    """Median seconds of fn() after one untimed call; as many repetitions as fit in budget_s (at least one)."""
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    times = []
    for _ in range(max(1, min(max_reps, int(budget_s / max(first, 1e-6))))):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def prefill_row(T, layer, sdpa_max, train_max):
    row = {"T": T}
    rnd = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731

    def fla(train):
        def run():
            # fla's chunk_kda with the L2 norm, gate and sigmoid inside (kimi_linear_kernels.kda_prefill is this
            # call): the kernel work of a KDA layer, without the projections, convs and output norm around it
            args = [rnd(1, T, H, K), rnd(1, T, H, K), rnd(1, T, H, K), rnd(1, T, H, K), rnd(1, T, H)]
            args = [a.requires_grad_(train) for a in args]
            A_log, dt_bias = layer.A_log.detach().reshape(-1), layer.dt_bias.detach()
            step = lambda: kernels.kda_prefill(*args, A_log, dt_bias, output_final_state=True)  # noqa: E731
            if not train:
                with torch.no_grad():
                    return measure(step)
            return measure(lambda: step()[0].sum().backward())

        return run

    def ours(train):
        def run():
            x = rnd(1, T, 2304).requires_grad_(train)
            if not train:
                with torch.no_grad():
                    return measure(lambda: layer(x))
            return measure(lambda: layer(x).sum().backward())

        return run

    def sdpa(train):
        def run():
            qa, ka, va = (rnd(1, 32, T, d).requires_grad_(train) for d in (192, 192, 128))
            attn = lambda: F.scaled_dot_product_attention(qa, ka, va, is_causal=True)  # noqa: E731
            return measure(lambda: attn().sum().backward()) if train else measure(attn)

        return run

    for name, fn in (("fla_chunk", fla), ("ours_layer", ours), ("sdpa_mla", sdpa)):
        if name != "sdpa_mla" or T <= sdpa_max:
            guarded(row, f"{name}_ms", fn(False))
        if T <= train_max and (name != "sdpa_mla" or T <= sdpa_max):
            guarded(row, f"{name}_train_ms", fn(True))
    layer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    print(f"prefill T={T:8d}: " + "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in row.items() if k != "T"), flush=True)  # fmt: skip
    return row


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    dec = report["decode"]
    Bs = [r["B"] for r in dec]
    curves = [("ours_default", "ours fused (1 launch)"), ("fla_kernel", "fla fused_recurrent_kda (kernel only)"),
              ("torch", "PyTorch twin")]  # fmt: skip
    for key, label in curves:
        a.plot(Bs, [r[key]["graph_us"] for r in dec], marker="o", label=label)
    floor = [r["state_bytes"] / report["copy_bandwidth_Bps"] * 1e6 for r in dec]
    a.plot(Bs, floor, "k--", label="state bytes / copy bandwidth")
    a.set(xscale="log", yscale="log", xlabel="batch (sequences)", ylabel="us per layer step (CUDA graph, median)",
          title="KDA decode step, 32 heads x 128")  # fmt: skip
    a.legend(fontsize=8)
    pre = report["prefill"]
    curves = [("fla_chunk", "o", "fla chunk_kda"), ("ours_layer", "s", "our KDA layer"),
              ("sdpa_mla", "^", "SDPA causal, MLA shape")]  # fmt: skip
    for i, (key, marker, label) in enumerate(curves):
        for suffix, style, what in (("_ms", "-", "fwd"), ("_train_ms", ":", "fwd+bwd")):
            pts = [(r["T"], r[key + suffix]) for r in pre if isinstance(r.get(key + suffix), float)]
            if pts:
                b.plot(*zip(*pts), marker=marker, ls=style, color=f"C{i}", label=f"{label} ({what})")
    b.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms (median)", title="Prefill per layer, B = 1, bf16")
    b.legend(fontsize=8)
    m = report["metadata"]
    fig.suptitle(f"{m['card']} | torch {m['torch']} | triton {m['triton']} | fla-core {m['fla-core']} | "
                 f"{m['date_utc'][:10]} | commit {m['git_commit']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256], help="(default: %(default)s)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 65536, 262144, 1048576],
                    help="(default: %(default)s)")  # fmt: skip
    ap.add_argument("--sdpa-max", type=int, default=1048576, help="(default: %(default)s)")
    ap.add_argument("--train-max", type=int, default=65536, help="longest fwd+bwd timed (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results", help="(default: %(default)s)")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"metadata": metadata(), "dims": {"H": H, "K": K, "V": K, "conv": W}}
    report["copy_bandwidth_Bps"] = copy_bandwidth()
    print(f"{report['metadata']}\ncopy bandwidth (read + write): {report['copy_bandwidth_Bps'] / 1e12:.2f} TB/s",
          flush=True)  # fmt: skip
    report["decode"] = bench_decode(args.batches, report["copy_bandwidth_Bps"])
    (args.out_dir / "kda_gpu.json").write_text(json.dumps(report, indent=1))
    report["prefill"] = bench_prefill(args.lengths, args.sdpa_max, args.train_max)
    (args.out_dir / "kda_gpu.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out_dir / "kda_gpu.png")
    print(f"wrote {args.out_dir / 'kda_gpu.json'} and kda_gpu.png")


if __name__ == "__main__":
    main()
