"""conversion/convert_layout.py: released <-> transformers built-in layout. Expectations are computed here with
torch.cat / torch.stack from the source tensors, and checked against transformers' own built-in class."""

import json
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import ROOT, Builtin, needs_builtin, rel_err, tiny_config_dict
from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM
from kimi_linear_conversion.convert_layout import convert_layout, main
from kimi_linear_conversion.io import CheckpointError, CheckpointReader, parse_size
from kimi_linear_conversion.random_checkpoint import make_random_checkpoint

TINY = ROOT / "conversion" / "configs" / "tiny.json"
E = tiny_config_dict()["num_experts"]
KDA_LAYERS = [i - 1 for i in tiny_config_dict()["linear_attn_config"]["kda_layers"]]
MOE_LAYERS = range(tiny_config_dict()["first_k_dense_replace"], tiny_config_dict()["num_hidden_layers"])


def read_all(folder):
    reader = CheckpointReader(folder)
    return dict(reader.items())


def rewrite(folder, edit):
    """Apply edit(dict of tensors) to a single-file checkpoint in place."""
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The tiny checkpoint (released layout) with a non-zero router correction bias."""
    path = make_random_checkpoint(TINY, tmp_path_factory.mktemp("ckpt") / "released", seed=3)

    def bias(tensors):
        g = torch.Generator().manual_seed(4)
        for name in tensors:
            if name.endswith("e_score_correction_bias"):
                tensors[name] = torch.randn(tensors[name].shape, generator=g) * 0.1

    rewrite(path, bias)
    return path


@pytest.fixture(scope="module")
def builtin(released, tmp_path_factory):
    """released -> builtin, in several shards (exercises the index on both sides)."""
    return convert_layout(released, tmp_path_factory.mktemp("b") / "builtin", "builtin", 300_000, progress=False)


def expected_builtin(src):
    """The built-in layout of `src`, computed independently with torch.cat / torch.stack."""
    out = {}
    for name, t in src.items():
        if ".experts." in name or "_conv1d." in name:
            continue
        name = name.replace(".block_sparse_moe.", ".mlp.")
        for g in ("f_a_proj.weight", "f_b_proj.weight", "dt_bias", "A_log"):
            name = name.replace(f"self_attn.{g}", f"self_attn.forget_gate.{g}")
        out[name] = t
    for i in KDA_LAYERS:
        p = f"model.layers.{i}.self_attn."
        out[p + "conv1d.weight"] = torch.cat([src[p + f"{c}_conv1d.weight"] for c in "qkv"], dim=0)
    for i in MOE_LAYERS:
        p = f"model.layers.{i}.block_sparse_moe.experts."
        w = {k: [src[p + f"{e}.{k}.weight"] for e in range(E)] for k in ("w1", "w2", "w3")}
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w1, w3], dim=0) for w1, w3 in zip(w["w1"], w["w3"])]
        )
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(w["w2"])
    return out


def assert_same_tensors(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


# --- (a) bit-identical round trip, every tensor ------------------------------------------------------------------


def test_builtin_layout_is_cat_and_stack_of_released(released, builtin):
    assert (builtin / "model.safetensors.index.json").exists()  # sharded
    assert_same_tensors(read_all(builtin), expected_builtin(read_all(released)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_identical(released, builtin, tmp_path, dtype):
    src = released
    if dtype != "float32":
        src = make_random_checkpoint(TINY, tmp_path / "src", seed=5, dtype=dtype, tokenizer=False)
        builtin = convert_layout(src, tmp_path / "b", "builtin", progress=False)
    back = convert_layout(builtin, tmp_path / "back", "released", progress=False)
    assert_same_tensors(read_all(back), read_all(src))
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for name in ("generation_config.json", "configuration_kimi_linear.py", "modeling_kimi_linear.py"):
        assert (back / name).read_bytes() == (src / name).read_bytes()
    if dtype == "float32":
        assert (back / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    # the tensors are bit-identical (above); the files are not byte-identical, because io.ShardWriter streams
    # tensors in reading order while the safetensors library sorts them within a file


def test_builtin_config(builtin):
    cfg = json.loads((builtin / "config.json").read_text())
    assert "auto_map" not in cfg and not (builtin / "modeling_kimi_linear.py").exists()
    assert cfg["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"
    ]
    assert cfg["mlp_layer_types"] == ["dense"] + ["sparse"] * 7
    assert (cfg["linear_head_dim"], cfg["linear_num_heads"], cfg["linear_conv_kernel_dim"]) == (16, 4, 4)


# --- (b) the built-in class loads the builtin-layout output --------------------------------------------------------


def ids(seed, length=40):
    return torch.randint(3, 512, (2, length), generator=torch.Generator().manual_seed(seed))


@needs_builtin
def test_builtin_class_loads_converted_checkpoint(released, builtin):
    theirs, info = Builtin.from_pretrained(builtin, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = KimiLinearForCausalLM.from_pretrained(released, dtype=torch.float32).eval()
    with torch.no_grad():
        x = ids(1)
        assert rel_err(theirs.eval()(x).logits, ours(x).logits) < 1e-5


@needs_builtin
@pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")  # the released config has it
def test_same_tensors_as_transformers_own_conversion(released, builtin, tmp_path):
    """transformers converts the released checkpoint when loading it; its in-memory tensors must equal ours."""
    theirs = Builtin.from_pretrained(released, dtype=torch.float32)
    theirs.save_pretrained(tmp_path / "theirs", save_original_format=False)
    assert_same_tensors(read_all(builtin), read_all(tmp_path / "theirs"))


# --- (c) a checkpoint saved by the built-in class itself -> released layout -> our class ---------------------------


def builtin_native_config():
    """A config written the built-in way (its own key names, layer_types, q_lora_rank set), not from a released one."""
    kinds = ["linear_attention", "linear_attention", "full_attention", "linear_attention", "full_attention"]
    return transformers.KimiLinearConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, num_local_experts=6, num_experts_per_tok=2, linear_head_dim=16,
        linear_num_heads=4, layer_types=kinds, mlp_layer_types=["dense", "dense", "sparse", "sparse", "sparse"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


@needs_builtin
@pytest.mark.parametrize("original_format", [True, False], ids=["save_default", "save_builtin_layout"])
@pytest.mark.parametrize("native", [False, True], ids=["released_config", "builtin_config"])
def test_checkpoint_saved_by_builtin_class_loads_in_ours(tmp_path, original_format, native):
    cfg = (
        builtin_native_config()
        if native
        else transformers.KimiLinearConfig(**{k: v for k, v in tiny_config_dict().items() if k != "rope_scaling"})
    )
    torch.manual_seed(6)
    theirs = Builtin(cfg).eval()
    with torch.no_grad():
        for name, buf in theirs.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "saved", save_original_format=original_format)
    out = convert_layout(tmp_path / "saved", tmp_path / "released", "released", progress=False)
    ours = KimiLinearForCausalLM.from_pretrained(out).eval()  # strict: a missing / unexpected tensor raises
    cfg_out = json.loads((out / "config.json").read_text())
    assert "layer_types" not in cfg_out and "auto_map" in cfg_out
    if native:
        assert cfg_out["linear_attn_config"]["kda_layers"] == [1, 2, 4]
        assert cfg_out["linear_attn_config"]["full_attn_layers"] == [3, 5]
        assert (cfg_out["first_k_dense_replace"], cfg_out["num_experts"], cfg_out["q_lora_rank"]) == (2, 6, 24)
    with torch.no_grad():
        x = ids(2)
        assert rel_err(ours(x).logits, theirs(x).logits) < 1e-5


# --- (d) errors name the tensor and leave nothing behind -------------------------------------------------------------


def broken_copy(src, tmp_path, edit):
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    rewrite(dst, edit)
    return dst


def single_file(folder, tmp_path):
    """The checkpoint in one model.safetensors (the builtin fixture is sharded)."""
    dst = tmp_path / "single"
    convert_layout(folder, dst, "builtin", progress=False)
    return dst


EXPERT = "model.layers.2.block_sparse_moe.experts.5.w1.weight"
RELEASED_ERRORS = {
    "unknown": (lambda t: t.__setitem__("model.layers.1.self_attn.bogus.weight", torch.zeros(2)), "bogus.weight"),
    "missing_expert": (lambda t: t.pop(EXPERT), EXPERT),
    "missing_tensor": (lambda t: t.pop("model.layers.3.self_attn.o_proj.weight"), "layers.3.self_attn.o_proj"),
    "expert_shape": (lambda t: t.__setitem__(EXPERT, torch.zeros(31, 64)), EXPERT),
    "conv_shape": (
        lambda t: t.__setitem__("model.layers.1.self_attn.k_conv1d.weight", torch.zeros(64, 1, 3)),
        "model.layers.1.self_attn.k_conv1d.weight",
    ),
    "extra_expert": (
        lambda t: t.__setitem__("model.layers.2.block_sparse_moe.experts.8.w2.weight", torch.zeros(64, 32)),
        "experts.8.w2.weight",
    ),
    "both_layouts": (
        lambda t: t.__setitem__("model.layers.1.self_attn.conv1d.weight", torch.zeros(192, 1, 4)),
        "model.layers.1.self_attn",
    ),
    "wrong_for_config": (lambda t: t.__setitem__("model.layers.9.input_layernorm.weight", torch.ones(64)), "layers.9"),
}
BUILTIN_ERRORS = {
    "stacked_experts": (
        lambda t: t.__setitem__("model.layers.2.mlp.experts.gate_up_proj", torch.zeros(E - 1, 64, 64)),
        "model.layers.2.mlp.experts.gate_up_proj",
    ),
    "odd_split": (
        lambda t: t.__setitem__("model.layers.1.self_attn.conv1d.weight", torch.zeros(191, 1, 4)),
        "model.layers.1.self_attn.conv1d.weight",
    ),
    "missing_stack": (lambda t: t.pop("model.layers.4.mlp.experts.down_proj"), "model.layers.4.block_sparse_moe"),
}


@pytest.mark.parametrize("case", list(RELEASED_ERRORS) + list(BUILTIN_ERRORS))
def test_errors_name_the_tensor_and_leave_nothing(released, builtin, tmp_path, case):
    if case in RELEASED_ERRORS:
        (edit, needle), src, to = RELEASED_ERRORS[case], released, "builtin"
    else:
        (edit, needle), src, to = BUILTIN_ERRORS[case], single_file(released, tmp_path), "released"
    src = broken_copy(src, tmp_path, edit)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        convert_layout(src, out, to, progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_error_message_names_the_missing_expert(released, tmp_path):
    src = broken_copy(released, tmp_path, lambda t: t.pop(EXPERT))
    with pytest.raises(CheckpointError) as err:
        convert_layout(src, tmp_path / "out", "builtin", progress=False)
    assert str(err.value) == f"tensor {EXPERT} is missing (needed to build model.layers.2.mlp.experts.gate_up_proj)."


def test_refuses_output_that_holds_a_model(released, builtin, tmp_path):
    before = (builtin / "config.json").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a model"):
        convert_layout(released, builtin, "builtin", progress=False)
    assert (builtin / "config.json").read_bytes() == before
    out = convert_layout(released, tmp_path / "o", "released", progress=False)  # same layout: a plain copy
    convert_layout(builtin, out, "released", overwrite=True, progress=False)
    assert_same_tensors(read_all(out), read_all(released))


def test_cli(released, tmp_path, capsys):
    main([str(released), str(tmp_path / "b"), "--to", "builtin", "--max-shard-size", "200KB", "--no-progress"])
    assert "wrote" in capsys.readouterr().out
    assert len(list((tmp_path / "b").glob("model-*-of-*.safetensors"))) > 1
    assert main([str(released), str(tmp_path / "b"), "--no-progress"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert (parse_size("5GB"), parse_size("2GiB"), parse_size("123")) == (5 * 10**9, 2 * 2**30, 123)
