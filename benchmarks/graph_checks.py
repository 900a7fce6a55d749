"""What checking that a captured CUDA graph still fits the model costs on the host, per call: the model's
_ModelState.matches (module tree, every parameter's and buffer's identity and storage, PEFT's adapter switches, in
passes that run in C; a prefill graph checks it at every prompt, the decode graph after every prefill) against the
check it replaced (every parameter's and buffer's data pointer through model.parameters() and model.buffers()),
timed in turn in one process. Runs on the CPU: the check is host work only.

    python benchmarks/graph_checks.py                      # about a minute on 2 cores

Models (random weights; the module structure of the config, its widths shrunk so that it builds on a laptop: the
check's cost depends on the number of modules and tensors, not their sizes):
    bench     benchmarks/configs/bench_1b_hybrid.json: 8 layers, 16 experts
    released  ../shared/reference/official_config_48b_a3b.json: 27 layers, 256 experts (27k modules, 20k tensors)
    released+lora  the same with PEFT LoRA on every layer's q_proj, k_proj, v_proj and o_proj: what checking the
              adapters' switches adds

Writes benchmarks/results/graph_checks.json and graph_checks.png (card, versions, date) and prints a table.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from kimi_linear.configuration_kimi_linear import KimiLinearConfig
from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM, _ModelState

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpu_prefill import metadata  # noqa: E402
from decode_gpu import save_json, save_png  # noqa: E402

SHARED = HERE.parent.parent / "shared"
CONFIGS = {"bench": HERE / "configs" / "bench_1b_hybrid.json",
           "released": SHARED / "reference" / "official_config_48b_a3b.json"}  # fmt: skip
# widths small enough to build the released structure on a CPU machine; counts (layers, experts, heads' layout) kept
SHRINK = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=16, vocab_size=512, kv_lora_rank=32,
              q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=2,
              head_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


def build(name):
    d = json.loads(CONFIGS[name.split("+")[0]].read_text())
    d.update(SHRINK)
    d["linear_attn_config"] = dict(d["linear_attn_config"], num_heads=2, head_dim=16)
    model = KimiLinearForCausalLM(KimiLinearConfig(**d)).eval()
    if name.endswith("+lora"):
        import peft

        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def walk_signature(model):
    """The check before _ModelState: every tensor's storage, through the module walk."""
    return tuple(t.data_ptr() for gen in (model.parameters(), model.buffers()) for t in gen)


def time_ms(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) * 1e3 / calls


def measure(name, rounds):
    model = build(name)
    state, signature = _ModelState(model), walk_signature(model)
    assert state.matches(model) and walk_signature(model) == signature
    calls = 3 if name.startswith("released") else 30
    new, old = [], []
    for _ in range(rounds):
        new.append(time_ms(lambda: state.matches(model), calls))
        old.append(time_ms(lambda: walk_signature(model) == signature, calls))
    return {
        "modules": len(state.modules),
        "tensors": len(state.tensors),
        "adapter_layers": len(state.adapters),
        "model_state_ms": statistics.median(new),
        "walk_signature_ms": statistics.median(old),
        "model_state_runs_ms": new,
        "walk_signature_runs_ms": old,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["bench", "released", "released+lora"])
    ap.add_argument("--rounds", type=int, default=15, help="rounds, the two checks in turn (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    meta = metadata()
    results = {}
    for name in args.models:
        results[name] = r = measure(name, args.rounds)
        print(f"{name:15s} {r['modules']:7d} modules {r['tensors']:7d} tensors {r['adapter_layers']:5d} adapters: "
              f"_ModelState {r['model_state_ms']:8.2f} ms, parameter walk {r['walk_signature_ms']:8.2f} ms "
              f"({r['walk_signature_ms'] / r['model_state_ms']:.0f}x)", flush=True)  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "graph_checks.json"
    save_json(out, {"metadata": meta, "rounds": args.rounds, "results": results})
    plot(meta, results, args.out_dir / "graph_checks.png")
    print(f"wrote {out} and graph_checks.png")


def plot(meta, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(names))
    for off, key, label in [(-0.2, "walk_signature_ms", "parameter walk (before)"),
                            (0.2, "model_state_ms", "_ModelState.matches")]:  # fmt: skip
        bars = ax.bar([i + off for i in x], [results[n][key] for n in names], 0.4, label=label)
        ax.bar_label(bars, fmt="%.2f")
    ax.set_xticks(list(x), names)
    ax.set_yscale("log")
    ax.set_ylabel("host ms per check")
    ax.set_title(f"Graph fit check | {meta['cpu_model'][:40]} | torch {meta['torch']} | {meta['date_utc'][:10]}",
                 fontsize=8)  # fmt: skip
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    main()
