"""Shared fixtures: tiny configs in the released config.json format, models built from them, and a byte-level
tokenizer made with the `tokenizers` library (a real tokenizer; nothing is downloaded)."""

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kimi_linear.configuration_kimi_linear import KimiLinearConfig  # noqa: E402
from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM  # noqa: E402


def tiny_config_dict(**overrides):
    """A small model in the released config.json format: 3:1 KDA:MLA, dense layer 0, MoE after."""
    d = json.loads((ROOT / "conversion" / "configs" / "tiny.json").read_text())
    d.update(overrides)
    return d


def tiny_config(**overrides):
    return KimiLinearConfig(**tiny_config_dict(**overrides))


def build_model(seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    return KimiLinearForCausalLM(tiny_config(**overrides)).to(dtype).eval()


@pytest.fixture
def tiny_model():
    return build_model()


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
