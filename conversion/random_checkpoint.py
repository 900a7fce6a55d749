"""Create a Kimi Linear checkpoint with random weights, in the released layout, for tests and benchmarks.

    python conversion/random_checkpoint.py --config conversion/configs/tiny.json --out /tmp/tiny-kimi
    python conversion/random_checkpoint.py --config ../shared/bench/bench_1b_hybrid.json --out /tmp/b1 --dtype bfloat16

The directory gets config.json (with auto_map), the remote-code files, model.safetensors, generation_config.json
and a byte-level tokenizer (256 byte tokens plus <pad>, <s>, </s>), so that
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` and `AutoTokenizer` load it offline.
Weights depend only on the config and --seed. The output is written to a temporary folder and renamed when complete.
"""

import argparse
import json
from pathlib import Path

import torch

from kimi_linear_conversion.io import atomic_output

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def byte_tokenizer():
    """A real byte-level BPE tokenizer with no merges: ids 0-2 are <pad>, <s>, </s>; 3-258 are the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )


def load_config_dict(config):
    if isinstance(config, dict):
        return dict(config)
    return json.loads(Path(config).read_text())


def make_random_checkpoint(config, out, seed=0, dtype="float32", tokenizer=True, overwrite=False):
    """Write a random checkpoint of `config` (a config.json path or dict) to `out`; returns the Path."""
    from kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM

    cfg = KimiLinearConfig(**load_config_dict(config))
    if tokenizer and cfg.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {cfg.vocab_size} cannot hold the byte tokenizer (259 ids); pass tokenizer=False.")
    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    out = Path(out)
    with atomic_output(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer:
            byte_tokenizer().save_pretrained(tmp)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="config.json in the released format")
    ap.add_argument("--out", required=True, help="output directory (must not hold a model)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="(default: %(default)s)"
    )
    ap.add_argument("--no-tokenizer", action="store_true", help="skip the byte-level tokenizer")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = ap.parse_args()
    path = make_random_checkpoint(args.config, args.out, args.seed, args.dtype, not args.no_tokenizer, args.overwrite)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
