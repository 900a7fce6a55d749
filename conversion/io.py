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
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

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

    def close(self):
        """Drop the open shard (its memory map)."""
        self._open = {}

    def items(self):
        """(name, tensor) shard by shard, in file order, so each shard is read once."""
        for name in sorted(self.location, key=lambda n: (self.location[n], n)):
            yield name, self.get(name)

    def nbytes(self, name):
        return numel(self.shapes[name]) * _DTYPE_BYTES[self.dtypes[name]]


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def plan_shards(entries, max_bytes):
    """Group [(name, nbytes)], in order, into shards of at most max_bytes (a larger tensor gets its own shard)."""
    shards, current, size = [], [], 0
    for name, nbytes in entries:
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


class _Shard:
    """One safetensors file written tensor by tensor: the header first, then each tensor's bytes as it comes, hashed
    on the way; nothing but the tensor in hand is held in memory. specs: [(name, st_dtype, shape)] in write order."""

    def __init__(self, path, specs, metadata):
        self.path, self.specs, self.i = Path(path), specs, 0
        header, offset = {"__metadata__": metadata}, 0
        for name, st_dtype, shape in specs:
            n = numel(shape) * _DTYPE_BYTES[st_dtype]
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.f = open(self.path, "wb")
        self.hash = hashlib.sha256()
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, data):
        self.f.write(data)
        self.hash.update(data)

    def add(self, name, tensor):
        want, st_dtype, shape = self.specs[self.i]
        if name != want or ST_DTYPES.get(tensor.dtype) != st_dtype or tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.path.name}: expected {want} {st_dtype} {list(shape)} next, got {name} "
                f"{ST_DTYPES.get(tensor.dtype, tensor.dtype)} {list(tensor.shape)}."
            )
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self._write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.i += 1

    def close(self):
        self.f.close()
        if self.i != len(self.specs):
            raise CheckpointError(f"{self.path.name} got {self.i} of its {len(self.specs)} tensors.")
        return self.hash.hexdigest()


class ShardWriter:
    """Writes a checkpoint as shards of at most max_shard_bytes (a single larger tensor gets its own shard):
    model.safetensors when one shard is enough, else model-0000i-of-0000n.safetensors and the index. Streams: each
    tensor goes to disk when added, so memory holds one tensor at a time whatever the shard size.

    specs, [(name, torch dtype, shape)] in the order tensors will be added, lets every shard be laid out up front
    and written once. Without specs, each shard's data is spilled to a side file and copied behind its header when
    the shard is full (memory stays flat; the bytes are written twice). `hashes` maps file name -> sha256 after
    close."""

    def __init__(self, folder, max_shard_bytes=5 * 2**30, metadata=None, specs=None):
        self.folder = Path(folder)
        self.max = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.specs = None if specs is None else [(n, ST_DTYPES[d], tuple(s)) for n, d, s in specs]
        self.names, self.total, self.hashes, self.files = set(), 0, {}, []  # files: [(temp path, [names])]
        self._plan, self._shard, self._pending, self._spill, self._spill_size = None, None, [], None, 0
        if self.specs is not None:
            sizes = [(n, numel(s) * _DTYPE_BYTES[d]) for n, d, s in self.specs]
            by_name = {n: (n, d, s) for n, d, s in self.specs}
            self._plan = [[by_name[n] for n in names] for names in plan_shards(sizes, self.max)]

    def add(self, name, tensor):
        if name in self.names:
            raise CheckpointError(f"tensor {name} written twice.")
        self.names.add(name)
        size = tensor.numel() * tensor.element_size()
        self.total += size
        if self._plan is not None:
            if self._shard is None or self._shard.i == len(self._shard.specs):
                self._next_planned()
            self._shard.add(name, tensor)
            return
        if self._pending and self._spill_size + size > self.max:
            self._finish_spilled()
        if self._spill is None:
            self._spill = open(self.folder / f".part-{len(self.files):05d}.data", "wb")
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self._spill.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._pending.append((name, ST_DTYPES[t.dtype], tuple(t.shape)))
        self._spill_size += size

    def _next_planned(self):
        if self._shard is not None:
            self.hashes[len(self.files) - 1] = self._shard.close()
        if len(self.files) == len(self._plan):
            raise CheckpointError("more tensors added than the specs listed.")
        specs = self._plan[len(self.files)]
        path = self.folder / f".part-{len(self.files):05d}.safetensors"
        self.files.append((path, [n for n, _, _ in specs]))
        self._shard = _Shard(path, specs, self.metadata)

    def _finish_spilled(self):
        path = self.folder / f".part-{len(self.files):05d}.safetensors"
        specs, self._pending = self._pending, []
        shard = _Shard(path, specs, self.metadata)  # the header, then the spilled bytes behind it
        if self._spill is not None:
            self._spill.close()
            spill = Path(self._spill.name)
            with open(spill, "rb") as data:
                while chunk := data.read(64 * 2**20):
                    shard._write(chunk)
            spill.unlink()
        shard.i = len(specs)  # the bytes went in whole, in spec order
        self.hashes[len(self.files)] = shard.close()
        self.files.append((path, [n for n, _, _ in specs]))
        self._spill, self._spill_size = None, 0

    def close(self):
        if self._plan is not None:
            if self._shard is None:  # an empty checkpoint
                self._next_planned()
            if len(self.files) != len(self._plan):
                raise CheckpointError(f"only {len(self.names)} of the {len(self.specs)} listed tensors were added.")
            self.hashes[len(self.files) - 1] = self._shard.close()
        elif self._pending or not self.files:
            self._finish_spilled()
        n = len(self.files)
        finals = [SINGLE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        self.hashes = {final: self.hashes[i] for i, final in enumerate(finals)}
        weight_map = {}
        for (path, names), final in zip(self.files, finals):
            path.rename(self.folder / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


# What a conversion CLI reports as "error: ..." with exit status 1 (a bad input, an occupied or missing path); anything
# else is a bug and keeps its traceback.
CLI_ERRORS = (ValueError, FileExistsError, FileNotFoundError)


def parse_size(text):
    """'5GB' -> 5e9, '512MiB' -> 2**29, '1.5GB' -> 1.5e9, 1000 -> 1000 (GB etc. are powers of 1000, as transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read the size {text!r}: use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ValueError(f"the shard size must be positive, got {text!r}")
    return size


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
