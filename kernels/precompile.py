"""Compile fla's Triton kernels in parallel before their first use, instead of one after another as the first
prefill or training step reaches them (with pre-chosen configurations, kernels/tuned.py, a fresh process still
spent about a minute compiling on an H100: about 20 kernel variants, each a few seconds, in sequence).

A record file (`compiled_smXY.json` beside this module) lists every fla kernel variant the model's KDA paths
compile, as Triton's own specialization data (argument types, divisibility, constexprs, launch options), grouped
by phase: "<dtype>:forward" (prefill, every variant: dense and variable-length, with and without an initial state)
and "<dtype>:backward" (what a training step adds). `warm(dtype, training)`, called by `kda_prefill` on its first
CUDA call in each phase, hands every variant of the phases needed to Triton's `AsyncCompileMode` on a thread pool
(Triton's compiler releases the GIL for most of its work; ptxas is a separate process): the kernels compile side
by side and land in the JIT caches under the keys the real calls look up. A variant the file lacks compiles on
first use as before (slow once, never wrong); a file recorded with another fla-core, Triton or GPU architecture is
ignored. KIMI_FLA_PRECOMPILE=0 turns this off; KIMI_FLA_PRECOMPILE_THREADS sets the pool size.

Record on the card (pinned configurations on, so that only the chosen variants are compiled):
    python -m kimi_linear_kernels.precompile --out kernels/compiled_sm90.json
"""

import argparse
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from .tuned import HERE, _identity, _unwrap, _write, read_matching, record_if_tuned

logger = logging.getLogger(__name__)

_done = set()  # (device, phase) warmed (or found absent) in this process
history = []  # (phases, variants submitted, seconds) per warm() that compiled something: benchmarks report it
_lock = threading.Lock()


def default_file(capability):
    return HERE / f"compiled_sm{capability[0]}{capability[1]}.json"


def phases(dtype, training):
    """The record phases a call needs: its dtype's forward variants, and the backward ones when it trains."""
    name = str(dtype).removeprefix("torch.")
    return [f"{name}:forward"] + ([f"{name}:backward"] if training else [])


def _jit_function(full_name):
    """The JITFunction fla defines under `full_name` (module.qualname), through any autotuner/heuristics wrappers."""
    import importlib

    from triton.runtime.jit import JITFunction

    module, _, attr = full_name.rpartition(".")
    found = _unwrap(getattr(importlib.import_module(module), attr), JITFunction)
    if found is None:
        raise LookupError(f"{full_name} is not a Triton kernel")
    return found


def _triton_dir():
    """Where Triton is installed: the launch options name its libdevice by absolute path, so a record made on one
    machine is moved to this one's (in the options and in the JIT cache key alike)."""
    import triton

    return os.path.dirname(triton.__file__)


@contextmanager
def compile_events(only_fla=True):
    """Within the block, every kernel variant Triton compiles (or loads from its disk cache) into a process's JIT
    cache is appended to the yielded list as {"name", "data" (specialization data), "warmup" (True when it came
    through preload/warmup, False when a launch had to compile it)}. Chains to any hook already installed."""
    from triton import knobs

    events = []
    previous = knobs.runtime.jit_post_compile_hook

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        name = f"{fn.module}.{fn.name}"
        if not only_fla or name.startswith("fla."):
            events.append({"name": name, "data": compile["specialization_data"], "warmup": bool(is_manual_warmup)})
        if previous is not None:
            return previous(key=key, repr=repr, fn=fn, compile=compile, is_manual_warmup=is_manual_warmup,
                            already_compiled=already_compiled)  # fmt: skip
        return None

    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield events
    finally:
        knobs.runtime.jit_post_compile_hook = previous


def _load(path=None):
    """The record matching this machine (fla-core, Triton, GPU architecture), or None."""
    path = path or os.environ.get("KIMI_FLA_COMPILED") or default_file(_identity()["capability"])
    return read_matching(path, "kernels compile on first use")


def warm(dtype, training, path=None):
    """Compile, side by side, every recorded fla kernel variant for `dtype` (and its backward when `training`) that
    this process has not warmed yet. Returns (variants submitted, seconds); (0, 0.0) when there is nothing to do.
    Failures only cost the parallelism: such a variant compiles on first use."""
    if os.environ.get("KIMI_FLA_PRECOMPILE", "1") == "0":
        return 0, 0.0
    import torch

    device = torch.cuda.current_device() if torch.cuda.is_available() else None  # Triton caches per device
    with _lock:
        wanted = [p for p in phases(dtype, training) if (device, p) not in _done]
        if not wanted:
            return 0, 0.0
        _done.update((device, p) for p in wanted)
        data = _load(path)
        if data is None:
            return 0, 0.0
        entries = [e for e in data["variants"] if e["phase"] in wanted]
        if not entries:
            return 0, 0.0
        from triton.runtime._async_compile import AsyncCompileMode

        threads = int(os.environ.get("KIMI_FLA_PRECOMPILE_THREADS", 0)) or min(32, os.cpu_count() or 1)
        start = time.perf_counter()
        failed = []
        with ThreadPoolExecutor(threads, thread_name_prefix="kimi-precompile") as pool:
            with AsyncCompileMode(pool, ignore_errors=True):
                here = _triton_dir()
                for e in entries:
                    try:
                        _jit_function(e["name"]).preload(e["data"].replace(data["triton_dir"], here))
                    except Exception as err:  # noqa: BLE001 - a variant that cannot be preloaded compiles later
                        failed.append(f"{e['name']}: {err}")
        seconds = time.perf_counter() - start
        if failed:
            logger.warning("Kimi Linear: %d fla kernel variants could not be precompiled (they compile on first use): "
                           "%s", len(failed), "; ".join(failed[:3]))  # fmt: skip
        logger.info("Kimi Linear: compiled %d fla kernel variants (%s) in %.1f s on %d threads",
                    len(entries), ", ".join(wanted), seconds, threads)  # fmt: skip
        history.append((wanted, len(entries), seconds))
        return len(entries), seconds


# The variants the model's KDA layer compiles, per phase: inference prefill (dense and variable-length, a first
# prompt and a continuation from a cached state; the final state is always kept) and training (no initial state,
# no final state, dense and variable-length). Batch 1 and 2: a kernel that takes the batch size as an integer
# argument is specialized on B == 1.
def _passes():
    fwd = [dict(batch=b, varlen=v, state=s, final=True, backward=False)
           for b in (1, 2) for v in (False, True) for s in (False, True) if not (v and b == 2)]  # fmt: skip
    bwd = [dict(batch=b, varlen=v, state=False, final=False, backward=True)
           for b in (1, 2) for v in (False, True) if not (v and b == 2)]  # fmt: skip
    return [("bfloat16", "forward", fwd), ("bfloat16", "backward", bwd), ("float32", "forward", fwd)]


def record(out, T=1024, H=32, K=128):
    """Run the model's KDA call patterns (kimi_linear_kernels.kda_prefill, released head shape) phase by phase and
    write every fla kernel variant first compiled in each phase to `out`; returns the data written."""
    import torch

    import kimi_linear_kernels as kernels

    variants, seen = [], set()
    for dtype, direction, runs in _passes():
        dt = getattr(torch, dtype)
        with compile_events() as events:
            for r in runs:
                rows = 1 if r["varlen"] else r["batch"]
                length = 2 * T if r["varlen"] else T
                q, k, v, g = (torch.randn(rows, length, H, K, device="cuda", dtype=dt) for _ in range(4))
                beta = torch.randn(rows, length, H, device="cuda", dtype=dt)
                args = [q, k, v, g, beta, torch.rand(H, device="cuda").mul(15).add(1).log(),
                        torch.randn(H * K, device="cuda")]  # fmt: skip
                cu = torch.tensor([0, T // 3, length], device="cuda") if r["varlen"] else None
                seqs = 2 if r["varlen"] else rows
                h0 = torch.randn(seqs, H, K, K, device="cuda") if r["state"] else None
                if r["backward"]:
                    args = [a.requires_grad_(True) for a in args]
                    o, _ = kernels.kda_prefill(*args, initial_state=h0, output_final_state=r["final"], cu_seqlens=cu)
                    o.float().square().mean().backward()
                else:
                    with torch.no_grad():
                        kernels.kda_prefill(*args, initial_state=h0, output_final_state=r["final"], cu_seqlens=cu)
                torch.cuda.synchronize()
        phase = f"{dtype}:{direction}"
        for e in events:
            ident = (e["name"], json.loads(e["data"])["key"])
            if ident not in seen:
                seen.add(ident)
                variants.append({"phase": phase, "name": e["name"], "data": e["data"]})
        print(f"{phase}: {sum(v['phase'] == phase for v in variants)} kernel variants", flush=True)
    if record_if_tuned(Path(out).parent, "precompile"):  # then the record also holds every candidate it tried
        print("warning: fla autotuned during the record: merge the tuned file written and record again", flush=True)
    card = torch.cuda.get_device_name(0)
    return _write(out, {**_identity(), "card": card, "triton_dir": _triton_dir(), "variants": variants})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="record file to write")
    args = ap.parse_args()
    os.environ["KIMI_FLA_PRECOMPILE"] = "0"  # record what the calls compile, not what a record preloads
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    data = record(args.out)
    print(f"wrote {args.out}: {len(data['variants'])} kernel variants")


if __name__ == "__main__":
    main()
