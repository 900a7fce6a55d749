"""The decode step's MoE kernels (kernels/moe_decode.py): tile sizes swept for each of the two launches, against the
PyTorch path (grouped products for the routed experts, three nn.Linear products for an MLP) and the floor (weight
bytes read / copy bandwidth).

    python benchmarks/moe_decode.py --out-dir benchmarks/results        # a CUDA machine (a minute or two)

Shapes of the bench model (hidden 2304; 16 experts of width 1024, 4 per token; a shared expert of width 1024; the
dense layer's MLP of width 9216; the released model's experts have the same shape). Every time is a CUDA-graph
replay of 48 calls divided by 48 (what a captured decode step sees: no launch overhead from Python), the calls
cycling through sets of inputs that read different weights (other experts, other copies of an MLP) so that the
50 MB L2 cache does not serve them. Writes moe_decode.json and moe_decode.png and prints, per case, the default
launch configuration (kernels/moe_decode.py UP and DOWN), the best swept one, PyTorch and the floor.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode_gpu import copy_bandwidth, metadata  # noqa: E402

from kimi_linear.modeling_kimi_linear import moe_experts_grouped  # noqa: E402
from kimi_linear_kernels import moe_decode  # noqa: E402


def graph_time(fn, arg_sets, calls=48, reps=5):
    """Seconds per call of fn(*args) replayed from a CUDA graph of `calls` calls cycling through arg_sets (sets that
    read different weights, so that the L2 cache does not serve them), best of `reps` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for args in arg_sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in range(calls):
            fn(*arg_sets[c % len(arg_sets)])
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3 / calls)
    return best


def mlp_torch(x, gate, up, down):
    F = torch.nn.functional
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def sweep(fn, arg_sets, grid, names):
    """[(seconds, config)] of fn(*args, **config) over the grid, fastest first; configurations that fail are skipped."""
    results = []
    for values in grid:
        config = dict(zip(names, values))
        try:
            results.append((graph_time(lambda *a, c=config: fn(*a, **c), arg_sets), config))
        except Exception as err:  # noqa: BLE001  (a configuration that does not compile or fit)
            print(f"  {config}: {type(err).__name__}")
    return sorted(results, key=lambda r: r[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=HERE / "results", help="(default: %(default)s)")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    H, I, E, k, I_dense = 2304, 1024, 16, 4, 9216
    torch.manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, device=dev, dtype=dt) * 0.02

    w13, w2 = w(E, 2 * I, H), w(E, H, I)
    halves = w13.view(E, 2, I, H)
    bias = torch.zeros(E, device=dev)
    router_w = w(E, H)
    bandwidth = copy_bandwidth(dev)
    cases = {}  # name: (up arg sets, down arg sets (hid filled in below), weight bytes per call, torch fn, its sets)
    for N in (1, 4):
        sets = []
        for r in range(4):  # N=1: disjoint experts per set; N=4: random routing
            x = torch.randn(N, H, device=dev, dtype=dt)
            if N == 1:
                ids = torch.arange(4 * r, 4 * r + 4, device=dev)[None]
                wts = torch.full((1, k), 0.25, device=dev)
            else:
                ids, wts = moe_decode.route(x, router_w, torch.randn(E, device=dev), k, 1.0)
            sets.append((x, ids, wts))
        pairs = N * k if N == 1 else sum(len(torch.unique(s[1])) for s in sets) / len(sets)
        cases[f"routed N={N}"] = dict(
            up=[(x, halves[:, 0], halves[:, 1], ids) for x, ids, wts in sets],
            down=[(w2, ids, wts) for x, ids, wts in sets],
            bytes=pairs * 3 * I * H * 2,
            torch=(moe_experts_grouped, [(x, ids, wts, w13, w2) for x, ids, wts in sets]),
        )
    for name, width, copies in (("shared N=1", I, 8), ("dense N=1", I_dense, 3)):
        mlps = [(w(width, H), w(width, H), w(H, width)) for _ in range(copies)]
        x = torch.randn(1, H, device=dev, dtype=dt)
        cases[name] = dict(
            up=[(x, g, u) for g, u, _ in mlps],
            down=[(d,) for _, _, d in mlps],
            bytes=3 * width * H * 2,
            torch=(mlp_torch, [(x, *m) for m in mlps]),
        )
    up_grid = [
        (bi, bh, nw) for bi in (2, 4, 8, 16) for bh in (256, 512, 1024, 4096) for nw in (4, 8) if bi * bh <= 16384
    ]
    down_grid = [(bo, br, nw) for bo in (2, 4, 8, 16) for br in (256, 512, 1024) for nw in (4, 8) if bo * br <= 16384]
    report = {"metadata": metadata(dev), "copy_bandwidth_bytes_per_s": bandwidth, "default": {"up": moe_decode.UP,
              "down": moe_decode.DOWN}, "cases": {}}  # fmt: skip
    with torch.no_grad():
        for name, c in cases.items():
            hids = [moe_decode.up(*a) for a in c["up"]]
            down_sets = [(h, *d) for h, d in zip(hids, c["down"])]
            row = {
                "floor_us": c["bytes"] / bandwidth * 1e6,
                "up_default_us": graph_time(moe_decode.up, c["up"]) * 1e6,
                "down_default_us": graph_time(moe_decode.down, down_sets) * 1e6,
                "torch_us": graph_time(c["torch"][0], c["torch"][1]) * 1e6,
            }
            for part, fn, sets, grid, names in (
                ("up", moe_decode.up, c["up"], up_grid, ("block_i", "block_h", "num_warps")),
                ("down", moe_decode.down, down_sets, down_grid, ("block_o", "block_r", "num_warps")),
            ):
                results = sweep(fn, sets, grid, names)
                row[f"{part}_sweep"] = [{"us": t * 1e6, **cfg} for t, cfg in results]
                row[f"{part}_best_us"], row[f"{part}_best"] = results[0][0] * 1e6, results[0][1]
                print(f"{name} {part}: default {row[f'{part}_default_us']:.1f} us, best {results[0][0] * 1e6:.1f} us "
                      f"{results[0][1]}, worst {results[-1][0] * 1e6:.1f} us")  # fmt: skip
            report["cases"][name] = row
        for N in (1, 4):
            sets = [(torch.randn(N, H, device=dev, dtype=dt), router_w, bias, k, 2.446) for _ in range(4)]
            report["cases"][f"router N={N}"] = {"default_us": graph_time(moe_decode.route, sets) * 1e6}

    print(f"\n{'case':<12} {'floor':>7} {'up+down':>8} {'best':>7} {'torch':>7}   (us per call)")
    for name, row in report["cases"].items():
        if "floor_us" not in row:
            print(f"{name:<12} {'':>7} {row['default_us']:8.1f}")
            continue
        ours, best = row["up_default_us"] + row["down_default_us"], row["up_best_us"] + row["down_best_us"]
        print(f"{name:<12} {row['floor_us']:7.1f} {ours:8.1f} {best:7.1f} {row['torch_us']:7.1f}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "moe_decode.json").write_text(json.dumps(report, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in report["cases"].items() if "floor_us" in r]
    bars = {
        "floor": [report["cases"][n]["floor_us"] for n in names],
        "ours (default)": [report["cases"][n]["up_default_us"] + report["cases"][n]["down_default_us"] for n in names],
        "ours (best swept)": [report["cases"][n]["up_best_us"] + report["cases"][n]["down_best_us"] for n in names],
        "PyTorch": [report["cases"][n]["torch_us"] for n in names],
    }
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (label, vals) in enumerate(bars.items()):
        ax.bar([j + 0.2 * i for j in range(len(names))], vals, width=0.2, label=label)
    ax.set_xticks([j + 0.3 for j in range(len(names))], names)
    ax.set_ylabel("microseconds per call (CUDA graph)")
    meta = report["metadata"]
    ax.set_title(f"decode MoE kernels: {meta['card']}, torch {meta['torch']}, {meta['date_utc'][:10]}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out_dir / "moe_decode.png", dpi=120)
    print(f"wrote {args.out_dir / 'moe_decode.json'} and moe_decode.png")


if __name__ == "__main__":
    main()
