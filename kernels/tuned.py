"""Pre-chosen launch configurations for fla-core's autotuned Triton kernels, so a fresh process compiles one
configuration per kernel instead of benchmarking every candidate (fla's first chunk_kda forward + backward spends
minutes autotuning; see benchmarks/cold_start.py).

A configuration file holds, per autotuned kernel (module and attribute name inside fla), the autotuner's choices
keyed exactly as the autotuner keys them (its key arguments and argument dtypes), plus the fla-core, Triton and
GPU architecture they were chosen on. `pin()` fills the autotuners' caches with those choices, only when all
three match this machine: any other shape, version or card autotunes as usual (slow once, never wrong).
KIMI_FLA_PINNED=0 turns pinning off; KIMI_FLA_TUNED=path reads another file.

Record a file on the card (in a process that does not pin, so that the autotuners run):
    KIMI_FLA_PINNED=0 python -m kimi_linear_kernels.tuned --out kernels/tuned_sm90.json
The GPU benchmarks also write what they had to tune beyond the file (record_if_tuned: transformers' built-in model
calls fla's kernels in other ways); fold those in with
    python -m kimi_linear_kernels.tuned --merge kernels/tuned_sm90.json tuned_sm90.decode.json \
        --out kernels/tuned_sm90.json
"""

import argparse
import importlib
import importlib.metadata
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent


def default_file(capability):
    return HERE / f"tuned_sm{capability[0]}{capability[1]}.json"


def _unwrap(value, kind=None):
    """The object of class `kind` (default: Triton's Autotuner) inside a kernel object, following the `fn` of each
    wrapper (@triton.heuristics, @triton.autotune), or None."""
    if kind is None:
        from triton.runtime.autotuner import Autotuner as kind

    for _ in range(8):
        if isinstance(value, kind):
            return value
        value = getattr(value, "fn", None)
    return None


IDENTITY_KEYS = ("fla-core", "triton", "capability")


def read_matching(path, what):
    """The JSON record at `path` when it was made with this machine's fla-core, Triton and GPU architecture; None
    when it is absent or made elsewhere (logged, naming `what` happens instead)."""
    path = Path(path)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    ident = _identity()
    mismatch = [k for k in IDENTITY_KEYS if data.get(k) != ident[k]]
    if mismatch:
        logger.info("Kimi Linear: %s was made for another %s; %s", path.name, mismatch, what)
        return None
    return data


def _autotuners():
    """(module, attribute, autotuner) for every Triton autotuner fla has defined so far, each once (modules
    re-export kernels under other names)."""
    seen = set()
    for name, module in sorted(sys.modules.items()):
        if name.startswith("fla.") and module is not None:
            for attr, value in list(vars(module).items()):
                tuner = _unwrap(value)
                if tuner is not None and id(tuner) not in seen:
                    seen.add(id(tuner))
                    yield name, attr, tuner


def _identity():
    import torch

    return {
        "fla-core": importlib.metadata.version("fla-core"),
        "triton": importlib.metadata.version("triton"),
        "capability": list(torch.cuda.get_device_capability()),
    }


def record(path, card=None):
    """Write the choices every fla autotuner has made in this process to `path` (atomically)."""
    kernels = {}
    for module, attr, tuner in _autotuners():
        entries = [
            {"key": list(key), "kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
             "num_ctas": cfg.num_ctas, "maxnreg": cfg.maxnreg}
            for key, cfg in tuner.cache.items()
        ]  # fmt: skip
        if entries:
            kernels[f"{module}:{attr}"] = entries
    return _write(path, {**_identity(), "card": card, "kernels": dict(sorted(kernels.items()))})


def _write(path, data):
    """A configuration file written beside and renamed into place; returns data."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return data


# Key arguments that do not change which launch configuration is valid or best by much: a choice recorded for
# one value serves the others (the varlen variant of a kernel shares its tiles with the dense one; the batch size
# only changes the grid). Exact choices, where recorded, come first.
LOOSE_KEYS = {"B", "IS_VARLEN"}


class _LooseCache(dict):
    """An autotuner's cache that answers a key it has not seen with the choice recorded for a key equal to it in
    everything but LOOSE_KEYS and the optional tensors: after its named keys, Triton's autotuner key lists the dtype
    of every tensor argument given, so an initial state, a final state or the variable-length offsets each change
    it; only the first (the inputs' dtype) is kept."""

    def __init__(self, names, *args):
        super().__init__(*args)
        self.names = len(names)
        self.loose = [i for i, n in enumerate(names) if n in LOOSE_KEYS]

    def _strict(self, key):
        return tuple(v for i, v in enumerate(key[: self.names + 1]) if i not in self.loose)

    def _find(self, key):
        if dict.__contains__(self, key):
            return key
        want = self._strict(key)
        found = next((k for k in self.keys() if self._strict(k) == want), None)
        if found is not None:  # answered by key from now on: the scan ran on every launch (host time per call)
            dict.__setitem__(self, key, dict.__getitem__(self, found))
        return found

    def __contains__(self, key):
        return self._find(key) is not None

    def __getitem__(self, key):
        found = self._find(key)
        if found is None:
            raise KeyError(key)
        return dict.__getitem__(self, found)


def record_if_tuned(out_dir, name):
    """At the end of a GPU benchmark: when fla's autotuners hold choices this process made beyond the pinned file
    (another call pattern, e.g. transformers' built-in model, or another dtype), write them all to
    out_dir/tuned_smXY.<name>.json, to be merged into kernels/ with `--merge`; returns the path or None."""
    import torch

    if not any(n.startswith("fla.") for n in sys.modules) or not torch.cuda.is_available():
        return None
    ident = _identity()
    pinned = default_file(ident["capability"])
    known = _entries(json.loads(pinned.read_text())) if pinned.exists() else set()
    path = Path(out_dir) / f"{default_file(ident['capability']).stem}.{name}.json"
    data = record(path, card=torch.cuda.get_device_name(0))
    if _entries(data) <= known:
        path.unlink()
        return None
    print(f"[fla tuned kernels beyond {pinned.name}: all choices written to {path}; fold them in with "
          f"python -m kimi_linear_kernels.tuned --merge kernels/{pinned.name} {path.name} --out kernels/{pinned.name}]",
          file=sys.stderr, flush=True)  # fmt: skip
    return path


def _entries(data):
    return {(where, json.dumps(e, sort_keys=True)) for where, entries in data["kernels"].items() for e in entries}


def merge(paths, out):
    """One file holding every choice of `paths` (the same fla-core, Triton and GPU architecture; the first file's
    choice wins where two disagree on a key), written atomically to `out`."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    ident = {k: files[0].get(k) for k in IDENTITY_KEYS}
    for p, data in zip(paths, files):
        other = {k: data.get(k) for k in ident}
        if other != ident:
            raise ValueError(f"{p} was tuned on {other}, not {ident} like {paths[0]}: files of one setup only")
    kernels = {}
    for data in files:
        for where, entries in data["kernels"].items():
            have = kernels.setdefault(where, [])
            keys = {json.dumps(e["key"]) for e in have}
            have += [e for e in entries if json.dumps(e["key"]) not in keys]
    return _write(out, {**ident, "card": files[0].get("card"), "kernels": dict(sorted(kernels.items()))})


_pinned = set()


def pin(path=None):
    """Fill fla's autotuner caches from a configuration file; returns the number of choices pinned (0 when the file
    does not match this machine's fla-core, Triton and GPU architecture, or with KIMI_FLA_PINNED=0)."""
    if os.environ.get("KIMI_FLA_PINNED", "1") == "0":
        return 0
    import triton

    path = Path(path or os.environ.get("KIMI_FLA_TUNED") or default_file(_identity()["capability"]))
    data = read_matching(path, "fla autotunes as usual") if path not in _pinned else None
    if data is None:
        return 0
    count = 0
    for where, entries in data["kernels"].items():
        module, attr = where.split(":")
        try:
            tuner = _unwrap(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
        if tuner is None:
            continue
        if not isinstance(tuner.cache, _LooseCache):
            tuner.cache = _LooseCache(tuner.keys, tuner.cache)
        for e in entries:
            cfg = triton.Config(e["kwargs"], num_warps=e["num_warps"], num_stages=e["num_stages"],
                                num_ctas=e["num_ctas"], maxnreg=e["maxnreg"])  # fmt: skip
            tuner.cache.setdefault(tuple(e["key"]), cfg)
            count += 1
    _pinned.add(path)
    logger.info("Kimi Linear: pinned %d fla kernel configurations from %s", count, path.name)
    return count


def exercise(dtype="bfloat16", backward=True, batches=(1,), states=(False,), varlens=(False,), T=4096, H=32, K=128):
    """Run fla's paths the model takes (prefill, and training when `backward`; dense and varlen; with and without a
    state) at the released head shape in `dtype`, so that each autotuner makes its choice. The defaults run the
    dense path only: its choices serve the varlen and batched variants too (LOOSE_KEYS). The autotuners key on the
    argument dtypes, so every dtype the model runs in needs its own pass."""
    import time

    import torch

    import kimi_linear_kernels as kernels

    dt = getattr(torch, dtype)

    def raw(B, T):
        q, k, v, g = (torch.randn(B, T, H, K, device="cuda", dtype=dt) for _ in range(4))
        beta = torch.randn(B, T, H, device="cuda", dtype=dt)
        A_log = torch.rand(H, device="cuda").mul(15).add(1).log()
        return [q, k, v, g, beta, A_log, torch.randn(H * K, device="cuda")]

    start = time.perf_counter()
    for B in batches:
        for with_state in states:
            for varlen in varlens:
                args = raw(1, T * B) if varlen else raw(B, T)
                cu = torch.tensor([0, T // 3, T * B], device="cuda") if varlen else None
                h0 = torch.randn(2 if varlen else B, H, K, K, device="cuda") if with_state else None
                with torch.no_grad():
                    kernels.kda_prefill(*args, initial_state=h0, output_final_state=True, cu_seqlens=cu)
                done = "forward"
                if backward:
                    leaves = [a.requires_grad_(True) for a in args]
                    o, h = kernels.kda_prefill(*leaves, initial_state=h0, output_final_state=True, cu_seqlens=cu)
                    (o.float().square().mean() + h.square().mean()).backward()
                    done = "forward, forward + backward"
                torch.cuda.synchronize()
                print(f"{dtype} B={B} state={with_state} varlen={varlen}: {done} done at "
                      f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip


# What the recorded file covers: bf16 prefill and training (the model on a GPU), float32 prefill (a model loaded
# in float32 generates without a sweep; float32 training on the GPU still autotunes once).
PASSES = (("bfloat16", True), ("float32", False))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="configuration file to write")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="FILE",
                    help="instead of tuning: merge these files (e.g. kernels/tuned_sm90.json and what benchmarks "
                    "recorded, tuned_sm90.<name>.json) into --out")  # fmt: skip
    args = ap.parse_args()
    if args.merge:
        data = merge(args.merge, args.out)
        print(f"wrote {args.out}: {sum(len(v) for v in data['kernels'].values())} choices")
        return
    if os.environ.get("KIMI_FLA_PINNED") != "0":
        ap.error("set KIMI_FLA_PINNED=0: recording needs the autotuners to run, not the pinned choices")
    import torch

    for dtype, backward in PASSES:
        exercise(dtype, backward)
        data = record(args.out, card=torch.cuda.get_device_name(0))  # after each pass: a run cut short keeps it
        count = sum(len(v) for v in data["kernels"].values())
        print(f"wrote {args.out}: {count} choices, {len(data['kernels'])} kernels", flush=True)


if __name__ == "__main__":
    main()
