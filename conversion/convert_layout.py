"""Convert a Kimi Linear checkpoint between the released layout (moonshotai's checkpoints, this repo's model) and the
layout of transformers' built-in `kimi_linear` class, bit for bit, following the table in conversion/layouts.py.

    # released (or saved by this repo) -> transformers' built-in layout
    python conversion/convert_layout.py /models/Kimi-Linear-48B-A3B-Instruct /models/kimi-builtin --to builtin

    # built-in layout, or any checkpoint saved by transformers' KimiLinearForCausalLM -> released layout + our code
    python conversion/convert_layout.py /models/kimi-builtin /models/kimi-released --to released

    # then: AutoModelForCausalLM.from_pretrained("/models/kimi-released", trust_remote_code=True)
    #   or: transformers.KimiLinearForCausalLM.from_pretrained("/models/kimi-builtin")

The input may be in either layout (a group already in the target layout is copied unchanged); transformers'
`save_pretrained` writes the released layout by default (except layer 0's dense MLP, named block_sparse_moe.*),
and the built-in layout with save_original_format=False. Tensors are read one at a time as each output needs them
(peak memory: about one output tensor plus one input, e.g. one layer's stacked experts), written to a temporary
folder beside OUT and renamed to OUT only when complete. Everything is checked before anything is written: each
tensor name, each group's members, shapes and dtypes, and the whole checkpoint against the model its config.json
describes. The config is converted too; generation_config.json, tokenizer files and other files are copied; to
the released layout, this repo's code files and auto_map are added, as KimiLinearForCausalLM.save_pretrained
writes them.
"""

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kimi_linear_conversion.io import (
    CLI_ERRORS,
    MODEL_FILES,
    CheckpointError,
    CheckpointReader,
    ShardWriter,
    atomic_output,
    parse_size,
)
from kimi_linear_conversion.layouts import RULES, builtin_config, fill, match, plan, released_config, released_view

LAYOUTS = ("builtin", "released")


def convert_layout(src, out, to="builtin", max_shard_bytes=5 * 2**30, overwrite=False, progress=True):
    """Convert checkpoint folder `src` to layout `to` ("builtin" or "released") in folder `out`; returns out's Path.
    Raises CheckpointError (naming the tensor) for a checkpoint that cannot be converted, FileExistsError for an
    `out` that already holds a model (unless overwrite); on any error nothing is left at `out`."""
    if to not in LAYOUTS:
        raise ValueError(f"to must be one of {LAYOUTS}, got {to!r}.")
    src, out = Path(src), Path(out)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise CheckpointError(f"{out} is the input folder; write the conversion to another folder.")
    reader = CheckpointReader(src)
    if not (src / "config.json").exists():
        raise CheckpointError(f"{src} has no config.json.")
    config = json.loads((src / "config.json").read_text())
    released_cfg = released_config(config)
    out_config = builtin_config(config) if to == "builtin" else released_cfg
    steps = plan(reader.shapes, reader.dtypes, to, released_cfg["num_experts"])
    check_against_config(released_view(steps), released_cfg)
    steps.sort(key=lambda step: _natural(step.outputs[0]))

    with atomic_output(out, overwrite=overwrite) as tmp:
        with ShardWriter(tmp, max_shard_bytes=max_shard_bytes) as writer:
            total = sum(len(step.outputs) for step in steps)
            with tqdm(total=total, desc=f"to {to}", unit="tensor", disable=not progress) as bar:
                for step in steps:
                    for name, tensor in zip(step.outputs, step.run(reader.get)):
                        writer.add(name, tensor)
                    bar.update(len(step.outputs))
        _copy_other_files(src, tmp, to)
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
    return out


def check_against_config(view, config):
    """Compare {released name: shape} with the tensors of this repo's model built (on the meta device) from the
    released `config`; raises CheckpointError naming the first missing, unexpected or misshaped tensor."""
    from kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM

    with torch.device("meta"):
        model = KimiLinearForCausalLM(KimiLinearConfig(**config))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.get("tie_word_embeddings") and "lm_head.weight" not in view:
        expected.pop("lm_head.weight", None)
    for name in sorted(expected, key=_natural):
        if name not in view:
            raise CheckpointError(f"tensor {name} is missing{_builtin_name(name)}: the model of config.json has it.")
        if tuple(view[name]) != expected[name]:
            raise CheckpointError(
                f"tensor {name}{_builtin_name(name)} has shape {list(view[name])}; config.json gives "
                f"{list(expected[name])}."
            )
    for name in sorted(view, key=_natural):
        if name not in expected:
            raise CheckpointError(
                f"tensor {name}{_builtin_name(name)} is not part of the model config.json describes (layer kinds "
                "come from linear_attn_config, first_k_dense_replace and moe_layer_freq)."
            )


def _builtin_name(name):
    m = match(name)
    builtin = fill(RULES[m.rule].builtin, dict(m.fields))
    return "" if builtin == name else f" (in the built-in layout, part of {builtin})"


def _natural(name):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _copy_other_files(src, dst, to):
    """Everything but weights and config.json; remote-code model files are dropped (to released, ours are added)."""
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name.startswith(".") or name == "__pycache__" or name == "config.json" or name in MODEL_FILES:
            continue
        if name.endswith(".safetensors") or re.fullmatch(r"(configuration|modeling)_.*\.py", name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / name)
        else:
            shutil.copy2(entry, dst / name)
    if to == "released":
        from kimi_linear import modeling_kimi_linear

        here = Path(modeling_kimi_linear.__file__).resolve().parent
        for name in modeling_kimi_linear.CODE_FILES:
            shutil.copyfile(here / name, dst / name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="input checkpoint folder (safetensors and config.json), either layout")
    ap.add_argument("out", help="output folder (must not hold a model unless --overwrite)")
    ap.add_argument("--to", choices=LAYOUTS, default="builtin", help="target layout (default: %(default)s)")
    ap.add_argument(
        "--max-shard-size", type=parse_size, default="5GB", help="largest output shard, e.g. 5GB (default: %(default)s)"
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an output folder that holds a model")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        path = convert_layout(args.src, args.out, args.to, args.max_shard_size, args.overwrite, not args.no_progress)
    except CLI_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.to} layout)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
