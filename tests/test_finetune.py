"""finetune/lora.py on the tiny random checkpoint: the loss drops, every preset's adapters train, the saved adapter
reloads bit for bit, the merge equals the adapter, gradient checkpointing changes nothing, bad input fails clearly,
and the CLI runs end to end."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("datasets")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM  # noqa: E402

from kimi_linear_conversion.random_checkpoint import make_random_checkpoint  # noqa: E402
from kimi_linear_finetune.lora import collate, lora_targets, preset_modules, train_lora  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "conversion", "configs", "tiny.json")
PRESET_GROUPS = ("kda", "mla", "mlp", "shared", "experts")
FAST = {"max_length": 48, "batch_size": 8, "progress": False}


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    ckpt = make_random_checkpoint(TINY, root / "ckpt", seed=0)
    rng = random.Random(0)
    subjects, places = ["the cat", "the dog", "a cat", "a dog"], ["the mat", "the rug", "a mat"]
    with open(root / "data.jsonl", "w") as f:
        for _ in range(64):
            text = " ".join(f"{rng.choice(subjects)} sat on {rng.choice(places)}." for _ in range(2))
            f.write(json.dumps({"text": text, "id": 0}) + "\n")
    return root, ckpt, root / "data.jsonl"


@pytest.fixture(scope="module")
def trained(setup):
    root, ckpt, data = setup
    torch.set_num_threads(1)
    result = train_lora(
        str(ckpt), data, root / "adapter", targets="all", steps=12, lr=5e-3, merge_to=root / "merged", **FAST
    )
    return result


def fixed_batch(tokenizer_dir, data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = [json.loads(line)["text"] for line in open(data)][:6]
    return collate([tok(t)["input_ids"][:40] for t in lines], tok.pad_token_id)


@torch.no_grad()
def test_loss_drops_and_every_preset_trains(setup, trained):
    root, ckpt, data = setup
    losses = [e["loss"] for e in trained.log]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses

    batch = fixed_batch(ckpt, data)
    base = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
    assert trained.model(**batch).loss < base(**batch).loss - 0.2

    # lora_B starts at zero: a nonzero B received a nonzero gradient at least once.
    params = dict(trained.model.named_parameters())

    def b_of(module):
        return params[f"base_model.model.{module}.lora_B.default.weight"]

    trained_b = {}
    for preset in PRESET_GROUPS:
        names = preset_modules(base, preset)
        assert names, preset
        trained_b[preset] = {n: bool(b_of(n).abs().sum() > 0) for n in names}
    for preset in ("kda", "mla", "mlp", "shared"):
        assert all(trained_b[preset].values()), (preset, [n for n, ok in trained_b[preset].items() if not ok])
    # Routed experts: each expert trains all three projections or none (unselected); most experts are selected.
    experts = trained_b["experts"]
    by_expert = {}
    for name, ok in experts.items():
        by_expert.setdefault(name.rsplit(".", 1)[0], set()).add(ok)
    assert all(len(v) == 1 for v in by_expert.values())
    reached = [k for k, v in by_expert.items() if True in v]
    assert len(reached) >= 0.75 * len(by_expert), sorted(set(by_expert) - set(reached))
    # The router and every base weight stay frozen.
    assert not any(p.requires_grad for n, p in params.items() if "lora_" not in n)
    assert set(trained.targets) == {n for p in PRESET_GROUPS for n in preset_modules(base, p)}
    assert not any(n.endswith("block_sparse_moe.gate") for n in trained.targets)


@torch.no_grad()
def test_saved_adapter_reloads_bit_for_bit_and_merge_matches(setup, trained):
    root, ckpt, data = setup
    out = root / "adapter"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    batch = fixed_batch(ckpt, data)
    want = trained.model(**batch).logits

    base = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
    reloaded = peft.PeftModel.from_pretrained(base, out).eval()
    assert torch.equal(reloaded(**batch).logits, want)

    merged = AutoModelForCausalLM.from_pretrained(trained.merged, trust_remote_code=True).eval()
    assert rel_err(merged(**batch).logits, want) < 1e-5
    assert rel_err(merged(batch["input_ids"][:1]).logits, trained.model(batch["input_ids"][:1]).logits) < 1e-5


def test_gradient_checkpointing_gives_the_same_losses(setup):
    root, ckpt, data = setup
    runs = [
        train_lora(str(ckpt), data, root / f"gc{gc}", steps=2, lr=5e-3, gradient_checkpointing=gc, plot=False, **FAST)
        for gc in (False, True)
    ]
    assert all(layer.gradient_checkpointing for layer in runs[1].model.get_base_model().model.layers)
    plain, ckpt_losses = ([e["loss"] for e in r.log] for r in runs)
    assert len(plain) == 2
    assert all(abs(a - b) < 1e-5 for a, b in zip(plain, ckpt_losses)), (plain, ckpt_losses)


def test_clear_errors(setup, tmp_path):
    import datasets

    root, ckpt, data = setup
    with pytest.raises(ValueError, match=r"no text column 'content'.*\['text', 'id'\]"):
        train_lora(str(ckpt), data, tmp_path / "a", text_column="content", steps=1, **FAST)
    with pytest.raises(ValueError, match="empty"):
        train_lora(str(ckpt), datasets.Dataset.from_dict({"text": []}), tmp_path / "b", steps=1, **FAST)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        train_lora(str(ckpt), tmp_path / "empty.txt", tmp_path / "c", steps=1, **FAST)
    with pytest.raises(ValueError, match="chat template"):
        train_lora(str(ckpt), data, tmp_path / "d", messages_column="text", steps=1, **FAST)
    with pytest.raises(ValueError, match="'no_such_proj' matches no module"):
        train_lora(str(ckpt), data, tmp_path / "e", targets="kda,no_such_proj", steps=1, **FAST)
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
    with pytest.raises(ValueError, match="'gate' matches no module.*not nn.Linear"):
        lora_targets(model, "gate")
    assert lora_targets(model, "kv_b_proj") == [f"model.layers.{i}.self_attn.kv_b_proj" for i in (3, 7)]
    # q_proj of KDA and MLA layers are told apart
    assert "model.layers.3.self_attn.q_proj" in lora_targets(model, "mla")
    assert "model.layers.3.self_attn.q_proj" not in lora_targets(model, "kda")
    assert not (tmp_path / "a").exists() and not (tmp_path / "e").exists()


def test_cli_end_to_end(setup, tmp_path):
    root, ckpt, data = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "finetune", "lora.py"), "--model", str(ckpt), "--data", str(data)]
    cmd += ["--out", str(tmp_path / "cli"), "--steps", "2", "--max-length", "32", "--targets", "kda,experts"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "cli"
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss.png", "train_log.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = json.loads((out / "train_log.json").read_text())
    assert [e["step"] for e in log["log"]] == [1, 2]
    assert all(isinstance(e["loss"], float) for e in log["log"])
    assert "loss" in proc.stderr and "tok_s" in proc.stderr  # the progress bar


def test_chat_messages_use_the_chat_template(setup, tmp_path):
    import datasets
    from transformers import AutoTokenizer

    root, ckpt, data = setup
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"a cat sat {i}"}] for i in range(8)]
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
    result = train_lora(
        model, datasets.Dataset.from_dict({"messages": chats}), tmp_path / "chat", tokenizer=tok,
        messages_column="messages", targets="mla", steps=1, plot=False, **FAST,
    )  # fmt: skip
    assert result.log[0]["tokens"] == 8 * len(tok("<user>hi</s><assistant>a cat sat 0</s>")["input_ids"])
