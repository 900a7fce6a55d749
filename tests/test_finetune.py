"""finetune/lora.py on the tiny random checkpoint: the loss drops, every preset's adapters train, the saved adapter
reloads bit for bit, the merge equals the adapter, gradient checkpointing changes nothing, bad input fails clearly,
and the CLI runs end to end."""

import json
import os
import random
import shutil
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_lora(
            str(ckpt), data, root / "adapter", targets="all", steps=12, lr=5e-3, merge_to=root / "merged", **FAST
        )
    finally:
        torch.set_num_threads(threads)


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


def test_packed_rows_train_like_separate_rows(setup, tmp_path):
    # One step over the whole dataset either way: the first loss (mean over the same predicted tokens) and the
    # gradient norm (the same gradients) agree; the packed run computes on far fewer rows.
    root, ckpt, data = setup
    kw = dict(targets="all", steps=1, max_length=160, progress=False, plot=False, lr=1e-3)
    separate = train_lora(str(ckpt), data, tmp_path / "sep", batch_size=64, **kw)
    packed = train_lora(str(ckpt), data, tmp_path / "packed", batch_size=64, pack=True, **kw)
    a, b = separate.log[0], packed.log[0]
    assert abs(a["loss"] - b["loss"]) < 1e-5 * a["loss"]
    assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]
    summary = json.loads((tmp_path / "packed" / "train_log.json").read_text())
    assert summary["examples"] == 64 and summary["packed_rows"] < 64


def test_collate_packed_marks_documents():
    from kimi_linear_finetune.lora import collate_packed, pack_documents

    rows = pack_documents([[5, 6, 7], [8, 9], [10, 11, 12, 13]], max_length=5)
    assert rows == [[[5, 6, 7], [8, 9]], [[10, 11, 12, 13]]]
    batch = collate_packed(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 11, 12, 13, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT = [
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "a cat sat"},
    {"role": "user", "content": "and then?"},
    {"role": "assistant", "content": "it slept"},
]


@pytest.fixture
def chat_tokenizer(setup):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup[1])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _trained_text(tok, batch, row=0):
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    return tok.decode(ids[labels != -100].tolist())


def test_chat_trains_only_the_assistant_tokens(chat_tokenizer):
    import datasets

    from kimi_linear_finetune.lora import collate_packed, pack_documents, tokenize_dataset

    tok = chat_tokenizer
    data = datasets.Dataset.from_dict({"messages": [CHAT, CHAT[:1], CHAT[:2]]})
    docs = tokenize_dataset(data, tok, 256, messages_column="messages")
    assert len(docs) == 2  # the conversation without an assistant message is dropped
    batch = collate(docs, tok.pad_token_id)
    # the tokens whose prediction is trained are the assistant's replies (after the generation prompt), nothing else
    assert _trained_text(tok, batch, 0) == "a cat sat</s>it slept</s>"
    assert _trained_text(tok, batch, 1) == "a cat sat</s>"
    everything = tokenize_dataset(data, tok, 256, messages_column="messages", assistant_only=False)
    assert len(everything) == 3 and everything[0] == list(docs[0])
    assert _trained_text(tok, collate(everything, tok.pad_token_id), 0) == tok.apply_chat_template(CHAT, tokenize=False)
    # packed: the same trained tokens per document (a document's first token is never a target)
    packed = collate_packed(pack_documents(docs, 256), tok.pad_token_id)
    assert _trained_text(tok, packed) == "a cat sat</s>it slept</s>a cat sat</s>"
    # truncation that cuts every assistant token drops the example; no example left is an error that says why
    prompt = len(tok(tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True))["input_ids"])
    with pytest.raises(ValueError, match="assistant message"):
        tokenize_dataset(data, tok, prompt, messages_column="messages")
    with pytest.raises(ValueError, match="assistant message"):
        tokenize_dataset(datasets.Dataset.from_dict({"messages": [CHAT[:1]]}), tok, 256, messages_column="messages")


def test_chat_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer):
    import datasets

    from kimi_linear_finetune.lora import tokenize_dataset

    tok = chat_tokenizer
    tok.chat_template = "[{{ messages | length }}]" + CHAT_TEMPLATE  # the header changes as the conversation grows
    data = datasets.Dataset.from_dict({"messages": [CHAT]})
    with pytest.raises(ValueError, match="train-on-prompts"):
        tokenize_dataset(data, tok, 256, messages_column="messages")
    assert len(tokenize_dataset(data, tok, 256, messages_column="messages", assistant_only=False)) == 1


def _cli(ckpt, data, out, *extra):
    return [sys.executable, "-m", "kimi_linear_finetune.lora", "--model", str(ckpt), "--data", str(data),
            "--out", str(out), "--max-length", "48", "--batch-size", "4", "--lr", "3e-3", "--no-progress",
            *extra]  # fmt: skip


def test_a_killed_run_resumes_at_the_same_step_and_reaches_the_same_losses(setup, tmp_path):
    import signal
    import time

    root, ckpt, data = setup
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    steps = ["--steps", "80"]
    whole = subprocess.run(_cli(ckpt, data, tmp_path / "whole", *steps), env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(ckpt, data, out, *steps, "--save-every", "5"), env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (out / "checkpoint-10" / "trainer_state.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint-10 within 4 minutes"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "train_log.json").exists(), "the run finished before it was killed; the test proves nothing"
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert checkpoints and len(checkpoints) <= 2  # the newest two are kept

    resumed = subprocess.run(_cli(ckpt, data, out, *steps, "--save-every", "5", "--resume"), env=env,
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = json.loads((tmp_path / "whole" / "train_log.json").read_text())
    got = json.loads((out / "train_log.json").read_text())
    assert got["resumed_at_step"] == checkpoints[-1] >= 10
    assert [e["step"] for e in got["log"]] == list(range(1, 81))
    for a, b in zip(want["log"], got["log"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)

    # resuming with other settings is refused, naming them
    other = subprocess.run(_cli(ckpt, data, out, "--steps", "80", "--rank", "4", "--resume"), env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert other.returncode != 0 and "other settings" in other.stderr and "'rank'" in other.stderr


def test_two_processes_data_parallel_and_sharded_follow_the_one_process_loss_curve(setup, tmp_path):
    from safetensors.torch import load_file

    root, ckpt, data = setup
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # adapters on every part, routed experts included (the processes' tokens pick different experts)
    steps = ["--steps", "12", "--batch-size", "8"]
    one = subprocess.run(_cli(ckpt, data, tmp_path / "one", *steps), env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "train_log.json").read_text())
    la = [e["loss"] for e in a["log"]]
    # torchrun sets the same WORLD_SIZE / RANK environment as `accelerate launch --multi_gpu` (which on CPUs wants
    # MPI); the script's Accelerator then runs data parallel over gloo, or with --fsdp shards the model (fully_shard)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "kimi_linear_finetune.lora"]  # fmt: skip
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp", "--save-every", "6"])):
        two = subprocess.run(launch + _cli(ckpt, data, tmp_path / name, *steps, *extra)[3:], env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert two.returncode == 0, two.stderr[-3000:]
        b = json.loads((tmp_path / name / "train_log.json").read_text())
        assert b["processes"] == 2 and a["processes"] == 1 and b["fsdp"] == (name == "fsdp")
        lb = [e["loss"] for e in b["log"]]
        assert sum(e["tokens"] for e in a["log"]) == sum(e["tokens"] for e in b["log"])
        # each process averages over its own tokens: equal to the one-process mean up to the rows' length spread
        assert max(abs(x - y) / x for x, y in zip(la, lb)) < 0.02, (name, la, lb)
        assert lb[-1] < lb[0] - 0.2
    # sharding changes where the weights live, not what is computed: the sharded run's adapter, saved whole, is the
    # data-parallel run's (and has the one-process run's shapes)
    adapters = {n: load_file(tmp_path / n / "adapter_model.safetensors") for n in ("one", "ddp", "fsdp")}
    assert adapters["fsdp"].keys() == adapters["ddp"].keys() == adapters["one"].keys()
    for key, w in adapters["fsdp"].items():
        assert w.shape == adapters["one"][key].shape, key
    flat = {n: torch.cat([t.flatten() for _, t in sorted(d.items())]) for n, d in adapters.items()}
    assert rel_err(flat["fsdp"], flat["ddp"]) < 1e-4
    assert rel_err(flat["fsdp"], flat["one"]) < 0.05

    # --fsdp with checkpoints: a run resumed from the sharded run's checkpoint-6 (its adapter and its optimizer state,
    # gathered whole and split again), copied into a fresh folder, takes the same losses from step 7 on
    resumed = tmp_path / "fsdp-resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-6", resumed / "checkpoint-6")
    again = subprocess.run(launch + _cli(ckpt, data, resumed, *steps, "--fsdp", "--save-every", "6", "--resume")[3:],
                           env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    want = json.loads((tmp_path / "fsdp" / "train_log.json").read_text())["log"]
    got = json.loads((resumed / "train_log.json").read_text())
    assert got["resumed_at_step"] == 6 and [e["step"] for e in got["log"]] == list(range(1, 13))
    for x, y in zip(want[6:], got["log"][6:]):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
    # its optimizer state is kept by parameter name: resuming it in one process without --fsdp is refused by name
    other = subprocess.run(_cli(ckpt, data, resumed, *steps, "--resume"), env=env, capture_output=True, text=True)
    assert other.returncode != 0 and "other settings" in other.stderr and "'fsdp'" in other.stderr


def test_fsdp_refusal_names_the_way_out(setup, tmp_path):
    root, ckpt, data = setup
    with pytest.raises(ValueError, match="several processes"):
        train_lora(str(ckpt), data, tmp_path / "x", steps=1, fsdp=True, **FAST)
