"""finetune/fast_lora.py on CPU: which calls take the fused path (the kernels themselves are tested against float64
in test_fused_kernels.py through Triton's interpreter and in test_gpu.py compiled), and that PEFT's own machinery
(forward, saving, reloading, merging) is untouched by the class swap."""

import peft
import pytest
import torch

import kimi_linear_kernels as kernels
from conftest import build_model
from kimi_linear_finetune import fast_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "kv_b_proj"]


def lora_model(**config):
    torch.manual_seed(0)
    model = peft.get_peft_model(build_model(), peft.LoraConfig(r=4, target_modules=TARGETS, **config))
    for name, p in model.named_parameters():  # B starts at zero, which would hide the adapters from the logits
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def adapted(model):
    return sum(1 for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))


def test_fuse_swaps_every_lora_linear_and_is_undone():
    model = lora_model()
    n = adapted(model)
    assert n > 0
    assert fast_lora.fuse_lora(model) == n
    assert fast_lora.fuse_lora(model) == 0  # idempotent
    assert all(isinstance(m, peft.tuners.lora.Linear) for m in model.modules() if type(m).__name__ == "FusedLoraLinear")
    assert fast_lora.unfuse_lora(model) == n


def test_cpu_calls_run_pefts_forward_and_files_are_unchanged(tmp_path):
    # On CPU nothing serves: the logits are PEFT's exactly, the adapter saved from a fused model reloads into a plain
    # one with identical logits, and merging gives the same logits too
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    model = lora_model()
    with torch.no_grad():
        want = model(ids).logits
    fast_lora.fuse_lora(model)
    assert fast_lora.fused_layers(model) == 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    model.save_pretrained(tmp_path)
    again = peft.PeftModel.from_pretrained(build_model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)
        merged = model.merge_and_unload()
        assert (merged(ids).logits - want).abs().max() < 1e-4


@pytest.fixture
def serving(monkeypatch):
    """The kernels' own check passes on CPU tensors, so that the layer's gating alone decides (the fused call itself
    needs CUDA and is not made here)."""
    monkeypatch.setattr(kernels, "lora_serves", lambda *a: True)


def test_gating_takes_only_the_plain_case(serving):
    model = lora_model()
    fast_lora.fuse_lora(model)
    n = adapted(model)
    assert fast_lora.fused_layers(model) == n
    layer = next(m for m in model.modules() if type(m).__name__ == "FusedLoraLinear")
    x = torch.zeros(1, layer.in_features)
    assert layer._fused_args(x, (), {}) is not None
    assert layer._fused_args(x, (), {"adapter_names": ["default"]}) is None  # mixed adapter batches
    with model.disable_adapter():
        assert layer._fused_args(x, (), {}) is None
    layer.merge()
    assert layer._fused_args(x, (), {}) is None
    layer.unmerge()
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=TARGETS))
    model.base_model.set_adapter(["default", "second"])
    assert layer._fused_args(x, (), {}) is None  # two adapters at once


def test_gating_leaves_dropout_and_dora_to_peft(serving):
    model = lora_model(lora_dropout=0.1)
    fast_lora.fuse_lora(model)
    model.train()
    assert fast_lora.fused_layers(model) == 0  # dropout while training
    model.eval()
    assert fast_lora.fused_layers(model) == adapted(model)  # dropout off in eval
    dora = lora_model(use_dora=True)
    fast_lora.fuse_lora(dora)
    assert fast_lora.fused_layers(dora) == 0
