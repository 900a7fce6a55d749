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


def _importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


# transformers' built-in Kimi Linear (>= 5.17), the independent second implementation, when it can run here: it binds
# fla's Triton kernels whenever fla imports, and then fails on CPU tensors.
import transformers  # noqa: E402

Builtin = getattr(transformers, "KimiLinearForCausalLM", None)
needs_builtin = pytest.mark.skipif(
    Builtin is None or _importable("fla"),
    reason="needs transformers' built-in kimi_linear (>= 5.17), and fla not importable (it would send CPU tensors "
    "to Triton)",
)


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


def rel_rms(a, b):
    """RMS of a - b over RMS of b, in float64 on a's device."""
    a, b = a.double(), b.double().to(a.device)
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def pytest_runtest_logreport(report):
    """With KIMI_REPORT_FAILURES_AT_ONCE=1 (.ci/gpu sets it), a failure's traceback is printed when it happens, not at
    the end: a run cut off by a time limit (the device machine's) still shows why each failed test failed."""
    if report.failed and os.environ.get("KIMI_REPORT_FAILURES_AT_ONCE") == "1":
        import sys

        print(f"\nFAILED {report.nodeid} ({report.when}):\n{report.longreprtext}\n", file=sys.stderr, flush=True)
