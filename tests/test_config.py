"""The config reads the released config.json verbatim, writes the same keys back and refuses inconsistent ones."""

import json

import pytest

from conftest import SHARED, tiny_config_dict
from kimi_linear.configuration_kimi_linear import KDA, MLA, KimiLinearConfig

RELEASED = json.loads((SHARED / "reference" / "official_config_48b_a3b.json").read_text())


def test_released_config_derives_layer_kinds():
    cfg = KimiLinearConfig(**RELEASED)
    mla = RELEASED["linear_attn_config"]["full_attn_layers"]
    assert [i + 1 for i, kind in enumerate(cfg.layer_types) if kind == MLA] == mla
    assert cfg.layer_types.count(KDA) == 20
    assert cfg.mlp_types == ["dense"] + ["moe"] * 26


def test_save_writes_the_released_keys_back(tmp_path):
    KimiLinearConfig(**RELEASED).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key, value in RELEASED.items():
        if key in ("transformers_version", "auto_map"):
            continue
        assert saved[key] == value, key
    # Derived lists stay out of config.json: other readers would not know them.
    assert "layer_types" not in saved and "mlp_types" not in saved
    again = KimiLinearConfig.from_pretrained(tmp_path)
    assert again.layer_types == KimiLinearConfig(**RELEASED).layer_types


def test_builtin_transformers_class_reads_what_we_save(tmp_path):
    transformers = pytest.importorskip("transformers")
    builtin = getattr(transformers, "KimiLinearConfig", None)
    if builtin is None:
        pytest.skip("this transformers has no built-in kimi_linear")
    KimiLinearConfig(**RELEASED).save_pretrained(tmp_path)
    theirs = builtin.from_pretrained(tmp_path)
    assert [t == "full_attention" for t in theirs.layer_types] == [
        t == MLA for t in KimiLinearConfig(**RELEASED).layer_types
    ]
    assert theirs.num_experts_per_tok == 8 and theirs.kv_lora_rank == 512


def _lac(**changes):
    lac = dict(tiny_config_dict()["linear_attn_config"])
    lac.update(changes)
    return lac


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"linear_attn_config": _lac(kda_layers=[1, 2, 3, 5, 6])}, "missing: \\[7\\]"),
        ({"linear_attn_config": _lac(kda_layers=[1, 2, 3, 4, 5, 6, 7])}, "listed twice: \\[4\\]"),
        ({"linear_attn_config": _lac(full_attn_layers=[4, 8, 9])}, "out of range: \\[9\\]"),
        ({"linear_attn_config": _lac(kda_layers=[0, 1, 2, 3, 5, 6, 7])}, "out of range: \\[0\\]"),
        ({"num_experts_per_token": 9}, "num_experts_per_token \\(9\\)"),
        ({"hidden_size": 66}, "divisible by num_attention_heads"),
        ({"head_dim": 32}, "head_dim \\(32\\)"),
        ({"moe_router_activation_func": "relu"}, "moe_router_activation_func 'relu' is unknown"),
        ({"num_expert_group": 3}, "divisible by num_expert_group"),
        ({"num_expert_group": 2, "topk_group": 3}, "topk_group \\(3\\)"),
        ({"mla_use_nope": False}, "mla_use_nope=False"),
        ({"linear_attn_config": {"kda_layers": [1]}}, "missing 'full_attn_layers'"),
    ],
)
def test_inconsistent_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        KimiLinearConfig(**tiny_config_dict(**overrides))
