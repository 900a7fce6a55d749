"""Released checkpoint -> this repo (conversion/from_released.py) and dtype casts / resharding (conversion/reshard.py):
weights hard-linked and untouched, logits identical through trust_remote_code, a manifest whose checksums are the
files', a Hub id resolved from the local Hub cache, casts equal to torch's, a correct index, and a clear error with
no output left behind for every broken input."""

import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT, tiny_config_dict
from kimi_linear.modeling_kimi_linear import AUTO_MAP, CODE_FILES, KimiLinearForCausalLM
from kimi_linear_conversion.from_released import MANIFEST, RELEASED_CODE_FILES, from_released, main, verify
from kimi_linear_conversion.io import INDEX, CheckpointError, parse_size, tensor_sha256
from kimi_linear_conversion.random_checkpoint import make_random_checkpoint
from kimi_linear_conversion.reshard import KEEP_FP32, reshard

RELEASED_AUTO_MAP = {
    "AutoConfig": "configuration_kimi.KimiLinearConfig",
    "AutoModel": "modeling_kimi.KimiLinearModel",
    "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
}
EXTRA_FILES = {
    "configuration_kimi.py": "raise ImportError('the released code must not be loaded')\n",
    "modeling_kimi.py": "raise ImportError('the released code must not be loaded')\n",
    "tokenization_kimi.py": "# the released tiktoken tokenizer class (stand-in)\n",
    "tiktoken.model": "IQ== 0\nIg== 1\n",
    "chat_template.jinja": "{% for m in messages %}<|im_{{ m.role }}|>{{ m.content }}<|im_end|>{% endfor %}",
    "special_tokens_map.json": '{"bos_token": "<s>"}\n',
}
IDS = torch.arange(3, 40)[None]


def make_released(out, seed=3, dtype="float32", shard="600KB"):
    """A tiny checkpoint dressed as the released one: released auto_map and code files, tiktoken files, several
    shards with an index, no code of ours."""
    ours = make_random_checkpoint(tiny_config_dict(), out.parent / f"{out.name}-ours", seed=seed, dtype=dtype)
    reshard(ours, out, max_shard_size=shard, progress=False)
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = dict(RELEASED_AUTO_MAP)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in (*CODE_FILES, MANIFEST):
        (out / name).unlink()
    for name, text in EXTRA_FILES.items():
        (out / name).write_text(text)
    shutil.rmtree(ours)
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return make_released(tmp_path_factory.mktemp("rel") / "Kimi-Linear-tiny")


def shards_of(folder):
    return sorted(p.name for p in Path(folder).glob("*.safetensors"))


def logits(model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead (seconds on a busy 2-core machine)
    try:
        with torch.no_grad():
            return model(IDS).logits
    finally:
        torch.set_num_threads(threads)


def no_leftovers(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*")), list(out.parent.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# (a) from_released
# ---------------------------------------------------------------------------------------------------------------
def test_from_released_loads_with_our_code_and_links_the_weights(released, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ours"
    assert main([str(released), "--out", str(out), "--tensor-checksums", "--quiet"]) == 0
    shards = shards_of(released)
    assert len(shards) >= 3 and (released / INDEX).exists()

    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(loaded).__module__.startswith("transformers_modules"), type(loaded).__module__
    direct = KimiLinearForCausalLM.from_pretrained(released).eval()
    assert torch.equal(logits(loaded), logits(direct))

    for name in shards:  # hard links: same inode, same bytes
        assert os.stat(out / name).st_ino == os.stat(released / name).st_ino
        assert filecmp.cmp(out / name, released / name, shallow=False)
    assert filecmp.cmp(out / INDEX, released / INDEX, shallow=False)

    carried = ["tiktoken.model", "chat_template.jinja", "special_tokens_map.json"]
    for name in [*carried, "tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert filecmp.cmp(out / name, released / name, shallow=False), name
    for name in RELEASED_CODE_FILES:
        assert not (out / name).exists()
    for name in (*CODE_FILES, "tokenization_kimi.py"):  # ours, in place of the released tokenizer code
        assert filecmp.cmp(out / name, ROOT / name, shallow=False)

    src_config = json.loads((released / "config.json").read_text())
    out_config = json.loads((out / "config.json").read_text())
    assert out_config["auto_map"] == AUTO_MAP
    assert list(out_config) == list(src_config)  # key order kept
    assert {k: v for k, v in out_config.items() if k != "auto_map"} == {
        k: v for k, v in src_config.items() if k != "auto_map"
    }

    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) == {*shards, INDEX}
    for name, info in manifest["files"].items():
        data = (out / name).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    seen = {}
    for shard in shards:
        with safe_open(released / shard, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                seen[key] = {
                    "shape": list(t.shape),
                    "dtype": {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype],
                    "file": shard,
                    "sha256": tensor_sha256(t),
                }
    assert manifest["tensors"] == seen
    assert manifest["num_tensors"] == len(seen) == len(direct.state_dict())
    assert manifest["weights_placed_by"] == {s: "hardlink" for s in shards}
    assert any("tensor checksums match" in n for n in verify(out, progress=False))


def test_copy_symlink_and_verify_only(released, tmp_path, capsys):
    copied = from_released(released, tmp_path / "copied", mode="copy", progress=False)
    linked = from_released(released, tmp_path / "linked", mode="symlink", progress=False)
    for name in shards_of(released):
        assert os.stat(copied / name).st_ino != os.stat(released / name).st_ino
        assert filecmp.cmp(copied / name, released / name, shallow=False)
        assert (linked / name).is_symlink() and (linked / name).resolve() == (released / name).resolve()
    assert torch.equal(
        logits(KimiLinearForCausalLM.from_pretrained(copied).eval()),
        logits(KimiLinearForCausalLM.from_pretrained(linked).eval()),
    )
    assert main(["--verify-only", str(copied), "--quiet"]) == 0
    victim = copied / shards_of(copied)[1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit in a weight: headers and sizes still fine
    victim.write_bytes(bytes(data))
    assert main(["--verify-only", str(copied), "--quiet"]) == 1
    assert victim.name in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# (b) a Hub id from the local Hub cache (blobs named by their sha256, snapshot symlinks)
# ---------------------------------------------------------------------------------------------------------------
def hub_cache(released, home, repo="models--acme--kimi"):
    root = home / "hub" / repo
    snapshot = root / "snapshots" / ("c" * 40)
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("c" * 40)
    for src in released.iterdir():
        data = src.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / src.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_hub_id_from_the_local_hub_cache(released, tmp_path):
    snapshot = hub_cache(released, tmp_path / "home")
    out, absent = tmp_path / "from-hub", tmp_path / "absent"
    script = textwrap.dedent(f"""
        from kimi_linear_conversion.from_released import main
        assert main(["acme/kimi", "--out", {str(out)!r}, "--quiet"]) == 0
        assert main(["acme/not-downloaded", "--out", {str(absent)!r}, "--quiet"]) == 1
        print("OK")
    """)
    env = dict(os.environ, HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]
    assert "acme/not-downloaded" in run.stderr and "local Hub cache" in run.stderr
    no_leftovers(absent)
    for name in shards_of(released):  # linked to the blob itself
        assert os.stat(out / name).st_ino == os.stat((snapshot / name).resolve()).st_ino
    assert not (out / name).is_symlink()
    assert torch.equal(
        logits(KimiLinearForCausalLM.from_pretrained(out).eval()),
        logits(KimiLinearForCausalLM.from_pretrained(released).eval()),
    )


def test_a_blob_that_does_not_match_its_hub_sha256_is_refused(released, tmp_path):
    snapshot = hub_cache(released, tmp_path / "home")
    blob = (snapshot / shards_of(released)[0]).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=f"{shards_of(released)[0]} is corrupt.*sha256"):
        from_released(snapshot, out, progress=False)
    no_leftovers(out)


# ---------------------------------------------------------------------------------------------------------------
# (c) reshard
# ---------------------------------------------------------------------------------------------------------------
def read_all(folder):
    out = {}
    for shard in shards_of(folder):
        with safe_open(Path(folder) / shard, framework="pt") as f:
            for key in f.keys():
                assert key not in out, f"{key} in two shards"
                out[key] = (f.get_tensor(key), shard)
    return out


def test_reshard_casts_to_bfloat16_in_several_shards(tmp_path):
    src = make_random_checkpoint(tiny_config_dict(), tmp_path / "src", seed=7)
    out = reshard(src, tmp_path / "bf16", dtype="bfloat16", max_shard_size="300KB", progress=False)
    original = load_file(src / "model.safetensors")
    written = read_all(out)
    shards = shards_of(out)
    assert len(shards) >= 3
    index = json.loads((out / INDEX).read_text())
    assert index["weight_map"] == {name: shard for name, (_, shard) in written.items()}
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t, _ in written.values())
    assert all((out / s).stat().st_size <= 300_000 + 20_000 for s in shards)  # data <= limit, plus a header
    assert set(written) == set(original)
    for name, t in original.items():
        got = written[name][0]
        if name.rsplit(".", 1)[-1] in KEEP_FP32:
            assert got.dtype == torch.float32 and torch.equal(got, t), name
        else:
            assert got.dtype == torch.bfloat16 and torch.equal(got, t.to(torch.bfloat16)), name
    assert {n.rsplit(".", 1)[-1] for n, (t, _) in written.items() if t.dtype == torch.float32} == set(KEEP_FP32)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert {k: v for k, v in config.items() if k != "dtype"} == {
        k: v for k, v in json.loads((src / "config.json").read_text()).items() if k != "dtype"
    }
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", *CODE_FILES):
        assert filecmp.cmp(out / name, src / name, shallow=False), name
    model = KimiLinearForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, original["lm_head.weight"].to(torch.bfloat16))
    manifest = json.loads((out / MANIFEST).read_text())
    for name, info in manifest["files"].items():
        assert info["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name


def test_bfloat16_float32_bfloat16_round_trip_is_bit_identical(tmp_path):
    src = make_random_checkpoint(tiny_config_dict(), tmp_path / "src", seed=8, dtype="bfloat16")
    wide = reshard(src, tmp_path / "f32", dtype="float32", max_shard_size="1MB", progress=False)
    assert all(t.dtype == torch.float32 for t, _ in read_all(wide).values())
    back = reshard(wide, tmp_path / "back", dtype="bfloat16", max_shard_size="100GB", cast_all=True, progress=False)
    assert shards_of(back) == ["model.safetensors"] and not (back / INDEX).exists()
    original = load_file(src / "model.safetensors")
    again = load_file(back / "model.safetensors")
    assert set(again) == set(original)
    for name, t in original.items():
        assert again[name].dtype == t.dtype and torch.equal(again[name].view(torch.int16), t.view(torch.int16)), name


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1.5 mb") == 1_500_000
    assert parse_size("300KB") == 300_000 and parse_size("4096") == 4096 and parse_size(17) == 17
    for bad in ("5 GBytes", "-1GB", "0", "GB"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


# ---------------------------------------------------------------------------------------------------------------
# (d) errors: clear, naming the file or tensor, nothing left behind
# ---------------------------------------------------------------------------------------------------------------
def _rewrite_shard(folder, shard, change):
    weights = load_file(folder / shard)
    change(weights)
    save_file(weights, folder / shard, metadata={"format": "pt"})
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard or k in weights}
    index["weight_map"].update({k: shard for k in weights})
    (folder / INDEX).write_text(json.dumps(index))


def _missing_shard(folder, shard):
    (folder / shard).unlink()
    return shard


def _truncated(folder, shard):
    with open(folder / shard, "r+b") as f:
        f.truncate((folder / shard).stat().st_size - 100)
    return f"{shard} is truncated"


def _corrupt_header(folder, shard):
    with open(folder / shard, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe{garbage")
    return f"{shard} is corrupt"


def _extra_tensor(folder, shard):
    _rewrite_shard(folder, shard, lambda w: w.update({"model.layers.0.self_attn.bogus.weight": torch.zeros(3)}))
    return "unexpected: model.layers.0.self_attn.bogus.weight"


def _missing_tensor(folder, shard):
    name = sorted(load_file(folder / shard))[0]
    _rewrite_shard(folder, shard, lambda w: w.pop(name))
    return f"missing: {name}"


def _wrong_shape(folder, shard):
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = json.loads((folder / INDEX).read_text())["weight_map"][name]
    _rewrite_shard(folder, shard, lambda w: w.update({name: w[name][:, :-1].contiguous()}))
    return f"wrong shape: {name} [64, 63] (expected [64, 64])"


@pytest.mark.parametrize(
    "breakage", [_missing_shard, _truncated, _corrupt_header, _extra_tensor, _missing_tensor, _wrong_shape]
)
def test_a_broken_checkpoint_raises_naming_it_and_leaves_nothing(released, tmp_path, breakage):
    broken = tmp_path / "broken"
    shutil.copytree(released, broken)
    message = breakage(broken, shards_of(released)[1])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as err:
        from_released(broken, out, progress=False)
    assert message in str(err.value)
    no_leftovers(out)
    if breakage in (_missing_shard, _truncated, _corrupt_header):  # the reader's checks guard reshard too
        with pytest.raises(CheckpointError, match=shards_of(released)[1]):
            reshard(broken, out, dtype="bfloat16", progress=False)
        no_leftovers(out)


def test_an_output_that_holds_a_model_is_refused(released, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    for convert in (lambda: from_released(released, out, progress=False), lambda: reshard(released, out)):
        with pytest.raises(FileExistsError, match="already holds a model.*--overwrite"):
            convert()
        assert (out / "model.safetensors").read_bytes() == b"precious"
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
        assert not list(tmp_path.glob(".taken.partial-*"))
    from_released(released, out, overwrite=True, progress=False)
    assert set(shards_of(out)) == set(shards_of(released))
