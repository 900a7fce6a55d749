"""Streaming checkpoint I/O shared by every conversion: read safetensors checkpoints tensor by tensor, write sharded
output with a correct index, publish a folder only when complete, and fail with a message that names the file or
tensor at fault.

    with atomic_output(out) as tmp:                 # tmp is renamed to out only if the block finishes
        with ShardWriter(tmp, max_shard_bytes=5 * 2**30) as writer:
            for name, tensor in CheckpointReader(src).items():
                writer.add(name, tensor)
"""

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MODEL_FILES = (INDEX, SINGLE, "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match what a conversion expects."""


def _header(path):
    """The safetensors header of a file, checked against the file's size (catches truncation)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes).")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path} is truncated or corrupt: its header claims {n} bytes, the file has {size}.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} is corrupt: its header is not valid JSON ({err}).") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}. Download it again."
        )
    return header


class CheckpointReader:
    """Tensors of a checkpoint folder (model.safetensors or sharded with model.safetensors.index.json), read lazily,
    one at a time. Every shard's presence and integrity is checked up front, before anything is written."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder} is not a folder.")
        index = self.folder / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE).exists():
            weight_map = None
        else:
            raise CheckpointError(f"{self.folder} holds no {SINGLE} and no {INDEX}.")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        missing = [f for f in files if not (self.folder / f).exists()]
        if missing:
            raise CheckpointError(f"{self.folder}: shards listed in {INDEX} are missing: {missing}.")
        self.shapes, self.dtypes, self.location = {}, {}, {}
        for file in files:
            for name, info in _header(self.folder / file).items():
                if name == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(name) != file:
                    raise CheckpointError(f"{self.folder / file} holds {name}, which {INDEX} places elsewhere.")
                self.shapes[name] = tuple(info["shape"])
                self.dtypes[name] = info["dtype"]
                self.location[name] = file
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.location))
            if absent:
                raise CheckpointError(f"{INDEX} lists tensors that no shard holds: {absent[:5]}.")
        self._open = {}

    def names(self):
        return list(self.location)

    def get(self, name):
        file = self.location.get(name)
        if file is None:
            raise CheckpointError(f"{self.folder} has no tensor {name}.")
        if file not in self._open:
            self._open = {file: safe_open(self.folder / file, framework="pt")}  # one shard open at a time
        return self._open[file].get_tensor(name)

    def items(self):
        """(name, tensor) shard by shard, in file order, so each shard is read once."""
        for name in sorted(self.location, key=lambda n: (self.location[n], n)):
            yield name, self.get(name)

    def nbytes(self, name):
        return _numel(self.shapes[name]) * _DTYPE_BYTES[self.dtypes[name]]


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


class ShardWriter:
    """Writes tensors into shards of at most max_shard_bytes (a single tensor larger than that gets its own shard)
    and, on close, model.safetensors (one shard) or model-0000i-of-0000n.safetensors + the index."""

    def __init__(self, folder, max_shard_bytes=5 * 2**30, metadata=None):
        self.folder = Path(folder)
        self.max = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending, self.pending_bytes, self.parts, self.weight_map, self.total = {}, 0, [], {}, 0

    def add(self, name, tensor):
        if name in self.weight_map or name in self.pending:
            raise CheckpointError(f"tensor {name} written twice.")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self):
        part = self.folder / f".part-{len(self.parts):05d}.safetensors"
        save_file(self.pending, part, metadata=self.metadata)
        self.parts.append((part, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self):
        if self.pending or not self.parts:
            self._flush()
        n = len(self.parts)
        if n == 1:
            self.parts[0][0].rename(self.folder / SINGLE)
            return
        for i, (part, names) in enumerate(self.parts, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            part.rename(self.folder / final)
            self.weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()


def holds_model(folder):
    folder = Path(folder)
    return folder.exists() and any((folder / f).exists() for f in MODEL_FILES)


@contextlib.contextmanager
def atomic_output(out, overwrite=False):
    """Yield a temporary folder beside `out`; rename it to `out` only when the block finishes without error.
    Refuses an `out` that already holds a model unless overwrite=True; leaves nothing behind on failure."""
    out = Path(out)
    if holds_model(out) and not overwrite:
        raise FileExistsError(f"{out} already holds a model; choose another output folder or pass --overwrite.")
    if out.exists() and any(out.iterdir()) and not holds_model(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another output folder or pass --overwrite.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tensor_sha256(tensor):
    """SHA-256 of a tensor's raw bytes (dtype and shape are recorded beside it)."""
    t = tensor.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()
