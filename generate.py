"""Generate text with Kimi Linear, streaming tokens as they come.

    python generate.py "To be, or not to be"                       # the repo's embedded default model
    python generate.py --model /path/to/checkpoint "Hello" --max-new-tokens 100
    python generate.py --model org/name --greedy "Hello"            # a Hub id (or one in the local Hub cache)
    python generate.py --model /path/to/checkpoint --cache dynamic "Hello"  # the growing cache, decoded eagerly

The embedded default model is the folder default_model/ at the repo root when it is there: a small Kimi Linear
(3 KDA : 1 MLA, MoE) trained on Shakespeare and Milton by finetune/pretrain_embedded.py. Without it, a Kimi Linear
with RANDOM weights is created deterministically from conversion/configs/default.json (seed 0) on first use: its
text is noise, but it goes through the whole path a real checkpoint takes (safetensors on disk,
AutoModelForCausalLM with trust_remote_code, a real byte-level tokenizer, the KDA/MLA cache, streamed generation).
"""

import argparse
import contextlib
import filecmp
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
EMBEDDED_MODEL = ROOT / "default_model"  # written by finetune/pretrain_embedded.py (its --out folder's default_model/)
RANDOM_MODEL = ROOT / ".cache" / "default-model"


def default_model():
    """(path, trained?) of the embedded model: the trained one if present, else the random stand-in."""
    if (EMBEDDED_MODEL / "config.json").exists():
        return EMBEDDED_MODEL, True
    if not (RANDOM_MODEL / "model.safetensors").exists():
        from kimi_linear_conversion.random_checkpoint import make_random_checkpoint

        print(f"[creating the default model (random weights) in {RANDOM_MODEL}]", file=sys.stderr)
        make_random_checkpoint(ROOT / "conversion" / "configs" / "default.json", RANDOM_MODEL, seed=0, overwrite=True)
    # trust_remote_code runs the code files in the folder: keep them those of this checkout, not of the day the
    # folder was made
    for name in ("configuration_kimi_linear.py", "modeling_kimi_linear.py"):
        if not filecmp.cmp(ROOT / name, RANDOM_MODEL / name, shallow=False):
            shutil.copyfile(ROOT / name, RANDOM_MODEL / name)
    return RANDOM_MODEL, False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", default="To be, or not to be, that is the question:")
    ap.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: the embedded model)")
    ap.add_argument("--max-new-tokens", type=int, default=60, help="(default: %(default)s)")
    ap.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    ap.add_argument("--temperature", type=float, default=0.8, help="(default: %(default)s)")
    ap.add_argument("--top-k", type=int, default=50, help="(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument(
        "--cache",
        choices=["auto", "static", "dynamic"],
        default="auto",
        help="static: KimiLinearStaticCache, whose one-token step is captured once in a CUDA graph and replayed for "
        "every token (on a CPU it decodes eagerly); dynamic: KimiLinearCache, growing, every step eager; auto: "
        "generate()'s choice, static on one CUDA device, else dynamic (default: %(default)s)",
    )
    ap.add_argument(
        "--cuda-graph", dest="cache", action="store_const", const="static", help="the same as --cache static"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="(default: bfloat16 on CUDA, float32 on CPU)",
    )
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    path, trained = (args.model, True) if args.model else default_model()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).to(args.device).eval()
    if not trained:
        print(
            f"[warning: {EMBEDDED_MODEL.name}/ is not in the repo, so the default model has RANDOM weights and the "
            "text below is noise; train it with finetune/pretrain_embedded.py or pass --model]",
            file=sys.stderr,
        )
    print(f"[loaded {path} in {time.perf_counter() - start:.1f}s on {args.device}, {dtype}]", file=sys.stderr)

    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    sampling = (
        {"do_sample": False}
        if args.greedy
        else {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k}
    )
    # On a CPU every decode step is hundreds of small operations: inference mode drops autograd's bookkeeping of
    # each (1.17x the tokens/s for the embedded model on 2 cores, benchmarks/cpu_generate.py). On a GPU the decode
    # steps replay a CUDA graph, where there is none to drop.
    quiet = torch.inference_mode() if model.device.type == "cpu" else contextlib.nullcontext()
    start = time.perf_counter()
    with quiet:
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            streamer=TextStreamer(tokenizer, skip_special_tokens=True),
            return_dict_in_generate=True,
            **({} if args.cache == "auto" else {"cache_implementation": args.cache}),
            **sampling,
        )
    new = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    seconds = time.perf_counter() - start
    cache = out.get("cache")  # transformers >= 5.24; before, past_key_values
    cache = cache if cache is not None else out.get("past_key_values")
    mode = getattr(cache, "decode_mode", None) or f"eager ({type(cache).__name__})"
    print(f"\n[{new} tokens in {seconds:.2f}s, {new / seconds:.1f} tokens/s, decode: {mode}]", file=sys.stderr)


if __name__ == "__main__":
    main()
