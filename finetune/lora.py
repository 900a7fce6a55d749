"""LoRA fine-tuning of a Kimi Linear checkpoint: every part of the hybrid (KDA, MLA, dense MLP, shared and routed
experts) can carry an adapter; the router stays frozen.

    python finetune/lora.py --model /ckpt/tiny --data train.jsonl --out ./my-lora --steps 200
    python finetune/lora.py --model /ckpt/kimi --data chat.jsonl --messages-column messages --targets kda,mla \\
        --rank 16 --alpha 32 --max-length 2048 --gradient-checkpointing --out ./chat-lora --merge-to ./kimi-chat

The checkpoint loads with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` and `AutoTokenizer`.
The data is a local jsonl / json / parquet / csv / text file (or a folder of them) read with `datasets`, or a Hub
dataset id already in the local cache. Each example is tokenized (plain text with an EOS appended; chat data in
--messages-column through the tokenizer's chat template, trained on the assistant's tokens only unless
--train-on-prompts) and truncated to --max-length; batches are padded on the right (labels -100 on padding).
--pack packs whole documents into rows of --max-length tokens instead, with position_ids restarting at each document:
the model then restarts KDA's state and conv windows there and keeps MLA inside the document, so a packed row trains
exactly as its documents would as separate rows.
--out receives the adapter (adapter_config.json + adapter_model.safetensors), `train_log.json` (arguments and every
step's loss, learning rate, gradient norm and tokens) and `loss.png`. --merge-to writes a merged full checkpoint
with `kimi_linear_conversion.merge_lora.merge_lora`.
On a GPU the adapted layers run their float32 adapter products fused (fast_lora.py, kernels/lora.py): PEFT's
arithmetic and files, fewer passes over the activations.

Long runs: --save-every N writes out/checkpoint-N (adapter, optimizer, scheduler, log); --resume continues from the
newest one at the same step with the same data order. Several GPUs (data parallel):
    accelerate launch --num_processes 2 finetune/lora.py --model ... --batch-size 16 ...
--batch-size is the global batch, split over the processes; --fsdp shards the model over them instead of copying it
(its checkpoints gather the adapter and optimizer state whole, and resume only with --fsdp).

Library: `train_lora(model, data, out, ...)` returns a `LoraResult` (the trained PeftModel, the step log, paths);
`lora_targets(model, targets)` gives the list of module names a target specification selects and
`target_regex(model, names)` the compact regex handed to PEFT.
"""

import argparse
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

KDA_KIND, MLA_KIND = "linear_attention", "full_attention"  # config.layer_types values
KDA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "f_a_proj", "f_b_proj", "g_a_proj", "g_b_proj", "b_proj")
MLA_PROJ = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
EXPERT_PROJ = ("w1", "w2", "w3")
PRESETS = {
    "kda": "KDA layers: self_attn.{" + ",".join(KDA_PROJ) + "}",
    "mla": "MLA layers: self_attn.{" + ",".join(MLA_PROJ) + "}",
    "mlp": "dense layers: mlp.{" + ",".join(MLP_PROJ) + "}",
    "shared": "MoE layers: block_sparse_moe.shared_experts.{" + ",".join(MLP_PROJ) + "}",
    "experts": "MoE layers: block_sparse_moe.experts.N.{" + ",".join(EXPERT_PROJ) + "}",
    "all": "all of the above",
}
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
DATA_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".arrow": "arrow",
}


# ---------------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------------
def _base(model):
    """The KimiLinearForCausalLM under a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def preset_modules(model, preset):
    """Full module names (as in `model.named_modules()`) of one preset; [] if the model has none of them."""
    model = _base(model)
    kinds = list(model.config.layer_types)
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names = []
    for name in sorted(linear, key=_natural):
        m = LAYER.match(name)
        if m is None:
            continue
        kind, rest = kinds[int(m.group(1))], m.group(2)
        if preset == "kda":
            ok = kind == KDA_KIND and rest in {f"self_attn.{p}" for p in KDA_PROJ}
        elif preset == "mla":
            ok = kind == MLA_KIND and rest in {f"self_attn.{p}" for p in MLA_PROJ}
        elif preset == "mlp":
            ok = rest in {f"mlp.{p}" for p in MLP_PROJ}
        elif preset == "shared":
            ok = rest in {f"block_sparse_moe.shared_experts.{p}" for p in MLP_PROJ}
        elif preset == "experts":
            ok = re.fullmatch(r"block_sparse_moe\.experts\.\d+\.w[123]", rest) is not None
        else:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        if ok:
            names.append(name)
    return names


def _natural(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def lora_targets(model, targets="all"):
    """Module names selected by `targets`: a preset name, a module name (matched like PEFT: the full name or a
    dotted suffix of it, nn.Linear modules only), or a comma-separated list / iterable of those. Raises ValueError
    naming any entry that selects nothing. The router (block_sparse_moe.gate) is never selected by a preset."""
    model = _base(model)
    entries = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t).strip() for t in targets]
    entries = [t for t in entries if t]
    if not entries:
        raise ValueError("no LoRA targets given")
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    chosen = set()
    for entry in entries:
        if entry == "all":
            found = [n for p in PRESETS if p != "all" for n in preset_modules(model, p)]
        elif entry in PRESETS:
            found = preset_modules(model, entry)
        else:
            found = [n for n in linear if n == entry or n.endswith("." + entry)]
            if not found:
                other = [n for n in modules if n and (n == entry or n.endswith("." + entry))]
                hint = (
                    f" (it names {len(other)} module(s) that are not nn.Linear, e.g. {other[0]!r} of type "
                    f"{type(modules[other[0]]).__name__}; LoRA here wraps nn.Linear only)"
                    if other
                    else ""
                )
                raise ValueError(
                    f"LoRA target {entry!r} matches no module of this model{hint}. Presets: {', '.join(PRESETS)}; "
                    "or a module name such as 'q_proj', 'self_attn.kv_b_proj', 'experts.0.w1'."
                )
        if not found:
            raise ValueError(
                f"LoRA target preset {entry!r} ({PRESETS[entry]}) matches no module of this model "
                f"(layer_types {sorted(set(model.config.layer_types))}, "
                f"mlp_types {sorted(set(model.config.mlp_types))})."
            )
        chosen.update(found)
    return sorted(chosen, key=_natural)


def target_regex(model, names):
    """A compact regex that PEFT fullmatches against module names and that selects exactly `names`: layers with the
    same set of adapted sub-modules share one alternation, and a projection adapted in every routed expert of a
    layer is written `experts\\.\\d+\\.w1` (the released model has 256 experts x 3 projections x 26 layers)."""
    model = _base(model)
    names = set(names)
    all_names = [n for n, _ in model.named_modules() if n]
    per_layer, loose = {}, []
    for name in names:
        m = LAYER.match(name)
        if m is None:
            loose.append(re.escape(name))
        else:
            per_layer.setdefault(int(m.group(1)), set()).add(m.group(2))
    groups = {}
    for layer, rests in per_layer.items():
        n_exp = len(getattr(getattr(model.model.layers[layer], "block_sparse_moe", None), "experts", []))
        patterns = set()
        experts = {}
        for rest in rests:
            m = re.fullmatch(r"block_sparse_moe\.experts\.(\d+)\.(\w+)", rest)
            if m:
                experts.setdefault(m.group(2), set()).add(int(m.group(1)))
            else:
                patterns.add(re.escape(rest))
        for leaf, ids in experts.items():
            if n_exp and len(ids) == n_exp:
                patterns.add(rf"block_sparse_moe\.experts\.\d+\.{re.escape(leaf)}")
            else:
                patterns.update(rf"block_sparse_moe\.experts\.{i}\.{re.escape(leaf)}" for i in sorted(ids))
        groups.setdefault(tuple(sorted(patterns)), []).append(layer)
    parts = list(loose)
    for patterns, layers in sorted(groups.items(), key=lambda kv: min(kv[1])):
        layer_alt = "|".join(str(i) for i in sorted(layers))
        parts.append(rf"model\.layers\.(?:{layer_alt})\.(?:{'|'.join(patterns)})")
    regex = "(?:" + "|".join(parts) + ")"
    matched = {n for n in all_names if re.fullmatch(regex, n)}
    if matched != names:  # cannot happen by construction; a cheap guard against a silent wrong adapter
        raise AssertionError(f"target regex selects {sorted(matched ^ names)[:5]} wrongly")
    return regex


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def load_data(data, split="train", config_name=None, data_format=None):
    """A `datasets.Dataset` from a local file or folder (builder from the extension or `data_format`) or a Hub id
    from the local cache. A Dataset passed in is returned as is."""
    import datasets

    if isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        return data
    if isinstance(data, datasets.DatasetDict):
        return data[split]
    path = Path(str(data))
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in DATA_BUILDERS)
        if not files:
            raise ValueError(f"{path}: no data files ({', '.join(sorted(DATA_BUILDERS))}) in it")
        if all(f.stat().st_size == 0 for f in files):
            raise ValueError(f"the dataset is empty: {path} holds no data")
        builder = data_format or DATA_BUILDERS.get(files[0].suffix.lower())
        if builder is None:
            raise ValueError(
                f"{path}: cannot tell the format from the extension {files[0].suffix!r}; pass --data-format "
                "(json, parquet, csv, text, arrow)"
            )
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    return datasets.load_dataset(str(data), config_name, split=split)


class Document(list):
    """One example's token ids; `trained` marks, per token, whether its prediction is trained (its label kept): the
    assistant's tokens of a conversation. A plain list trains every token."""

    def __init__(self, ids, trained):
        super().__init__(ids)
        self.trained = list(trained)


def _render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def chat_tokens(tokenizer, messages, assistant_only=True):
    """A conversation's token ids through the chat template: a list, or with assistant_only a Document whose trained
    tokens are the assistant messages' (None when it has no assistant message). Each assistant message spans from
    the conversation before it rendered with the generation prompt to the conversation through it; the template must
    render those prefixes as prefixes of the whole (templates that rewrite earlier turns, e.g. drop past reasoning,
    are refused, naming the way out)."""
    full = _render(tokenizer, messages)
    ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    if not assistant_only:
        return ids
    trained = [False] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        spans = [tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in (before, through)]
        if not (through.startswith(before) and full.startswith(through) and ids[: len(spans[1])] == spans[1]):
            raise ValueError(
                f"the chat template does not render the conversation up to message {i} as a prefix of the whole, so "
                "the assistant's tokens cannot be told apart; train on every token instead (assistant_only=False, "
                "--train-on-prompts)"
            )
        trained[len(spans[0]) : len(spans[1])] = [True] * (len(spans[1]) - len(spans[0]))
    return Document(ids, trained) if any(trained) else None


def tokenize_dataset(dataset, tokenizer, max_length, text_column="text", messages_column=None, add_eos=True,
                     assistant_only=True):  # fmt: skip
    """A list of token-id lists, one per example, each at most max_length long (examples with < 2 tokens dropped).
    Chat data (messages_column) goes through the tokenizer's chat template; with assistant_only (the default) the
    examples are Documents that train only the assistant's tokens, and conversations without an assistant message
    are dropped. Raises ValueError for a missing column, a tokenizer without a chat template (messages), or no usable
    example."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    columns = list(dataset.column_names or [])
    column = messages_column or text_column
    if column not in columns:
        what = "messages" if messages_column else "text"
        raise ValueError(f"the dataset has no {what} column {column!r}; its columns are {columns}")
    if messages_column and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"--messages-column {messages_column!r} needs a tokenizer with a chat template, and this tokenizer has "
            "none; render the conversations to text first and use --text-column"
        )
    eos = tokenizer.eos_token_id if add_eos else None
    sequences = []
    for row in dataset:
        value = row[column]
        if messages_column:
            ids = chat_tokens(tokenizer, value, assistant_only)
            if ids is None:
                continue
        else:
            if value is None:
                continue
            ids = tokenizer(str(value))["input_ids"]
            if eos is not None and len(ids) and ids[-1] != eos:
                ids = ids + [eos]
        if isinstance(ids, Document):
            ids = Document(ids[:max_length], ids.trained[:max_length])
            if not any(ids.trained[1:]):  # truncation cut every trained token (the first one predicts nothing)
                continue
        else:
            ids = list(ids)[:max_length]
        if len(ids) >= 2:
            sequences.append(ids)
    if not sequences:
        raise ValueError(f"the dataset ({len(dataset)} rows) has no example with at least 2 tokens in {column!r}"
                         + (" and an assistant message" if messages_column and assistant_only else ""))  # fmt: skip
    return sequences


def _mask_untrained(labels, offset, doc):
    trained = getattr(doc, "trained", None)
    if trained is not None:
        keep = torch.tensor(trained, dtype=torch.bool)
        labels[offset : offset + len(doc)].masked_fill_(~keep, -100)


def collate(sequences, pad_id):
    """Right-padded input_ids, attention_mask and labels (-100 on padding and on a Document's untrained tokens)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    for i, seq in enumerate(sequences):
        _mask_untrained(labels[i], 0, seq)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_documents(sequences, max_length):
    """Whole documents, in order, greedily into rows of at most max_length tokens: a list of rows, each a list of
    documents (token-id lists)."""
    rows, row, used = [], [], 0
    for seq in sequences:
        if row and used + len(seq) > max_length:
            rows.append(row)
            row, used = [], 0
        row.append(seq)
        used += len(seq)
    if row:
        rows.append(row)
    return rows


def collate_packed(rows, pad_id):
    """Packed rows (lists of documents): input_ids, attention_mask, position_ids restarting at 0 for each document
    (the model restarts KDA's state and confines MLA to the document there), and labels with -100 on padding and on
    each document's first token (nothing before it in its document predicts it) and a Document's untrained tokens."""
    flat = [[t for doc in row for t in doc] for row in rows]
    batch = collate(flat, pad_id)
    batch["position_ids"] = torch.zeros_like(batch["input_ids"])
    for i, row in enumerate(rows):
        start = 0
        for doc in row:
            batch["position_ids"][i, start : start + len(doc)] = torch.arange(len(doc))
            _mask_untrained(batch["labels"][i], start, doc)
            batch["labels"][i, start] = -100
            start += len(doc)
    return batch


def batches(sequences, batch_size, seed, skip=0):
    """Endless iterator of (epoch, batch of sequences), reshuffled each epoch with a seeded generator; `skip` batches
    are passed over first (resuming at the same place in the same order)."""
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        order = torch.randperm(len(sequences), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            if skip:
                skip -= 1
                continue
            yield epoch, [sequences[j] for j in order[i : i + batch_size]]
        epoch += 1


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LoraResult:
    model: object  # the trained peft.PeftModel (train mode off)
    log: list = field(default_factory=list)  # per step: step, epoch, loss, lr, grad_norm, tokens, seconds
    out: Path | None = None
    merged: Path | None = None
    targets: list = field(default_factory=list)


def _resolve_local(path):
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), local_files_only=True))


def train_lora(
    model,
    data,
    out,
    *,
    tokenizer=None,
    text_column="text",
    messages_column=None,
    assistant_only=True,
    split="train",
    data_config=None,
    data_format=None,
    max_length=1024,
    batch_size=4,
    steps=None,
    epochs=1,
    lr=2e-4,
    warmup_steps=0,
    weight_decay=0.0,
    max_grad_norm=1.0,
    rank=8,
    alpha=16,
    dropout=0.0,
    targets="all",
    gradient_checkpointing=False,
    seed=0,
    dtype="auto",
    device=None,
    merge_to=None,
    overwrite_merge=False,
    progress=True,
    plot=True,
    pack=False,
    save_every=None,
    keep_checkpoints=2,
    resume=False,
    fsdp=False,
    cuda_graph="auto",
):
    """Attach a LoRA to `model` (a checkpoint path / Hub id, or an already loaded model with `tokenizer`), train it on
    `data` (see `load_data`), save the adapter, step log and loss plot to `out`, optionally merge into `merge_to`.
    Runs `steps` optimizer steps if given, else `epochs` passes over the data. Returns a LoraResult.

    assistant_only: chat data (messages_column) trains on the assistant's tokens only (False: every token of the
    rendered conversation). pack: documents are packed whole into rows of max_length tokens (position_ids restart
    per document, so each trains exactly as it would alone); save_every: a resumable checkpoint (adapter, optimizer,
    scheduler, step log) in out/checkpoint-N every N steps, the newest keep_checkpoints kept; resume: continue from
    the newest checkpoint in `out` at the same step, with the same data order. Under `accelerate launch`
    (WORLD_SIZE > 1) each of the processes trains on its share of every batch (batch_size is the global batch) with
    data-parallel gradients; with fsdp the model is sharded over the processes instead of copied (torch's
    fully_shard, one unit per decoder layer), for a model that does not fit one device. cuda_graph: replay steps
    from a CUDA graph (train_step.py: batches without padding or packed documents, on one CUDA device); "auto" does
    where it can, True requires it, False never."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kimi_linear_finetune.fast_lora import fuse_lora
    from kimi_linear_finetune.train_step import TrainStep

    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if steps is not None and steps < 1:
        raise ValueError("steps must be at least 1")
    if save_every is not None and save_every < 1:
        raise ValueError("save_every must be at least 1 (or None for no checkpoints)")
    if fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError("fsdp shards the model over several processes: launch with torchrun --nproc_per_node N or "
                         "accelerate launch --num_processes N (N >= 2)")  # fmt: skip
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by accelerate launch / torchrun
        from accelerate import Accelerator

        # every trainable parameter gets a gradient in every step (routed experts no token picked too, through
        # train_every_expert below), so DDP needs no search for unused ones after each backward
        accelerator = Accelerator(cpu=str(device) == "cpu" or not torch.cuda.is_available())  # CPU: gloo
        if accelerator.num_processes == 1:
            raise RuntimeError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but accelerate set up a single process")
        if batch_size % accelerator.num_processes:
            raise ValueError(
                f"batch_size {batch_size} (the global batch) must divide evenly over {accelerator.num_processes} "
                "processes"
            )
    main_process = accelerator is None or accelerator.is_main_process
    base_path = None
    if isinstance(model, (str, os.PathLike)):
        base_path = str(model)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(
            base_path, trust_remote_code=True, dtype=dtype if dtype == "auto" else getattr(torch, dtype)
        )
    elif merge_to is not None:
        raise ValueError("merge_to needs the base checkpoint path as `model` (the merge reads its files)")
    if tokenizer is None:
        raise ValueError("pass the tokenizer when `model` is an already loaded model")
    if accelerator is not None:
        device = accelerator.device
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cuda_graph not in ("auto", True, False):
        raise ValueError(f"cuda_graph must be 'auto', True or False, not {cuda_graph!r}")
    if cuda_graph is True and (device.type != "cuda" or accelerator is not None):
        processes = accelerator.num_processes if accelerator else 1
        raise ValueError(f"cuda_graph=True needs one process on a CUDA device (this run: {device.type}, "
                         f"{processes} processes); use 'auto'")  # fmt: skip
    graphs = cuda_graph is True or (cuda_graph == "auto" and device.type == "cuda" and accelerator is None)

    # Data first: a bad dataset fails before any training state exists.
    dataset = load_data(data, split=split, config_name=data_config, data_format=data_format)
    sequences = tokenize_dataset(
        dataset, tokenizer, max_length, text_column, messages_column, assistant_only=assistant_only
    )
    documents = len(sequences)
    if pack:
        sequences = pack_documents(sequences, max_length)
    per_epoch = math.ceil(len(sequences) / batch_size)
    total = int(steps) if steps is not None else max(1, int(math.ceil(epochs * per_epoch)))
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    names = lora_targets(model, targets)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_regex(model, names),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, config).to(device)
    fuse_lora(model)  # PEFT's layers, the adapter products fused where the kernels serve (fast_lora.py)
    peft_model = model
    if gradient_checkpointing:
        base = model.get_base_model()  # newer transformers call it activation checkpointing
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if accelerator is not None:  # processes whose tokens pick other experts must reduce the same set of gradients
        for moe in _moe_layers(model):
            moe.train_every_expert = True
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_key = {"base": base_path, "targets": names, "rank": rank, "alpha": alpha, "lr": lr, "steps": total,
               "batch_size": batch_size, "max_length": max_length, "pack": pack, "seed": seed,
               "examples": len(sequences)}  # fmt: skip
    if messages_column and assistant_only:  # only then: checkpoints of earlier runs on text data still resume
        run_key["assistant_only"] = True
    if fsdp:  # its checkpoints keep the optimizer state by parameter name, gathered whole
        run_key["fsdp"] = True
    state = None
    if resume:  # the adapter before sharding: fully_shard then splits the loaded weights
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise FileNotFoundError(f"resume: no checkpoint-N folder in {out}; start without --resume")
        state = _load_checkpoint(ckpt, peft_model, run_key)
    if fsdp:
        _shard(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def schedule(step):  # multiplier of lr for optimizer step `step` (0-based): linear warmup, then linear decay
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total - step) / max(1, total - warmup_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    log, first_step = [], 0
    if state is not None:
        _load_optimizer(model, opt, state["optimizer"], fsdp)
        sched.load_state_dict(state["scheduler"])
        log, first_step = list(state["log"]), int(state["step"])
    if accelerator is not None and not fsdp:  # data parallel (DDP); fully_shard has already wrapped an fsdp model
        model, opt = accelerator.prepare(model, opt)
    collate_fn = collate_packed if pack else collate
    clip = max_grad_norm if max_grad_norm else float("inf")  # inf: no clipping, the norm still logged
    runner = None if accelerator is not None else TrainStep(model, opt, clip, cuda_graph=graphs)
    stream = batches(sequences, batch_size, seed, skip=first_step)
    bar = None
    if progress and main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=first_step, desc="lora", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    seen_tokens = 0
    for step in range(first_step, total):
        epoch, items = next(stream)
        if accelerator is not None:  # this process's share of the global batch
            items = items[accelerator.process_index :: accelerator.num_processes] or items[:1]
        batch = collate_fn(items, pad_id)  # on the host
        t0 = time.perf_counter()
        current_lr = float(opt.param_groups[0]["lr"])  # a device tensor with CUDA graph steps
        if runner is not None:
            loss, grad_norm = runner(batch)
        else:
            loss = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # fsdp: DTensor
            loss = accelerator.reduce(loss.detach(), reduction="mean")
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step()
        if not torch.isfinite(loss):  # this step's update is applied; nothing is saved after it
            raise FloatingPointError(
                f"loss is {float(loss)} at step {step + 1}; resume from the last checkpoint with a lower lr"
            )
        tokens = int(batch["attention_mask"].sum())  # on the host: no sync
        if accelerator is not None:
            tokens = int(accelerator.reduce(torch.tensor(tokens, device=device), reduction="sum"))
        seen_tokens += tokens
        dt = time.perf_counter() - t0
        entry = {
            "step": step + 1,
            "epoch": epoch,
            "loss": float(loss.detach()),
            "lr": current_lr,
            "grad_norm": float(grad_norm),
            "tokens": tokens,
            "seconds": dt,
        }
        log.append(entry)
        if bar is not None:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{seen_tokens / max(elapsed, 1e-9):.0f}")
            bar.update(1)
        if save_every and (step + 1) % save_every == 0 and step + 1 < total:
            _save_checkpoint(out, step + 1, peft_model, opt, sched, log, run_key, keep_checkpoints, main_process, fsdp)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    model.eval()
    model = peft_model
    adapter = _full_adapter_state(model) if fsdp else None  # every process takes part in gathering the shards
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not main_process:
        return LoraResult(model=model, log=log, out=out, targets=names)

    if fsdp:
        model.save_pretrained(out, state_dict=adapter)
    else:
        model.save_pretrained(out)
    summary = {
        "base": base_path,
        "targets": targets,
        "adapted_modules": len(names),
        "trainable_parameters": sum(p.numel() for p in params),
        "examples": documents,
        "packed_rows": len(sequences) if pack else None,
        "processes": accelerator.num_processes if accelerator is not None else 1,
        "fsdp": fsdp,
        "resumed_at_step": first_step if resume else None,
        "steps": total,
        "batch_size": batch_size,
        "max_length": max_length,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "rank": rank,
        "alpha": alpha,
        "gradient_checkpointing": gradient_checkpointing,
        "cuda_graph": None
        if runner is None or not runner.cuda_graph
        else {"replayed_steps": runner.replayed, "eager_steps": runner.eager, "capture_error": runner.graph_error},
        "seed": seed,
        "seconds": elapsed,
        "tokens": seen_tokens,
        "tokens_per_second": seen_tokens / max(elapsed, 1e-9),
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "log": log,
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=1))
    if plot:
        plot_losses(log, out / "loss.png")

    merged = None
    if merge_to is not None:
        from kimi_linear_conversion.merge_lora import merge_lora

        merged = Path(merge_lora(_resolve_local(base_path), out, merge_to, overwrite=overwrite_merge))
    return LoraResult(model=model, log=log, out=out, merged=merged, targets=names)


def _moe_layers(model):
    """The model's MoE blocks (KimiLinearMoE, from whichever copy of the code the checkpoint runs)."""
    return [m for m in model.modules() if type(m).__name__ == "KimiLinearMoE"]


def _shard(peft_model):
    """Shard the model over the processes with torch's fully_shard: each decoder layer one unit, the rest (embedding,
    final norm, lm_head) the root's. The (frozen) routed experts run the per-expert loop: the grouped path keeps its
    expert weights as views into one stacked tensor, which must not happen to parameters fully_shard gathers and
    frees."""
    from torch.distributed.fsdp import fully_shard

    base = peft_model.get_base_model()
    for moe in _moe_layers(base):
        moe._drop_stacked()
        moe.grouped = False
    for module in base.modules():
        if type(module).__name__ == "KimiLinearDecoderLayer":
            fully_shard(module)
    fully_shard(base)


def _full_adapter_state(peft_model):
    """The adapter's weights as whole tensors (a collective: every process calls it)."""
    return {
        name: t.full_tensor() if hasattr(t, "full_tensor") else t
        for name, t in peft_model.state_dict().items()
        if "lora_" in name
    }


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.pt"


def _checkpoints(out):
    found = [(int(m.group(1)), p) for p in Path(out).glob("checkpoint-*") if (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE).exists()]


def latest_checkpoint(out):
    """The newest complete checkpoint-N folder in `out`, or None."""
    found = _checkpoints(out)
    return found[-1] if found else None


def _save_checkpoint(out, step, peft_model, opt, sched, log, run_key, keep, main=True, fsdp=False):
    """out/checkpoint-<step>: the adapter, optimizer, scheduler and step log; written beside and renamed into place,
    so a run killed mid-write leaves the previous checkpoint as the newest. Every process calls it (with fsdp the
    adapter and the optimizer state are gathered whole first, collectives); the main process writes."""
    if fsdp:
        adapter, optimizer = _full_adapter_state(peft_model), _full_optimizer_state(peft_model, opt)
    if not main:
        return
    final = Path(out) / f"checkpoint-{step}"
    tmp = Path(out) / f".checkpoint-{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if fsdp:
        peft_model.save_pretrained(tmp, state_dict=adapter)
    else:
        peft_model.save_pretrained(tmp)
        optimizer = opt.state_dict()
        for group in optimizer["param_groups"]:  # a device tensor with CUDA graph steps: saved as a number
            group["lr"] = float(group["lr"])
    state = {"step": step, "optimizer": optimizer, "scheduler": sched.state_dict(), "log": log, "run": run_key}
    torch.save(state, tmp / TRAINER_STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoints(out)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt, peft_model, run_key):
    """The checkpoint's trainer state, after checking it was written with these settings, with its adapter weights
    loaded into peft_model (not yet sharded)."""
    import peft
    from safetensors.torch import load_file

    state = torch.load(ckpt / TRAINER_STATE, weights_only=True)
    keys = run_key.keys() | state["run"].keys()
    diff = {k: {"checkpoint": state["run"].get(k), "now": run_key.get(k)} for k in keys
            if state["run"].get(k) != run_key.get(k)}  # fmt: skip
    if diff:
        raise ValueError(
            f"resume: {ckpt} was written by a run with other settings {diff}; resume with the same arguments, or "
            "start afresh in another --out folder"
        )
    peft.set_peft_model_state_dict(peft_model, load_file(ckpt / "adapter_model.safetensors"))
    return state


def _full_optimizer_state(model, opt):
    """The optimizer state of a sharded model, whole and keyed by parameter name, on the main process (empty on the
    others; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer(model, opt, saved, fsdp):
    """Restore an optimizer from a checkpoint: as saved, or with fsdp from the whole state each process read, split
    into its shards."""
    if not fsdp:
        opt.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optim_state_dict=saved, options=StateDictOptions(full_state_dict=True))


def plot_losses(log, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e["step"] for e in log], [e["loss"] for e in log], marker="." if len(log) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA fine-tuning")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder or cached Hub id (loaded with trust_remote_code)")
    ap.add_argument("--data", required=True, help="jsonl/json/parquet/csv/txt file or folder, or a cached Hub dataset")
    ap.add_argument("--out", required=True, help="folder for the adapter, train_log.json and loss.png")
    ap.add_argument("--data-format", help="datasets builder when the extension does not tell (json, parquet, text...)")
    ap.add_argument("--data-config", help="Hub dataset configuration name")
    ap.add_argument("--split", default="train", help="Hub dataset split (default: %(default)s)")
    ap.add_argument("--text-column", default="text", help="(default: %(default)s)")
    ap.add_argument("--messages-column", help="chat data: a column of [{role, content}] rendered by the chat template")
    ap.add_argument(
        "--train-on-prompts",
        action="store_true",
        help="chat data: train on every token of the rendered conversation, not only the assistant's",
    )
    ap.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=4, help="(default: %(default)s)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    group.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: %(default)s)")
    ap.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, then linear decay to 0")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="clip norm, 0 = off (default: %(default)s)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA r (default: %(default)s)")
    ap.add_argument("--alpha", type=float, default=16, help="LoRA alpha (default: %(default)s)")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default: %(default)s)")
    ap.add_argument(
        "--targets",
        default="all",
        help=f"preset ({', '.join(PRESETS)}) or comma list of presets / module names (default: %(default)s)",
    )
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in the backward")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="base dtype")
    ap.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--merge-to", help="also write base + adapter merged into this folder (released layout)")
    ap.add_argument("--overwrite-merge", action="store_true", help="replace a model already in --merge-to")
    ap.add_argument("--pack", action="store_true", help="pack whole documents into rows of --max-length tokens")
    ap.add_argument("--save-every", type=int, help="write a resumable checkpoint every N steps")
    ap.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default: %(default)s)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    ap.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun / accelerate launch: shard the model over the processes (torch's fully_shard) instead "
        "of copying it to each",
    )
    ap.add_argument(
        "--cuda-graph",
        choices=["auto", "on", "off"],
        default="auto",
        help="replay each step from a CUDA graph (batches without padding or packing, one GPU): auto where it can, "
        "on requires it (default: %(default)s)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    result = train_lora(
        args.model,
        args.data,
        args.out,
        text_column=args.text_column,
        messages_column=args.messages_column,
        assistant_only=not args.train_on_prompts,
        split=args.split,
        data_config=args.data_config,
        data_format=args.data_format,
        max_length=args.max_length,
        batch_size=args.batch_size,
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=args.targets,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        merge_to=args.merge_to,
        overwrite_merge=args.overwrite_merge,
        progress=not args.no_progress,
        pack=args.pack,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        fsdp=args.fsdp,
        cuda_graph={"auto": "auto", "on": True, "off": False}[args.cuda_graph],
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return  # one report, from the main process
    first, last = result.log[0]["loss"], result.log[-1]["loss"]
    steps = len(result.log)
    print(f"adapter: {result.out} ({len(result.targets)} modules, {steps} steps, loss {first:.4f} -> {last:.4f})")
    if result.merged is not None:
        print(f"merged: {result.merged}")


if __name__ == "__main__":
    main()
