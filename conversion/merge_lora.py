"""Merge a PEFT LoRA adapter into a Kimi Linear checkpoint and write the result in the released layout.

    python conversion/merge_lora.py BASE ADAPTER OUT
    python conversion/merge_lora.py /ckpt/Kimi-Linear-48B-A3B-Instruct ./my-lora /ckpt/kimi-merged
    python conversion/merge_lora.py BASE ADAPTER OUT --dtype bfloat16 --max-shard-size 2GiB --overwrite

BASE is a checkpoint folder in the released layout (model.safetensors or shards + model.safetensors.index.json, as
released or as saved by this repo). ADAPTER is what `peft.PeftModel.save_pretrained` wrote for a model of our class
(adapter_config.json + adapter_model.safetensors, keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`). OUT receives:

- the weights, streamed tensor by tensor (one base tensor and one adapter module in memory at a time): every base
  weight W whose module has an adapter becomes W + scaling * (B @ A), computed in float32 and cast back to W's dtype
  (or to --dtype); scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, per module from rank_pattern /
  alpha_pattern where they match (PEFT's own matching rule); every other tensor is copied unchanged;
- config.json (auto_map pointing at our code, dtype updated when --dtype casts), our configuration/modeling files,
  and every other top-level file of BASE that is not a weight file (generation config, tokenizer files, chat
  template), so that `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`, transformers' built-in
  `kimi_linear` class and vLLM load it;
- merge_info.json: base and adapter paths, the adapter config, and each changed tensor with its rank, alpha and
  scaling.

Refused with a ValueError naming the feature, before anything is written: DoRA, LoRA biases (bias != "none",
lora_bias), modules_to_save / trainable tokens, non-LoRA PEFT types, fan_in_fan_out, embedding and convolution
targets, parameter targets, initialisations that changed the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA:
save those with `path_initial_model_for_weight_conversion` first), and any other adapter option this script does not
know. Every adapter tensor must map to a base tensor of fitting shape, or the tensor is named in the error. OUT is
written to a temporary folder beside it and renamed when complete; a folder that already holds a model is refused
unless --overwrite.
"""

import argparse
import json
import math
import re
import shutil
import sys
from pathlib import Path

import torch

from kimi_linear_conversion.io import (
    CLI_ERRORS,
    CheckpointError,
    CheckpointReader,
    ShardWriter,
    atomic_output,
    parse_size,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
KEEP_DTYPE = ("A_log", "dt_bias", "e_score_correction_bias")  # kept as stored when casting (fp32 in the math)
BUILTIN_LAYOUT = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$|\.self_attn\.(conv1d|forget_gate)\.")

# adapter_config.json keys that do not change what a saved LoRA adapter computes (or are checked separately).
HARMLESS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "use_rslora", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "init_lora_weights", "bias", "fan_in_fan_out", "use_dora",
    "megatron_core", "qalora_group_size", "ensure_weight_tying", "eva_config", "loftq_config", "corda_config",
    "lora_ga_config", "runtime_config",
}  # fmt: skip
FEATURES = {  # truthy value -> the feature named in the error
    "modules_to_save": "modules_to_save (fully trained copies of modules)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "target_parameters": "target_parameters (LoRA on nn.Parameter targets)",
    "layer_replication": "layer_replication",
    "megatron_config": "megatron_config (Megatron-parallel LoRA layers)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _truthy(value):
    return value not in (None, False, 0, "", [], {})


def check_adapter_config(cfg):
    """Raise ValueError naming the first feature of this adapter_config.json that a plain merge cannot reproduce."""
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"adapter peft_type is {peft_type}; only plain LoRA adapters (peft_type LORA) can be merged.")
    if cfg.get("use_dora"):
        raise ValueError("DoRA adapters (use_dora=true) are not supported: merge them with peft's merge_and_unload.")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"adapter bias={cfg['bias']!r} is not supported (trained biases); only bias='none' is.")
    if cfg.get("fan_in_fan_out"):
        raise ValueError("fan_in_fan_out=true (Conv1D-style transposed weights) is not supported.")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(
            f"init_lora_weights={init!r} changed the base weights during training, so the adapter does not apply to "
            "the original base; save it with peft's path_initial_model_for_weight_conversion first."
        )
    for key, feature in FEATURES.items():
        if _truthy(cfg.get(key)):
            raise ValueError(f"adapter uses {feature}, which merge_lora does not support.")
    unknown = sorted(k for k, v in cfg.items() if k not in HARMLESS and k not in FEATURES and _truthy(v))
    if unknown:
        raise ValueError(f"adapter_config.json sets options merge_lora does not know and cannot merge: {unknown}.")
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0 or not isinstance(cfg.get("lora_alpha"), (int, float)):
        raise ValueError(f"adapter_config.json needs a positive integer r and a number lora_alpha, got {cfg}.")


def _pattern_key(patterns, module):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern matching the module name's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def rank_and_alpha(cfg, module):
    """(r, alpha, scaling) of one adapted module, as PEFT computed them."""
    r_key = _pattern_key(cfg.get("rank_pattern") or {}, module)
    a_key = _pattern_key(cfg.get("alpha_pattern") or {}, module)
    r = cfg["rank_pattern"][r_key] if r_key is not None else cfg["r"]
    alpha = cfg["alpha_pattern"][a_key] if a_key is not None else cfg["lora_alpha"]
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, alpha, scaling


class _AdapterTensors:
    """The adapter's tensors, read lazily from safetensors (or loaded at once from a .bin)."""

    def __init__(self, folder):
        folder = Path(folder)
        path = next((folder / f for f in ADAPTER_FILES if (folder / f).exists()), None)
        if path is None:
            raise CheckpointError(f"{folder} holds none of {list(ADAPTER_FILES)}.")
        self.path = path
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            self._file = safe_open(path, framework="pt")
            self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
            self._dict = None
        else:
            self._dict = torch.load(path, map_location="cpu", weights_only=True)
            self.shapes = {k: tuple(v.shape) for k, v in self._dict.items()}

    def get(self, key):
        return self._dict[key] if self._dict is not None else self._file.get_tensor(key)


def plan_merge(reader, adapter, cfg):
    """Map every adapter tensor to a base tensor and check shapes; returns {base name: info}. Raises naming the
    adapter tensor or module that does not fit."""
    modules = {}
    for key in adapter.shapes:
        m = KEY.match(key)
        if m is None:
            if "lora_embedding_" in key:
                raise ValueError(f"adapter tensor {key} is an embedding adapter; embedding targets are not supported.")
            if "lora_magnitude_vector" in key:
                raise ValueError(f"adapter tensor {key} is a DoRA magnitude; DoRA adapters are not supported.")
            raise ValueError(f"adapter tensor {key} is not a LoRA A/B weight (modules_to_save, bias or other state?).")
        module = m["module"].removeprefix("base_model.model.")
        modules.setdefault(module, {})[m["ab"]] = key
    if not modules:
        raise ValueError(f"{adapter.path} holds no LoRA tensors.")
    base = set(reader.names())
    plan = {}
    for module, keys in sorted(modules.items()):
        if set(keys) != {"A", "B"}:
            missing = "lora_B" if "A" in keys else "lora_A"
            raise ValueError(f"adapter module {module} has no {missing} weight.")
        # Adapters trained on KimiLinearForCausalLM name modules model.layers...; on KimiLinearModel, layers...
        name = next((n for n in (f"{module}.weight", f"model.{module}.weight") if n in base), None)
        if name is None:
            raise ValueError(
                f"adapter module {module} ({keys['A']}) matches no tensor of the base checkpoint "
                f"(looked for {module}.weight and model.{module}.weight): wrong base model or wrong layout?"
            )
        if name in plan:
            raise ValueError(f"two adapter modules map to base tensor {name}.")
        w, a, b = reader.shapes[name], adapter.shapes[keys["A"]], adapter.shapes[keys["B"]]
        if len(w) != 2:
            raise ValueError(
                f"adapter module {module} targets {name} of shape {list(w)}: only linear weights can be merged "
                "(convolution and other targets are not supported)."
            )
        r, alpha, scaling = rank_and_alpha(cfg, module)
        if len(a) != 2 or len(b) != 2 or a != (r, w[1]) or b != (w[0], r):
            raise ValueError(
                f"adapter module {module} does not fit base tensor {name} {list(w)}: lora_A {list(a)} and lora_B "
                f"{list(b)}, expected [{r}, {w[1]}] and [{w[0]}, {r}] (r = {r} from adapter_config.json)."
            )
        plan[name] = {"module": module, "A": keys["A"], "B": keys["B"], "r": r, "alpha": alpha, "scaling": scaling}
    return plan


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a torch floating-point dtype (float32, bfloat16, float16).")
    return value


def _is_weight_file(path):
    return path.name in WEIGHT_INDEXES or path.name.endswith(WEIGHT_SUFFIXES)


def merge_lora(base_dir, adapter_dir, out, dtype=None, max_shard_bytes=5 * 2**30, overwrite=False, progress=True):
    """Merge the LoRA adapter in `adapter_dir` into the checkpoint `base_dir` and write it to `out` (see the module
    docstring). `dtype` (None keeps each tensor's dtype) casts every floating tensor except A_log, dt_bias and
    e_score_correction_bias. Returns the Path of `out`."""
    from tqdm.auto import tqdm

    from kimi_linear import modeling_kimi_linear as modeling

    base_dir, adapter_dir, out = Path(base_dir), Path(adapter_dir), Path(out)
    target = _dtype(dtype)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.exists():
        raise CheckpointError(f"{adapter_dir} has no {ADAPTER_CONFIG}; pass the folder that save_pretrained wrote.")
    adapter_cfg = json.loads(cfg_path.read_text())
    check_adapter_config(adapter_cfg)
    if not (base_dir / "config.json").exists():
        raise CheckpointError(f"{base_dir} has no config.json.")
    model_cfg = json.loads((base_dir / "config.json").read_text())
    if model_cfg.get("model_type") != "kimi_linear":
        raise ValueError(f"{base_dir}/config.json has model_type {model_cfg.get('model_type')!r}, not 'kimi_linear'.")
    reader = CheckpointReader(base_dir)
    builtin = [n for n in reader.names() if BUILTIN_LAYOUT.search(n)]
    if builtin:
        raise ValueError(
            f"{base_dir} is in transformers' built-in layout ({builtin[0]}); convert it to the released layout first."
        )
    adapter = _AdapterTensors(adapter_dir)
    plan = plan_merge(reader, adapter, adapter_cfg)

    if target is not None:
        model_cfg["dtype"] = str(target).removeprefix("torch.")
        if "torch_dtype" in model_cfg:
            model_cfg["torch_dtype"] = model_cfg["dtype"]
    model_cfg["auto_map"] = dict(modeling.AUTO_MAP)
    code_dir = Path(modeling.__file__).resolve().parent
    merged = {}
    with atomic_output(out, overwrite=overwrite) as tmp:
        names = sorted(reader.names(), key=lambda n: (reader.location[n], n))  # shard by shard
        with ShardWriter(tmp, max_shard_bytes=max_shard_bytes) as writer:
            for name in tqdm(names, desc="merge", unit="tensor", disable=not progress):
                w = reader.get(name)
                dst = w.dtype
                if target is not None and w.is_floating_point() and not name.endswith(KEEP_DTYPE):
                    dst = target
                info = plan.get(name)
                if info is not None:
                    a, b = adapter.get(info["A"]).float(), adapter.get(info["B"]).float()
                    w = torch.addmm(w.float(), b, a, alpha=info["scaling"])
                    merged[name] = {k: info[k] for k in ("module", "r", "alpha", "scaling")}
                writer.add(name, w.to(dst))
        (tmp / "config.json").write_text(json.dumps(model_cfg, indent=2, sort_keys=True) + "\n")
        for name in modeling.CODE_FILES:
            shutil.copyfile(code_dir / name, tmp / name)
        skip = {"config.json", "merge_info.json", *modeling.CODE_FILES}
        for path in sorted(base_dir.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.name not in skip and not _is_weight_file(path):
                shutil.copyfile(path, tmp / path.name)
        info = {
            "base": str(base_dir.resolve()),
            "adapter": str(adapter_dir.resolve()),
            "adapter_file": adapter.path.name,
            "adapter_config": adapter_cfg,
            "dtype": None if target is None else model_cfg["dtype"],
            "tensors": len(names),
            "merged_count": len(merged),
            "merged": merged,
        }
        (tmp / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="merge_lora.py"
    )
    ap.add_argument("base", help="base checkpoint folder in the released layout")
    ap.add_argument("adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("out", help="output folder (must not hold a model unless --overwrite)")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="cast the merged weights (default: %(default)s = keep each tensor's dtype)",
    )
    ap.add_argument("--max-shard-size", type=parse_size, default="5GiB", help="largest shard (default: %(default)s)")
    ap.add_argument("--overwrite", action="store_true", help="replace an output folder that holds a model")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        out = merge_lora(
            args.base, args.adapter, args.out, args.dtype, args.max_shard_size, args.overwrite, progress=not args.quiet
        )
    except CLI_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    n = json.loads((out / "merge_info.json").read_text())["merged_count"]
    print(f"merged {n} tensors; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
