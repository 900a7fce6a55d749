"""The embedded default model in default_model/ (trained by finetune/pretrain_embedded.py on the lent GPU): it loads the
way the README's main command loads it, its code files are this checkout's, and it has learned the corpus's language
(its loss on Shakespeare is far below the same tokens shuffled)."""

import filecmp
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

MODEL = ROOT / "default_model"
pytestmark = pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="no default_model/ in this checkout")

PASSAGE = """HAMLET.
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles,
And by opposing end them.
"""


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL, trust_remote_code=True, dtype=torch.float32).eval()
    return tok, model


def test_code_files_are_this_checkouts():
    # trust_remote_code runs the folder's own copies: they must be the code the tests here test
    for name in ("configuration_kimi_linear.py", "modeling_kimi_linear.py"):
        assert filecmp.cmp(ROOT / name, MODEL / name, shallow=False), f"default_model/{name} differs: copy it over"


def test_shipped_size_and_recorded_results():
    size = sum(f.stat().st_size for f in MODEL.glob("*.safetensors"))
    assert size <= 30e6
    recorded = json.loads((MODEL / "pretrain_results.json").read_text())
    assert recorded["shipped"]["safetensors_bytes"] == size
    kinds = recorded["models"]
    assert kinds["hybrid"]["layers"].count("M") * 3 == kinds["hybrid"]["layers"].count("K")  # 3 KDA : 1 MLA
    assert 10e6 <= kinds["hybrid"]["parameters"] <= 30e6


@torch.no_grad()
def test_loss_on_shakespeare_is_far_below_the_same_tokens_shuffled(loaded):
    tok, model = loaded
    ids = torch.tensor([[tok.bos_token_id, *tok(PASSAGE)["input_ids"]]])
    shuffled = ids.clone()
    shuffled[0, 1:] = ids[0, 1:][torch.randperm(ids.shape[1] - 1, generator=torch.Generator().manual_seed(0))]

    def loss(x):
        return torch.nn.functional.cross_entropy(model(x).logits[0, :-1], x[0, 1:]).item()

    text, noise = loss(ids), loss(shuffled)
    uniform = torch.log(torch.tensor(float(len(tok)))).item()
    assert text < 4.0 < uniform  # a random model sits near log(vocab) = 8.3
    assert noise - text > 1.5, (text, noise)


def test_readme_main_command_streams_text_from_the_trained_model():
    done = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "ROMEO.", "--greedy", "--max-new-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "random" not in done.stderr.lower(), done.stderr  # the stand-in's warning
    assert done.stdout.startswith("ROMEO.") and len(done.stdout.split()) >= 10, done.stdout
