"""conversion/merge_lora.py: a PEFT LoRA adapter on every projection kind (KDA, MLA, dense MLP, shared and routed
experts) merged into the released layout gives the adapter-applied logits, in our class and in transformers'
built-in one; per-module ranks/alphas and rsLoRA scale as PEFT does; bf16 within bf16 tolerance; unsupported
adapters and occupied output folders are refused, naming the problem, with nothing left behind."""

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT, Builtin, needs_builtin, rel_err
from kimi_linear.modeling_kimi_linear import CODE_FILES, KimiLinearForCausalLM
from kimi_linear_conversion.merge_lora import main as merge_main
from kimi_linear_conversion.merge_lora import merge_lora
from kimi_linear_conversion.random_checkpoint import make_random_checkpoint

TINY = ROOT / "conversion" / "configs" / "tiny.json"
KDA = ["q_proj", "k_proj", "v_proj", "o_proj", "f_a_proj", "f_b_proj", "g_a_proj", "g_b_proj", "b_proj"]
MLA = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
EXPERTS = ["w1", "w2", "w3"]
TARGETS = sorted(set(KDA + MLA + MLP + EXPERTS))
IDS = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(5))


def make_adapter(base, path, dtype=torch.float32, seed=1, b_scale=1.0, **lora):
    """Load `base` with our class, attach a LoRA with random A and B (B times b_scale), save it; return the
    PeftModel (eval)."""
    model = KimiLinearForCausalLM.from_pretrained(base, dtype=dtype).eval()
    torch.manual_seed(seed)
    lora = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": TARGETS, **lora}
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**lora)).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.mul_(b_scale)
    peft_model.save_pretrained(path)
    return peft_model


@torch.no_grad()
def logits(model, ids=IDS):
    return model(ids).logits.float()


def no_leftovers(out):
    out = Path(out)
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp32")
    base = make_random_checkpoint(TINY, root / "base", seed=7)
    peft_model = make_adapter(base, root / "adapter", b_scale=0.1)  # delta ~40% of W: bf16 stays well conditioned
    out = merge_lora(base, root / "adapter", root / "merged", progress=False)
    return base, root / "adapter", out, peft_model


def test_adapter_covers_every_projection_kind(fp32):
    _, adapter, _, _ = fp32
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        modules = {k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for k in f.keys()}
    expect = [
        "model.layers.0.self_attn.f_b_proj",  # KDA (layer 0)
        "model.layers.3.self_attn.kv_b_proj",  # MLA (layer 3)
        "model.layers.3.self_attn.kv_a_proj_with_mqa",
        "model.layers.0.mlp.down_proj",  # dense MLP
        "model.layers.1.block_sparse_moe.shared_experts.up_proj",  # shared expert (matched by up_proj)
        "model.layers.7.block_sparse_moe.experts.5.w2",  # routed expert: one adapter per expert
    ]
    assert all(m in modules for m in expect), sorted(modules)[:20]
    assert not any("gate.weight" in m or m.endswith("block_sparse_moe.gate") for m in modules)  # router untouched


def test_merged_equals_adapter(fp32):
    base, adapter, out, peft_model = fp32
    merged = KimiLinearForCausalLM.from_pretrained(out).eval()  # strict: any missing/unexpected tensor raises
    original = KimiLinearForCausalLM.from_pretrained(base).eval()
    want = logits(peft_model)
    assert rel_err(logits(merged), want) < 1e-5
    assert rel_err(logits(original), want) > 1e-2  # the adapter changes the model
    # Cached decode: the merged kv_b_proj is a plain Linear again, so MLA decodes on the latents (absorbed);
    # with the adapter it expands per head. Both must give the same tokens.
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ours, theirs = merged.generate(IDS[:1, :20], **kwargs), peft_model.generate(IDS[:1, :20], **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert rel_err(torch.stack(ours.logits), torch.stack(theirs.logits)) < 1e-5
    # what travels with the weights
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "kimi_linear"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_kimi_linear.KimiLinearForCausalLM"
    assert all((out / f).exists() for f in (*CODE_FILES, "generation_config.json", "tokenizer.json"))
    info = json.loads((out / "merge_info.json").read_text())
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert info["merged_count"] == len(info["merged"]) == len(list(f.keys())) // 2
    assert info["adapter_config"]["r"] == 4 and info["dtype"] is None
    auto = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(auto).__module__ != "transformers.models.kimi_linear.modeling_kimi_linear"
    assert rel_err(logits(auto), want) < 1e-5


@needs_builtin
def test_builtin_class_loads_merged(fp32):
    _, _, out, peft_model = fp32
    theirs, info = Builtin.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert rel_err(logits(theirs.eval()), logits(peft_model)) < 1e-4


def test_rank_alpha_pattern_and_rslora(tmp_path, fp32):
    base = fp32[0]
    patterns = dict(
        use_rslora=True,
        rank_pattern={"kv_b_proj": 2, "layers.0.mlp.down_proj": 6},
        alpha_pattern={"w2": 3, "layers.2.self_attn.q_proj": 20},
        target_modules=["q_proj", "kv_b_proj", "down_proj", "w2"],
    )
    peft_model = make_adapter(base, tmp_path / "adapter", seed=3, **patterns)
    assert merge_main([str(base), str(tmp_path / "adapter"), str(tmp_path / "merged"), "--quiet"]) == 0
    out = tmp_path / "merged"
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    ad = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    changed, seen = set(), {"r2": 0, "r6": 0, "a3": 0, "a20": 0}
    for key in ad:
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").rsplit(".lora_A.", 1)[0]
        a, b = ad[key], ad[key.replace("lora_A", "lora_B")]
        r = a.shape[0]
        assert r == (2 if "kv_b_proj" in module else 6 if module == "model.layers.0.mlp.down_proj" else 4)
        alpha = 3 if module.endswith(".w2") else 20 if module == "model.layers.2.self_attn.q_proj" else 8
        seen["r2"] += r == 2
        seen["r6"] += r == 6
        seen["a3"] += alpha == 3
        seen["a20"] += alpha == 20
        name = module + ".weight"
        want = before[name].double() + alpha / r**0.5 * (b.double() @ a.double())
        assert rel_err(after[name], want) < 1e-6, name
        changed.add(name)
    assert all(seen.values()), seen
    assert all(torch.equal(before[n], after[n]) for n in before if n not in changed)
    merged = KimiLinearForCausalLM.from_pretrained(out).eval()
    assert rel_err(logits(merged), logits(peft_model)) < 1e-5


# This tiny random model's own bf16 forward differs from its float32 forward by 3-6% (relative, 40 tokens), and by
# ~45% once a full-size random LoRA (delta 4x the weights) makes it chaotic; so the bf16 adapters are scaled to a
# delta ~40% of the weights, the logit bound is 0.1, and the merged weights are also checked bit for bit.
def bf16_expected(base_tensors, adapter_dir, scaling=2.0):
    """W + s * B @ A in float32, rounded once to bf16: what each merged tensor must be exactly."""
    ad = load_file(adapter_dir / "adapter_model.safetensors")
    want = dict(base_tensors)
    for key in ad:
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").rsplit(".lora_A.", 1)[0] + ".weight"
            b = ad[key.replace(".lora_A.", ".lora_B.")]
            want[name] = (base_tensors[name].float() + scaling * (b.float() @ ad[key].float())).bfloat16()
    return want


def test_bf16(tmp_path):
    base = make_random_checkpoint(TINY, tmp_path / "base", seed=9, dtype="bfloat16")
    peft_model = make_adapter(base, tmp_path / "adapter", dtype=torch.bfloat16, seed=4, b_scale=0.1)
    out = merge_lora(base, tmp_path / "adapter", tmp_path / "merged", progress=False)
    got = load_file(out / "model.safetensors")
    want = bf16_expected(load_file(base / "model.safetensors"), tmp_path / "adapter")
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    merged = KimiLinearForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    want_logits = logits(peft_model)
    assert rel_err(logits(merged), want_logits) < 0.1
    original = KimiLinearForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    assert rel_err(logits(original), want_logits) > 0.3


def test_cast_to_bf16(tmp_path, fp32):
    base, adapter, _, peft_model = fp32
    out = merge_lora(base, adapter, tmp_path / "m", "bfloat16", max_shard_bytes=2**16, progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())  # sharded
    assert len(set(index["weight_map"].values())) > 1
    reader_dtypes = {}
    for shard in set(index["weight_map"].values()):
        with safe_open(out / shard, "pt") as f:
            reader_dtypes.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    assert {n for n, d in reader_dtypes.items() if d != "BF16"} == {
        n for n in reader_dtypes if n.endswith(("A_log", "dt_bias", "e_score_correction_bias"))
    }
    merged = KimiLinearForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert rel_err(logits(merged), logits(peft_model)) < 0.1


def edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def edit_tensors(src, dst, **extra):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    tensors.update(extra)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def test_dora_refused(tmp_path, fp32):
    base = fp32[0]
    model = KimiLinearForCausalLM.from_pretrained(base).eval()
    config = peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA"):
        merge_lora(base, tmp_path / "dora", tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path / "out")


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_module", "model.layers.0.self_attn.nonexistent_proj.*matches no tensor"),
        ("wrong_shape", "model.layers.0.self_attn.q_proj does not fit"),
        ("conv_target", "q_conv1d.*only linear weights"),
        ("embedding", "embedding"),
        ("bias", "bias='all'"),
        ("modules_to_save", "modules_to_save"),
        ("peft_type", "peft_type is IA3"),
        ("pissa", "pissa"),
    ],
)
def test_bad_adapter_refused(tmp_path, fp32, case, match):
    base, adapter = fp32[:2]
    prefix = "base_model.model.model.layers.0.self_attn."
    bad = tmp_path / "bad"
    if case == "missing_module":
        edit_tensors(adapter, bad, **{prefix + "nonexistent_proj.lora_A.weight": torch.zeros(4, 64)})
        edit_tensors(bad, tmp_path / "bad2", **{prefix + "nonexistent_proj.lora_B.weight": torch.zeros(64, 4)})
        bad = tmp_path / "bad2"
    elif case == "wrong_shape":
        edit_tensors(adapter, bad, **{prefix + "q_proj.lora_A.weight": torch.zeros(4, 63)})
    elif case == "conv_target":
        conv = {prefix + "q_conv1d.lora_A.weight": torch.zeros(4, 1), prefix + "q_conv1d.lora_B.weight": torch.zeros(4)}
        edit_tensors(adapter, bad, **conv)
    elif case == "embedding":
        emb = "base_model.model.model.embed_tokens.lora_embedding_A"
        edit_tensors(adapter, bad, **{emb: torch.zeros(4, 512), emb.replace("_A", "_B"): torch.zeros(64, 4)})
    else:
        changes = {
            "bias": {"bias": "all"},
            "modules_to_save": {"modules_to_save": ["lm_head"]},
            "peft_type": {"peft_type": "IA3"},
            "pissa": {"init_lora_weights": "pissa"},
        }[case]
        edit_config(adapter, bad, **changes)
    with pytest.raises(ValueError, match=match):
        merge_lora(base, bad, tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path / "out")


def test_occupied_output_refused(tmp_path, fp32):
    base, adapter, out, _ = fp32
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="already holds a model"):
        merge_lora(base, adapter, out, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    again = merge_lora(base, adapter, out, overwrite=True, progress=False)  # explicit overwrite works
    assert json.loads((again / "merge_info.json").read_text())["merged_count"] > 0


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert merge_main([str(tmp_path / "no-base"), str(tmp_path / "no-adapter"), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "out").exists()
