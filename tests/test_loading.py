"""Saving, loading through trust_remote_code (local folder and Hub-cache layout, offline), the released parameter
layout, and clear errors for checkpoints that do not match it."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SHARED, build_model, tiny_config_dict
from kimi_linear.configuration_kimi_linear import KDA, KimiLinearConfig
from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM
from kimi_linear_conversion.random_checkpoint import byte_tokenizer, make_random_checkpoint


def released_layout(cfg):
    """Every (name, shape) the released checkpoint has, read from official_layout.md's tables."""
    text = (SHARED / "reference" / "official_layout.md").read_text()
    sections = {}
    for title, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M):
        rows = []
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 2 and cells[1].startswith("["):
                shape = [int(x) for x in re.findall(r"\d+", cells[1].split("(")[0])]
                for name in cells[0].split(","):
                    rows.append((name.strip(), shape))
        sections[title.split("(")[0].strip()] = rows

    def expand(name):
        m = re.search(r"\{(\d+)\.\.(\d+)\}", name)
        if not m:
            return [name]
        return [name[: m.start()] + str(i) + name[m.end() :] for i in range(int(m.group(1)), int(m.group(2)) + 1)]

    expected = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        groups = [("Every layer", p), ("KDA layer" if cfg.layer_types[i] == KDA else "MLA layer", p + "self_attn.")]
        groups.append(
            ("MoE layer", p + "block_sparse_moe.") if cfg.mlp_types[i] == "moe" else ("Dense MLP", p + "mlp.")
        )
        for section, prefix in groups:
            for name, shape in sections[section]:
                full = name.replace("model.layers.N.", p) if name.startswith("model.") else prefix + name
                for n in expand(full):
                    expected[n] = shape
    for name, shape in sections["Outside the layers"]:
        expected[name] = shape
    return expected


def test_parameter_names_and_shapes_are_the_released_layout():
    cfg = KimiLinearConfig(**json.loads((SHARED / "reference" / "official_config_48b_a3b.json").read_text()))
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    ours = {n: list(t.shape) for n, t in model.state_dict().items()}
    expected = released_layout(cfg)
    assert set(ours) - set(expected) == set(), "names the released checkpoint does not have"
    assert set(expected) - set(ours) == set(), "released names we do not have"
    assert {n: s for n, s in ours.items() if expected[n] != s} == {}
    assert len(ours) == 20493
    assert sum(t.numel() for t in model.state_dict().values()) == 49_122_681_728


def test_save_pretrained_writes_code_and_auto_map(tmp_path):
    build_model().save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "configuration_kimi_linear.py",
        "modeling_kimi_linear.py",
    } <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_kimi_linear.KimiLinearForCausalLM"
    assert auto_map["AutoConfig"] == "configuration_kimi_linear.KimiLinearConfig"


@torch.no_grad()
def test_remote_code_round_trip_gives_identical_logits(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = build_model(seed=3)
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    ids = torch.randint(3, 512, (2, 50), generator=torch.Generator().manual_seed(0))
    cfg = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(cfg).__name__ == "KimiLinearConfig" and cfg.layer_types == model.config.layer_types
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__module__.startswith("transformers_modules")  # our files, not the built-in class
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.decode(tok("Kimi Linear: ünïcode ✓")["input_ids"]) == "Kimi Linear: ünïcode ✓"


def test_loading_from_the_hub_cache_offline(tmp_path):
    src = make_random_checkpoint(tiny_config_dict(), tmp_path / "src", seed=5)
    snapshot = tmp_path / "home" / "hub" / "models--acme--tiny-kimi" / "snapshots" / ("a" * 40)
    snapshot.parent.mkdir(parents=True)
    src.rename(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM
        ids = torch.arange(3, 40)[None]
        hub = AutoModelForCausalLM.from_pretrained("acme/tiny-kimi", trust_remote_code=True).eval()
        local = KimiLinearForCausalLM.from_pretrained({str(snapshot)!r}).eval()
        assert type(hub).__module__.startswith("transformers_modules"), type(hub).__module__
        with torch.no_grad():
            assert torch.equal(hub(ids).logits, local(ids).logits)
        AutoTokenizer.from_pretrained("acme/tiny-kimi")
        print("OK")
    """)
    env = dict(os.environ, HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def _tamper(path, change):
    weights = load_file(path / "model.safetensors")
    change(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda w: w.pop("model.layers.1.self_attn.q_proj.weight"),
            r"missing from the checkpoint: \['model\.layers\.1\.self_attn\.q_proj\.weight'\]",
        ),
        (
            lambda w: w.__setitem__("model.layers.2.self_attn.k_proj.weight", torch.zeros(3, 3)),
            r"wrong shape.*model\.layers\.2\.self_attn\.k_proj\.weight \[3, 3\] vs \[64, 64\]",
        ),
        (
            lambda w: w.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)),
            r"not used by .*extra\.weight",
        ),
    ],
)
def test_mismatched_checkpoints_name_the_tensor(tmp_path, change, message):
    build_model().save_pretrained(tmp_path)
    _tamper(tmp_path, change)
    with pytest.raises(ValueError, match=message):
        KimiLinearForCausalLM.from_pretrained(tmp_path)
    model, info = KimiLinearForCausalLM.from_pretrained(
        tmp_path, strict=False, output_loading_info=True, ignore_mismatched_sizes=True
    )
    assert any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_random_checkpoint_refuses_to_overwrite(tmp_path):
    out = make_random_checkpoint(tiny_config_dict(), tmp_path / "m")
    with pytest.raises(FileExistsError, match="already holds a model"):
        make_random_checkpoint(tiny_config_dict(), out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written temp folder left


@torch.no_grad()
def test_text_generation_pipeline_with_remote_code(tmp_path):
    from transformers import AutoTokenizer, pipeline

    path = make_random_checkpoint(tiny_config_dict(), tmp_path / "m", seed=8)
    pipe = pipeline("text-generation", model=str(path), trust_remote_code=True)
    assert type(pipe.model).__module__.startswith("transformers_modules")
    text = pipe("To be, or not", max_new_tokens=12, min_new_tokens=12, do_sample=False)[0]["generated_text"]
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("To be, or not", return_tensors="pt")["input_ids"]
    model = KimiLinearForCausalLM.from_pretrained(path).eval()
    expected = tok.decode(model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0])
    assert text == expected


@pytest.mark.parametrize("fake", ["4.57.0", "5.25.0"])
def test_unsupported_transformers_fails_at_import_naming_the_range(fake):
    script = f"import transformers; transformers.__version__ = {fake!r}; import kimi_linear.configuration_kimi_linear"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"supports transformers >= 5.0.0, < 5.25.0; found {fake}" in out.stderr


def _offloaded_layers_load_whole(model):
    """Whether every decoder layer whose weights are offloaded carries one hook loading it whole, none inside."""
    layers = model.model.layers
    for layer in layers:
        hook = layer.__dict__.get("_hf_hook")
        if layer.input_layernorm.weight.is_meta:
            if hook is None or not (hook.offload and hook.place_submodules):
                return False
            if any("_hf_hook" in m.__dict__ or "forward" in m.__dict__ for m in layer.modules() if m is not layer):
                return False
    return True


@torch.no_grad()
def test_offloaded_layers_compute_what_the_loaded_model_computes(tmp_path):
    # from_pretrained with device_map: layers on "disk" (every other one, KDA and MLA alike) beside layers in memory.
    # accelerate hooks each module that holds tensors, loading its weights only for its own forward; a layer reads
    # some weights without calling their module (the short convs' taps: there PyTorch's CPU convolution took meta
    # weights without an error and returned arbitrary numbers), so each offloaded layer must load whole. Logits and
    # greedy tokens (a left-padded batch through generate()) equal the model held in memory, and the offloaded
    # layers' weights are dropped again after each forward.
    model = build_model(seed=1)
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(3, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(model.config.num_hidden_layers)})
    offloaded = KimiLinearForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=device_map,
                                                      offload_folder=tmp_path / "offload")  # fmt: skip
    kinds = {layer.kind for i, layer in enumerate(offloaded.model.layers) if i % 2}
    assert len(kinds) == 2  # KDA and MLA layers among the offloaded ones
    assert torch.equal(offloaded(ids).logits, model(ids).logits)
    assert _offloaded_layers_load_whole(offloaded)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    want = model.generate(ids, **kwargs)
    for cache in ("dynamic", "static"):  # the static cache's states allocated from the offloaded layers' outputs
        assert torch.equal(offloaded.generate(ids, cache_implementation=cache, **kwargs), want), cache
    layers = offloaded.model.layers
    assert all(p.is_meta for i in range(1, len(layers), 2) for p in layers[i].parameters())
    assert all(not p.is_meta for i in range(0, len(layers), 2) for p in layers[i].parameters())


@torch.no_grad()
def test_cpu_offload_of_a_loaded_model_and_meta_weights_without_a_hook():
    from accelerate import cpu_offload, init_empty_weights

    model, twin = build_model(seed=2), build_model(seed=2)
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    cpu_offload(twin, execution_device="cpu")  # accelerate's own: every module hooked, weights kept on the side
    assert torch.equal(twin(ids).logits, model(ids).logits)
    assert _offloaded_layers_load_whole(twin)
    with init_empty_weights():
        empty = KimiLinearForCausalLM(model.config)  # weights on the meta device, nothing to load them
    with pytest.raises(RuntimeError, match=r"layer 0's weights are on the meta device and no offloading hook"):
        empty(ids)
    # the short conv refuses a meta weight beside real inputs wherever it is reached
    from kimi_linear.modeling_kimi_linear import short_conv

    with pytest.raises(RuntimeError, match="short-conv weight is on the meta device"):
        short_conv(torch.randn(1, 3, 8), torch.empty(8, 1, 4, device="meta"))


@pytest.mark.parametrize("part", ["input_layernorm", "self_attn"])
def test_a_device_map_offloading_part_of_a_layer_is_refused(tmp_path, part):
    # a layer reads weights across its modules (the short convs' taps, MLA's absorbed kv_b_proj), so part of it
    # offloaded and the rest kept would compute on meta tensors or fail deep inside: refused, naming the layer
    model = build_model(seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(model.config.num_hidden_layers) if i != 1})
    children = [name for name, _ in model.model.layers[1].named_children()]
    device_map.update({f"model.layers.1.{name}": "disk" if name == part else "cpu" for name in children})
    split = KimiLinearForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=device_map,
                                                  offload_folder=tmp_path / "offload")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"offloads part of layer 1 .* Map `model.layers.1` as one entry"):
        split(torch.randint(3, 512, (1, 8)))
