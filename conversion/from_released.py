"""Released Kimi Linear checkpoint -> a folder that loads with this repo's code, weights untouched.

    python conversion/from_released.py moonshotai/Kimi-Linear-48B-A3B-Instruct --out ~/kimi-linear-48b
    python conversion/from_released.py /data/Kimi-Linear-48B-A3B-Instruct --out /data/kimi-ours [--copy | --symlink]
    python conversion/from_released.py --verify-only /data/kimi-ours

SOURCE is a folder, or a Hub id already in the local Hub cache ($HF_HOME/hub; nothing is downloaded). The output gets:
- this repo's configuration_kimi_linear.py and modeling_kimi_linear.py (the released configuration_kimi.py and
  modeling_kimi.py are left out) and config.json with `auto_map` pointing at them, every other key unchanged;
- this repo's tokenization_kimi.py in place of the released one (same class name, so the released
  tokenizer_config.json and tiktoken.model load unchanged on transformers 5.x);
- every other non-weight file as is (tokenizer_config.json, tiktoken.model, chat template, generation config, ...);
- the safetensors shards and index unchanged: hard links when on the same filesystem, else copies (--copy forces
  copies, --symlink makes symbolic links); never rewritten;
- kimi_linear_manifest.json: every tensor's name, shape, dtype and file, the sha256 of every shard (and of every
  tensor with --tensor-checksums).
Before anything is written the source is checked: every shard present and complete, every header readable, and the
tensor names and shapes exactly those our model builds from the config (a CheckpointError names what is wrong).
The output is written to a temporary folder beside it and renamed when complete.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kimi_linear_conversion.io import (
    CLI_ERRORS,
    INDEX,
    SINGLE,
    CheckpointError,
    CheckpointReader,
    atomic_output,
    holds_model,
    numel,
    tensor_sha256,
)

MANIFEST = "kimi_linear_manifest.json"
RELEASED_CODE_FILES = ("configuration_kimi.py", "modeling_kimi.py")
# Replaced by this repo's file of the same name and class: the released one imports names transformers 5.x lacks.
TOKENIZER_CODE = "tokenization_kimi.py"
CHUNK = 16 * 2**20


# ---------------------------------------------------------------------------------------------------------------
# Source resolution
# ---------------------------------------------------------------------------------------------------------------
def resolve_source(source, revision=None):
    """A folder as is; otherwise a Hub id ("org/name") looked up in the local Hub cache only (never downloaded)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source} is a file, not a checkpoint folder.")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise CheckpointError(f"{source} is neither a folder nor a Hub id (org/name).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(source), revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{source} is not a folder and is not in the local Hub cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}/hub). "
            f"Download it first: `hf download {source}`."
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Layout check
# ---------------------------------------------------------------------------------------------------------------
def read_config(folder):
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}).") from None


def expected_layout(config):
    """{name: shape} of every tensor our model holds for `config` (a config.json dict), built on the meta device.
    Returns (required, optional): with tied embeddings lm_head.weight is optional (saved or not)."""
    from kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM

    cfg = KimiLinearConfig(**{k: v for k, v in config.items() if k != "auto_map"})
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = {}
    if cfg.tie_word_embeddings:
        for tied in getattr(model, "_tied_weights_keys", None) or {}:
            if tied in shapes:
                optional[tied] = shapes.pop(tied)
    return shapes, optional


def check_layout(shapes, config, where):
    """Raise a CheckpointError naming every missing, unexpected or misshaped tensor of `shapes` ({name: shape})."""
    required, optional = expected_layout(config)
    missing = sorted(set(required) - set(shapes))
    unexpected = sorted(set(shapes) - set(required) - set(optional))
    wrong = sorted(
        f"{n} {list(shapes[n])} (expected {list(s)})"
        for n, s in {**required, **optional}.items()
        if n in shapes and tuple(shapes[n]) != tuple(s)
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" and {len(items) - 10} more" if len(items) > 10 else ""
            problems.append(f"{label}: {', '.join(items[:10])}{more}")
    if problems:
        raise CheckpointError(
            f"{where} does not match the Kimi Linear layout of its config.json ({'; '.join(problems)})."
        )


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
def weight_files(folder, reader=None):
    """The weight files a loader reads: the index and every shard it lists, or model.safetensors."""
    folder = Path(folder)
    if (folder / "pytorch_model.bin").exists() or (folder / "pytorch_model.bin.index.json").exists():
        if not (folder / INDEX).exists() and not (folder / SINGLE).exists():
            raise CheckpointError(f"{folder} holds pytorch_model.bin weights; only safetensors checkpoints are read.")
    reader = reader or CheckpointReader(folder)
    shards = sorted(set(reader.location.values()))
    return shards, ([INDEX] if (folder / INDEX).exists() else [])


def _is_weight_file(name):
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf")) or name in (
        INDEX,
        "pytorch_model.bin.index.json",
    )


def carried_files(folder, skip=()):
    """Non-weight entries of `folder` to carry into the output (relative names), hidden ones (.cache, .git) left out
    except .gitattributes."""
    out = []
    for entry in sorted(Path(folder).iterdir()):
        name = entry.name
        if name in skip or _is_weight_file(name) or name == MANIFEST:
            continue
        if name.startswith(".") and name != ".gitattributes":
            continue
        out.append(name)
    return out


def copy_entry(src, dst):
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=False)
    else:
        shutil.copyfile(src, dst)  # follows Hub-cache symlinks to their blobs


def sha256_file(path, bar=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest()


def copy_with_sha256(src, dst, bar=None):
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(CHUNK):
            fo.write(chunk)
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    shutil.copystat(src, dst)
    return h.hexdigest()


def _hub_blob_sha256(path):
    """The sha256 a Hub-cache blob is named after (LFS files are stored as blobs/<sha256>), else None."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    return None


def place_weight(src, dst, mode, bar=None):
    """Put shard `src` at `dst` by `mode` ("link": hard link, falling back to a copy across filesystems; "copy";
    "symlink") and return (how, sha256 of its bytes)."""
    real = Path(src).resolve()
    if mode == "link":
        try:
            os.link(real, dst)
            how = "hardlink"
        except OSError:
            mode = "copy"
    if mode == "copy":
        return "copy", copy_with_sha256(real, dst, bar)
    if mode == "symlink":
        os.symlink(real, dst)
        how = "symlink"
    return how, sha256_file(dst, bar)


# ---------------------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------------------
def build_manifest(folder, file_sha256=None, tensor_checksums=False, source=None, progress=True):
    """The manifest of a checkpoint folder: every tensor (name, shape, dtype, file[, sha256]) and every shard (size,
    sha256). `file_sha256` ({file: hex}) reuses checksums computed while writing."""
    folder = Path(folder)
    reader = CheckpointReader(folder)
    shards, index = weight_files(folder, reader)
    file_sha256 = dict(file_sha256 or {})
    todo = [f for f in shards + index if f not in file_sha256]
    total = sum((folder / f).stat().st_size for f in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256", disable=not progress or not todo) as bar:
        for f in todo:
            file_sha256[f] = sha256_file(folder / f, bar)
    tensors = {}
    for name in sorted(reader.location):
        tensors[name] = {
            "shape": list(reader.shapes[name]),
            "dtype": reader.dtypes[name],
            "file": reader.location[name],
        }
    if tensor_checksums:
        names = sorted(reader.location, key=lambda n: (reader.location[n], n))
        for name in tqdm(names, desc="tensor sha256", unit="tensor", disable=not progress):
            tensors[name]["sha256"] = tensor_sha256(reader.get(name))
    manifest = {
        "format": "kimi_linear_manifest/1",
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "files": {f: {"size": (folder / f).stat().st_size, "sha256": file_sha256[f]} for f in shards + index},
        "num_tensors": len(tensors),
        "num_parameters": sum(numel(t["shape"]) for t in tensors.values()),
        "total_tensor_bytes": sum(reader.nbytes(n) for n in reader.location),
        "tensors": tensors,
    }
    if source is not None:
        manifest["source"] = source
    return manifest


def write_manifest(folder, manifest):
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Convert and verify
# ---------------------------------------------------------------------------------------------------------------
def _code_files():
    from kimi_linear.modeling_kimi_linear import AUTO_MAP, CODE_FILES

    here = Path(sys.modules["kimi_linear.modeling_kimi_linear"].__file__).resolve().parent
    return AUTO_MAP, [here / name for name in CODE_FILES]


def from_released(source, out, mode="link", tensor_checksums=False, overwrite=False, revision=None, progress=True):
    """Convert the released checkpoint at `source` (folder or cached Hub id) into `out`; returns out as a Path."""
    if mode not in ("link", "copy", "symlink"):
        raise ValueError(f"mode must be link, copy or symlink, not {mode!r}")
    src = resolve_source(source, revision)
    out = Path(out).expanduser()
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise CheckpointError(f"the output {out} must not be the source folder or inside it.")
    if holds_model(out) and not overwrite:  # fail before reading gigabytes
        raise FileExistsError(f"{out} already holds a model; choose another output folder or pass --overwrite.")

    config = read_config(src)
    reader = CheckpointReader(src)  # every shard present, complete, with a readable header
    check_layout(reader.shapes, config, src)
    shards, index = weight_files(src, reader)
    auto_map, code = _code_files()
    ours = {p.name for p in code}
    skip = set(RELEASED_CODE_FILES) | ours | {"config.json", TOKENIZER_CODE}
    stray = sorted(
        p.name for p in src.iterdir() if p.name.endswith(".safetensors") and p.name not in shards and p.is_file()
    )
    if stray:
        print(f"note: leaving out {stray}: not listed in {INDEX}, so no loader reads them", file=sys.stderr)

    with atomic_output(out, overwrite=overwrite) as tmp:
        for name in carried_files(src, skip):
            copy_entry(src / name, tmp / name)
        for path in code:
            shutil.copyfile(path, tmp / path.name)
        if (src / TOKENIZER_CODE).is_file():
            shutil.copyfile(code[0].parent / TOKENIZER_CODE, tmp / TOKENIZER_CODE)
        config_out = dict(config)
        config_out["auto_map"] = dict(auto_map)
        (tmp / "config.json").write_text(json.dumps(config_out, indent=2, ensure_ascii=False) + "\n")
        for f in index:
            shutil.copyfile(src / f, tmp / f)

        hashes, placed = {}, {}
        total = sum((src / f).stat().st_size for f in shards)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{mode} + sha256", disable=not progress) as bar:
            for f in shards:
                placed[f], hashes[f] = place_weight(src / f, tmp / f, mode, bar)
                expected = _hub_blob_sha256(src / f)
                if expected is not None and expected != hashes[f]:
                    raise CheckpointError(
                        f"{src / f} is corrupt: its sha256 is {hashes[f]}, the Hub's is {expected}. Download it again."
                    )
        manifest = build_manifest(tmp, hashes, tensor_checksums, source=str(source), progress=progress)
        manifest["weights_placed_by"] = placed
        write_manifest(tmp, manifest)
        verify(tmp, check_hashes=False, progress=progress)
    return out


def verify(folder, check_hashes=True, progress=True):
    """Check a converted folder: shards complete, layout exactly our model's, our code files and auto_map present,
    and (check_hashes) every checksum in the manifest. Returns a list of notes; raises CheckpointError on failure."""
    folder = Path(folder)
    config = read_config(folder)
    reader = CheckpointReader(folder)
    check_layout(reader.shapes, config, folder)
    notes = [f"{len(reader.location)} tensors, layout matches the config"]
    auto_map, code = _code_files()
    if config.get("auto_map") == auto_map:
        missing = [p.name for p in code if not (folder / p.name).exists()]
        if missing:
            raise CheckpointError(f"{folder}: config.json's auto_map names our code, but {missing} are missing.")
        notes.append("auto_map and code files are this repo's")
    else:
        notes.append(f"auto_map is not this repo's ({config.get('auto_map')}): not converted")
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        notes.append(f"no {MANIFEST}: checksums not checked")
        return notes
    manifest = json.loads(manifest_path.read_text())
    listed = {n: (tuple(t["shape"]), t["dtype"], t["file"]) for n, t in manifest["tensors"].items()}
    actual = {n: (reader.shapes[n], reader.dtypes[n], reader.location[n]) for n in reader.location}
    if listed != actual:
        diff = sorted(set(listed.items()) ^ set(actual.items()))[:5]
        raise CheckpointError(f"{folder}: the tensors differ from {MANIFEST} (first differences: {diff}).")
    if not check_hashes:
        return notes
    files = manifest["files"]
    total = sum(v["size"] for v in files.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify sha256", disable=not progress) as bar:
        for f, info in files.items():
            digest = sha256_file(folder / f, bar)
            if digest != info["sha256"]:
                raise CheckpointError(f"{folder / f}: sha256 {digest} differs from {MANIFEST} ({info['sha256']}).")
    notes.append(f"{len(files)} file checksums match {MANIFEST}")
    with_sha = [n for n, t in manifest["tensors"].items() if "sha256" in t]
    for name in tqdm(with_sha, desc="verify tensor sha256", unit="tensor", disable=not progress or not with_sha):
        if tensor_sha256(reader.get(name)) != manifest["tensors"][name]["sha256"]:
            raise CheckpointError(f"{folder}: tensor {name} differs from its sha256 in {MANIFEST}.")
    if with_sha:
        notes.append(f"{len(with_sha)} tensor checksums match")
    return notes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", help="released checkpoint folder, or Hub id in the local Hub cache")
    ap.add_argument("--out", help="output folder (must not hold a model unless --overwrite)")
    ap.add_argument("--revision", help="Hub revision (branch, tag or commit) for a Hub id")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--copy", action="store_true", help="copy the weights instead of hard-linking them")
    how.add_argument("--symlink", action="store_true", help="symlink the weights instead of hard-linking them")
    ap.add_argument("--tensor-checksums", action="store_true", help="also record each tensor's sha256 (reads all)")
    ap.add_argument("--overwrite", action="store_true", help="replace an output folder that holds a model")
    ap.add_argument("--verify-only", metavar="DIR", help="only verify DIR (layout, code, manifest checksums)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        if args.verify_only:
            for note in verify(args.verify_only, progress=not args.quiet):
                print(f"ok: {note}")
            return 0
        if not args.source or not args.out:
            ap.error("SOURCE and --out are required (or --verify-only DIR)")
        mode = "copy" if args.copy else "symlink" if args.symlink else "link"
        out = from_released(
            args.source, args.out, mode, args.tensor_checksums, args.overwrite, args.revision, not args.quiet
        )
    except CLI_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
