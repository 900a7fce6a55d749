"""CPU prefill benchmark: this repo's Kimi Linear vs transformers' built-in `kimi_linear` PyTorch path.

Requirement checked: on this CPU machine, prefill of 4k tokens is at least 1.5x faster than transformers'
built-in PyTorch path on the same weights (both measured in one run; the ratio is reported).

Run it from the repo root (the script form, never `python -m`, so the repo's kernels/ folder does not become an
importable top-level `kernels` package):

    python benchmarks/cpu_prefill.py

(about 15 minutes on 2 cores; `--lengths 512 1024 --repeats 3 --skip-kda` is a one-minute smoke test).

What it does:
1. Writes a random float32 checkpoint of benchmarks/configs/cpu_prefill.json (released config.json layout; a
   CPU-sized hybrid: 3 KDA layers of 16 x 128 heads then one NoPE MLA layer, MoE 8 experts top-2 + 1 shared)
   with kimi_linear_conversion.random_checkpoint into a temporary folder.
2. Starts two long-lived worker processes, one per implementation, each with torch threads = 2:
   ours  = kimi_linear.modeling_kimi_linear.KimiLinearForCausalLM.from_pretrained(dir, dtype=float32)
   built-in = transformers.KimiLinearForCausalLM.from_pretrained(dir, dtype=float32) (converts the released
   layout on load). Aborts unless the built-in reports no missing/unexpected/mismatched keys and both give the
   same logits (relative error < 1e-4) on a 100-token input.
3. For each length: one warm-up per variant, then --repeats timed forwards per variant, interleaved round-robin
   (rotated each repeat) across the workers: ours (use_cache=False), built-in (use_cache=False) and ours
   (use_cache=True, the real prefill). Batch 1, float32, torch.inference_mode. The speed-up is
   median(built-in) / median(ours, use_cache=False).
4. One KDA layer alone at the released dims (B=1, T=4096, H=32, K=V=128, float32): our kda_chunk_torch vs the
   built-in chunk_kimi_delta_attention, on identical inputs; outputs and final states must agree (rel err
   < 1e-4). Falls back to T=2048 when the built-in's estimated memory exceeds --kda-max-gib. The agreement run
   doubles as the warm-up. This runs in two fresh workers (no model loaded).
5. Peak memory: each worker resets its kernel peak-RSS counter (/proc/self/clear_refs, "5") before every timed
   call and reads VmHWM after it, so peaks are per implementation and per call (no tracemalloc). Reported as the
   absolute process peak (weights, runtime, inputs and outputs included) and as the rise over the RSS just
   before the call.

Outputs: a table on stdout, benchmarks/results/cpu_prefill.json (raw timings, medians, ratios, config, checks,
metadata) and benchmarks/results/cpu_prefill.png (time vs length, log-log, speed-ups annotated).

Note on noise: on a VM, memory the guest has handed back to the host is slow to touch again; the first forward
in a cold process can take several times longer than the next ones. Warm-ups, interleaving and medians are there
for that; min and max are recorded too.
"""

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CONFIG = HERE / "configs" / "cpu_prefill.json"
DEFAULT_OUT = HERE / "results"
TARGET_RATIO = 1.5
REQUIRED_LENGTH = 4096
RTOL = 1e-4
CHECK_TOKENS = 100
GIB = 2**30

VARIANTS = {  # variant -> (worker, use_cache)
    "ours": ("ours", False),
    "builtin": ("builtin", False),
    "ours_cache": ("ours", True),
}
LABELS = {
    "ours": "ours (use_cache=False)",
    "builtin": "transformers built-in (use_cache=False)",
    "ours_cache": "ours (use_cache=True)",
}


# ---------------------------------------------------------------------------------------------------------------
# Memory probes (Linux /proc; getrusage as a fallback, which cannot be reset)
# ---------------------------------------------------------------------------------------------------------------
def _proc_status():
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, val = line.split(":")
                    out[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


def rss_bytes():
    st = _proc_status()
    if "VmRSS" in st:
        return st["VmRSS"]
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return None


def reset_peak():
    """Reset the kernel's peak-RSS counter for this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes():
    st = _proc_status()
    if "VmHWM" in st:
        return st["VmHWM"]
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------------------
# Worker process: one implementation, driven by JSON lines on stdin/stdout
# ---------------------------------------------------------------------------------------------------------------
def worker_main(impl, threads):
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything libraries print goes to stderr, never into the protocol
    import torch

    torch.set_num_threads(threads)
    state = {"model": None}

    def measured(fn):
        gc.collect()
        resettable = reset_peak()
        before = rss_bytes()
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        peak = peak_bytes()
        return result, {
            "seconds": seconds,
            "peak_rss_bytes": peak,
            "rss_before_bytes": before,
            "peak_rise_bytes": (peak - before) if (resettable and before is not None) else None,
            "peak_is_per_call": resettable,
        }

    def load(ckpt):
        if impl == "ours":
            from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM as cls
        else:
            from transformers import KimiLinearForCausalLM as cls
        model, info = cls.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
        state["model"] = model.eval()
        info = {
            k: sorted(map(str, v))
            for k, v in info.items()
            if k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
        }
        return {
            "loading_info": info,
            "class": f"{type(model).__module__}.{type(model).__name__}",
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "rss_after_load_bytes": rss_bytes(),
        }

    def ids_for(T, seed, vocab):
        return torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(seed))

    def logits(T, seed, use_cache, save):
        model = state["model"]
        with torch.inference_mode():
            out = model(ids_for(T, seed, model.config.vocab_size), use_cache=use_cache).logits
        torch.save(out.float().clone(), save)
        return {"shape": list(out.shape)}

    def prefill(T, seed, use_cache):
        model = state["model"]
        ids = ids_for(T, seed, model.config.vocab_size)
        with torch.inference_mode():
            out, m = measured(lambda: model(ids, use_cache=use_cache))
        del out
        return m

    def kda_inputs(T, H, K, seed):
        g0 = torch.Generator().manual_seed(seed)
        q = torch.randn(1, T, H, K, generator=g0)
        k = torch.randn(1, T, H, K, generator=g0)
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        v = torch.randn(1, T, H, K, generator=g0)
        g = -torch.exp(torch.randn(1, T, H, K, generator=g0)) * torch.rand(1, T, H, K, generator=g0)  # <= 0
        beta = torch.rand(1, T, H, generator=g0)
        return q, k, v, g, beta

    def kda(T, H, K, seed, save=None):
        if impl == "ours":
            from kimi_linear.modeling_kimi_linear import kda_chunk_torch

            fn = lambda q, k, v, g, beta: kda_chunk_torch(q, k, v, g, beta, initial_state=None, output_final_state=True)
        else:
            from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention

            fn = lambda q, k, v, g, beta: chunk_kimi_delta_attention(
                q, k, v, g=g, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=False
            )
        inputs = kda_inputs(T, H, K, seed)
        with torch.inference_mode():
            (o, s), m = measured(lambda: fn(*inputs))
        if save:
            torch.save({"o": o.float().clone(), "state": s.float().clone()}, save)
        return m

    def profile(T, seed, use_cache, rows):
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        model = state["model"]
        ids = ids_for(T, seed, model.config.vocab_size)
        with torch.inference_mode(), prof(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            t0 = time.perf_counter()
            model(ids, use_cache=use_cache)
            seconds = time.perf_counter() - t0
        by_op = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)
        by_shape = p.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=30, max_shapes_column_width=100
        )
        return {"seconds": seconds, "by_op": by_op, "by_shape": by_shape}

    ops = {"load": load, "logits": logits, "prefill": prefill, "kda": kda, "profile": profile}
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        try:
            reply = {"ok": True, "result": ops[req["op"]](**req.get("args", {}))}
        except Exception as e:  # reported to the parent, which aborts loudly
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


class Worker:
    def __init__(self, impl, threads, log_dir):
        self.impl = impl
        self.log_path = Path(log_dir) / f"worker_{impl}_{int(time.time() * 1000)}.log"
        self.log = open(self.log_path, "w")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=tempfile.gettempdir(),
        )

    def call(self, op, **args):
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"worker '{self.impl}' died during {op}({args}); exit code {self.proc.wait()}.\n{tail}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"worker '{self.impl}' failed in {op}({args}): {reply['error']}\n{reply['traceback']}")
        return reply["result"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------------------------------------------
# Parent: orchestration, checks, report
# ---------------------------------------------------------------------------------------------------------------
START = time.perf_counter()


def log(msg):
    elapsed = time.perf_counter() - START
    print(f"[{int(elapsed // 60):02d}:{elapsed % 60:04.1f}] {msg}", flush=True)


def abort(msg):
    print("\n" + "!" * 100 + f"\nABORT: {msg}\n" + "!" * 100, file=sys.stderr, flush=True)
    raise SystemExit(2)


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def metadata():
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    import torch
    import transformers

    def git(*args):
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    dirty = git("status", "--porcelain", "--", "modeling_kimi_linear.py", "configuration_kimi_linear.py")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "mem_total_gib": round(mem_total / GIB, 2) if mem_total else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "model_files_modified_since_commit": bool(dirty) if dirty is not None else None,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def summarize(runs, warmup):
    times = [r["seconds"] for r in runs]
    rises = [r["peak_rise_bytes"] for r in runs if r["peak_rise_bytes"] is not None]
    return {
        "warmup_s": warmup["seconds"],
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "peak_rss_gib": max(r["peak_rss_bytes"] for r in runs) / GIB,
        "peak_rise_gib": max(rises) / GIB if rises else None,
        "peak_is_per_call": all(r["peak_is_per_call"] for r in runs),
        "raw": runs,
    }


def check_models(workers, tmp):
    import torch

    paths = {}
    for variant in ("ours", "builtin", "ours_cache"):
        impl, use_cache = VARIANTS[variant]
        paths[variant] = Path(tmp) / f"logits_{variant}.pt"
        workers[impl].call("logits", T=CHECK_TOKENS, seed=12345, use_cache=use_cache, save=str(paths[variant]))
    ours, builtin, ours_cache = (torch.load(paths[v]) for v in ("ours", "builtin", "ours_cache"))
    if ours.shape != builtin.shape:
        abort(f"logit shapes differ: ours {list(ours.shape)} vs built-in {list(builtin.shape)}")
    errs = {
        "logits_rel_err_ours_vs_builtin": rel_err(ours, builtin),
        "logits_max_abs_diff_ours_vs_builtin": float((ours - builtin).abs().max()),
        "logits_rel_err_ours_cache_vs_ours": rel_err(ours_cache, ours),
    }
    log(
        f"  logits on {CHECK_TOKENS} tokens: rel err ours vs built-in {errs['logits_rel_err_ours_vs_builtin']:.2e}, "
        f"ours cache vs no cache {errs['logits_rel_err_ours_cache_vs_ours']:.2e}"
    )
    if not errs["logits_rel_err_ours_vs_builtin"] < RTOL:
        abort(
            f"ours and the built-in disagree on the same weights: logits rel err "
            f"{errs['logits_rel_err_ours_vs_builtin']:.3e} >= {RTOL}; timings would be meaningless."
        )
    if not errs["logits_rel_err_ours_cache_vs_ours"] < RTOL:
        err = errs["logits_rel_err_ours_cache_vs_ours"]
        abort(f"ours with use_cache=True differs from use_cache=False: rel err {err:.3e}")
    return errs


def bench_models(args, ckpt, tmp):
    workers = {impl: Worker(impl, args.threads, tmp) for impl in ("ours", "builtin")}
    try:
        loads = {}
        for impl, w in workers.items():
            log(f"loading {impl} model in its worker (pid {w.proc.pid})")
            loads[impl] = w.call("load", ckpt=str(ckpt))
            log(
                f"  {loads[impl]['class']}: {loads[impl]['num_parameters'] / 1e6:.1f}M parameters, "
                f"RSS {loads[impl]['rss_after_load_bytes'] / GIB:.2f} GiB"
            )
        info = loads["builtin"]["loading_info"]
        bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
        if bad or info.get("error_msgs"):
            abort(f"transformers' built-in class did not load the released layout cleanly: {info}")
        log("built-in loading info: no missing, unexpected or mismatched keys")
        checks = check_models(workers, tmp)

        results = {}
        order = list(VARIANTS)
        n_calls = len(args.lengths) * len(order) * (args.repeats + 1)
        done = 0
        for T in args.lengths:
            seed = T  # the same tokens for every variant at this length
            warm, runs = {}, {v: [] for v in order}
            for v in order:
                impl, use_cache = VARIANTS[v]
                done += 1
                log(f"T={T} warm-up {v:<10} [{done}/{n_calls}]")
                warm[v] = workers[impl].call("prefill", T=T, seed=seed, use_cache=use_cache)
                log(f"  {warm[v]['seconds']:.2f} s")
            for r in range(args.repeats):
                rot = order[r % len(order) :] + order[: r % len(order)]  # rotate to spread drift
                for v in rot:
                    impl, use_cache = VARIANTS[v]
                    done += 1
                    m = workers[impl].call("prefill", T=T, seed=seed, use_cache=use_cache)
                    runs[v].append(m)
                    log(
                        f"T={T} run {r + 1}/{args.repeats} {v:<10} {m['seconds']:7.2f} s  "
                        f"peak RSS {m['peak_rss_bytes'] / GIB:.2f} GiB [{done}/{n_calls}]"
                    )
            row = {v: summarize(runs[v], warm[v]) for v in order}
            row["speedup"] = row["builtin"]["median_s"] / row["ours"]["median_s"]
            row["speedup_ours_cache"] = row["builtin"]["median_s"] / row["ours_cache"]["median_s"]
            results[str(T)] = row
            log(
                f"T={T}: ours {row['ours']['median_s']:.2f} s, built-in {row['builtin']['median_s']:.2f} s, "
                f"speed-up {row['speedup']:.2f}x"
            )

        prof = None
        if args.profile:
            T = max(args.lengths)
            log(f"profiling ours at T={T} with torch.profiler")
            prof = workers["ours"].call("profile", T=T, seed=T, use_cache=False, rows=25)
            print(prof["by_op"], flush=True)
            print(prof["by_shape"], flush=True)
        return {"loading": loads, "checks": checks, "prefill": results, "profile": prof}
    finally:
        for w in workers.values():
            w.close()


def bench_kda(args, tmp):
    import torch

    H, K, T = args.kda_heads, 128, args.kda_seq_len
    note = None

    def builtin_estimate(T):  # decay_mask and two temporaries of [B, H, T, 64, K] float32, plus chunked copies
        return (3 * H * (T + (-T % 64)) * 64 * K + 24 * T * H * K) * 4

    if builtin_estimate(T) > args.kda_max_gib * GIB:
        note = (
            f"built-in chunk_kimi_delta_attention would need ~{builtin_estimate(T) / GIB:.1f} GiB at T={T}, H={H} "
            f"(> {args.kda_max_gib} GiB); measured at T=2048 instead"
        )
        T = 2048
        log(note)
    workers = {impl: Worker(impl, args.threads, tmp) for impl in ("ours", "builtin")}
    try:
        saves = {impl: Path(tmp) / f"kda_{impl}.pt" for impl in workers}
        warm = {}
        n_calls = 2 * (args.kda_repeats + 1)
        done = 0
        for impl, w in workers.items():
            done += 1
            log(f"KDA layer B=1 T={T} H={H} K=V={K}: agreement run (= warm-up) {impl} [{done}/{n_calls}]")
            warm[impl] = w.call("kda", T=T, H=H, K=K, seed=7, save=str(saves[impl]))
            log(f"  {warm[impl]['seconds']:.2f} s, peak RSS {warm[impl]['peak_rss_bytes'] / GIB:.2f} GiB")
        a, b = torch.load(saves["ours"]), torch.load(saves["builtin"])
        errs = {"o_rel_err": rel_err(a["o"], b["o"]), "state_rel_err": rel_err(a["state"], b["state"])}
        del a, b
        log(f"  agreement: output rel err {errs['o_rel_err']:.2e}, final state rel err {errs['state_rel_err']:.2e}")
        if not (errs["o_rel_err"] < RTOL and errs["state_rel_err"] < RTOL):
            abort(f"KDA layer: kda_chunk_torch and chunk_kimi_delta_attention disagree: {errs}")
        runs = {impl: [] for impl in workers}
        order = list(workers)
        for r in range(args.kda_repeats):
            for impl in order[r % 2 :] + order[: r % 2]:
                done += 1
                m = workers[impl].call("kda", T=T, H=H, K=K, seed=7)
                runs[impl].append(m)
                log(
                    f"KDA layer run {r + 1}/{args.kda_repeats} {impl:<8} {m['seconds']:7.2f} s  "
                    f"peak RSS {m['peak_rss_bytes'] / GIB:.2f} GiB [{done}/{n_calls}]"
                )
        out = {impl: summarize(runs[impl], warm[impl]) for impl in workers}
        out["speedup"] = out["builtin"]["median_s"] / out["ours"]["median_s"]
        out.update(
            {
                "B": 1,
                "T": T,
                "H": H,
                "K": K,
                "V": K,
                "dtype": "float32",
                "checks": errs,
                "note": note,
                "ours_fn": "kimi_linear.modeling_kimi_linear.kda_chunk_torch",
                "builtin_fn": "transformers.models.kimi_linear.modeling_kimi_linear.chunk_kimi_delta_attention",
            }
        )
        log(
            f"KDA layer: ours {out['ours']['median_s']:.2f} s, built-in {out['builtin']['median_s']:.2f} s, "
            f"speed-up {out['speedup']:.2f}x"
        )
        return out
    finally:
        for w in workers.values():
            w.close()


def print_table(report):
    pre = report["prefill"]
    head = (
        f"{'length':>7} | {'ours s':>8} | {'ours+cache s':>12} | {'built-in s':>10} | {'speed-up':>8} | "
        f"{'peak RSS ours':>13} | {'peak RSS ours+cache':>19} | {'peak RSS built-in':>17}"
    )
    print(
        "\nWhole-model prefill (median of timed runs; batch 1, float32, "
        f"{report['settings']['threads']} threads; peak RSS of each worker process, GiB (rise over pre-call RSS))"
    )
    print(head)
    print("-" * len(head))
    for T, row in pre.items():

        def mem(v, row=row):
            rise = row[v]["peak_rise_gib"]
            return (
                f"{row[v]['peak_rss_gib']:.2f} ({rise:+.2f})" if rise is not None else f"{row[v]['peak_rss_gib']:.2f}"
            )

        print(
            f"{T:>7} | {row['ours']['median_s']:8.2f} | {row['ours_cache']['median_s']:12.2f} | "
            f"{row['builtin']['median_s']:10.2f} | {row['speedup']:7.2f}x | {mem('ours'):>13} | "
            f"{mem('ours_cache'):>19} | {mem('builtin'):>17}"
        )
    kda = report.get("kda_layer")
    if kda:
        print(
            f"\nOne KDA layer (B=1, T={kda['T']}, H={kda['H']}, K=V={kda['K']}): ours {kda['ours']['median_s']:.2f} s "
            f"(peak {kda['ours']['peak_rss_gib']:.2f} GiB), built-in {kda['builtin']['median_s']:.2f} s "
            f"(peak {kda['builtin']['peak_rss_gib']:.2f} GiB), speed-up {kda['speedup']:.2f}x"
            + (f"  [{kda['note']}]" if kda.get("note") else "")
        )
    h = report["headline"]
    if h.get("ratio") is not None:
        verdict = "PASS" if h["pass"] else "FAIL"
        print(
            f"\nRequirement (prefill {h['length']} tokens >= {TARGET_RATIO}x the built-in): "
            f"{h['ratio']:.2f}x -> {verdict}"
        )
    print(f"Total runtime {report['total_runtime_s'] / 60:.1f} min", flush=True)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    pre = report["prefill"]
    Ts = [int(t) for t in pre]
    fig, (ax, axm) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    styles = {"ours": ("C0", "o-"), "ours_cache": ("C2", "s--"), "builtin": ("C3", "^-")}
    for v in ("ours", "ours_cache", "builtin"):
        color, style = styles[v]
        med = [pre[str(t)][v]["median_s"] for t in Ts]
        lo = [pre[str(t)][v]["median_s"] - pre[str(t)][v]["min_s"] for t in Ts]
        hi = [pre[str(t)][v]["max_s"] - pre[str(t)][v]["median_s"] for t in Ts]
        ax.errorbar(Ts, med, yerr=[lo, hi], fmt=style, color=color, capsize=3, label=LABELS[v])
        axm.plot(Ts, [pre[str(t)][v]["peak_rss_gib"] for t in Ts], style, color=color, label=LABELS[v])
    for t in Ts:
        row = pre[str(t)]
        y = (row["ours"]["median_s"] * row["builtin"]["median_s"]) ** 0.5
        ax.annotate(
            f"{row['speedup']:.2f}x faster",
            (t, y),
            xytext=(6, 0),
            textcoords="offset points",
            fontsize=10,
            fontweight="bold" if t == REQUIRED_LENGTH else None,
            va="center",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(Ts, [str(t) for t in Ts])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlim(min(Ts) / 1.3, max(Ts) * 1.6)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("prefill time (s), median; bars: min-max")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    kda = report.get("kda_layer")
    if kda:
        ax.text(
            0.98,
            0.03,
            f"one KDA layer (T={kda['T']}, H={kda['H']}, K=V={kda['K']}):\n"
            f"ours {kda['ours']['median_s']:.1f} s vs built-in {kda['builtin']['median_s']:.1f} s"
            f" = {kda['speedup']:.2f}x",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8},
        )
    axm.set_xscale("log", base=2)
    axm.set_xticks(Ts, [str(t) for t in Ts])
    axm.set_xlabel("prompt length (tokens)")
    axm.set_ylabel("peak RSS of the worker process (GiB)")
    axm.grid(True, alpha=0.3)
    axm.legend(fontsize=8)
    md = report["metadata"]
    fig.suptitle(
        f"Kimi Linear CPU prefill, float32, batch 1, {report['settings']['threads']} threads "
        f"({report['config']['num_hidden_layers']} layers, hidden {report['config']['hidden_size']})\n"
        f"{md['date_utc'][:10]} - {md['cpu_model']} ({md['cpu_count']} cores) - torch {md['torch']}, "
        f"transformers {md['transformers']} - commit {md['git_commit']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[1024, 2048, 4096],
        help="prompt lengths for the whole-model prefill (default: %(default)s)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per variant per length, after one warm-up (default: %(default)s)",
    )
    ap.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT, help="where cpu_prefill.json/.png go (default: %(default)s)"
    )
    ap.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="config.json in the released format (default: %(default)s)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads per worker (default: %(default)s)")
    ap.add_argument("--kda-seq-len", type=int, default=4096, help="T of the single KDA layer (default: %(default)s)")
    ap.add_argument("--kda-heads", type=int, default=32, help="H of the single KDA layer (default: %(default)s)")
    ap.add_argument(
        "--kda-repeats",
        type=int,
        default=3,
        help="timed runs of the KDA layer per implementation (default: %(default)s)",
    )
    ap.add_argument(
        "--kda-max-gib",
        type=float,
        default=16.0,
        help="fall back to T=2048 when the built-in KDA layer is estimated above this (default: %(default)s)",
    )
    ap.add_argument("--skip-kda", action="store_true", help="skip the single-KDA-layer benchmark")
    ap.add_argument("--profile", action="store_true", help="also profile ours at the longest length (torch.profiler)")
    ap.add_argument("--worker", choices=["ours", "builtin"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        return worker_main(args.worker, args.threads)
    if args.repeats < 3:
        log(f"warning: --repeats {args.repeats} < 3; medians of fewer than 3 runs are fragile")
    args.lengths = sorted(set(args.lengths))
    config = json.loads(args.config.read_text())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="kimi_cpu_prefill_"))
    try:
        from kimi_linear_conversion.random_checkpoint import make_random_checkpoint

        log(f"writing a random float32 checkpoint of {args.config} to {tmp / 'ckpt'}")
        ckpt = make_random_checkpoint(config, tmp / "ckpt", seed=0, dtype="float32", tokenizer=False)
        report = {
            "requirement": f"On this CPU machine, prefill of {REQUIRED_LENGTH} tokens is at least {TARGET_RATIO}x "
            "faster than transformers' built-in PyTorch path on the same weights",
            "metadata": metadata(),
            "config_path": str(args.config.resolve().relative_to(REPO))
            if args.config.resolve().is_relative_to(REPO)
            else str(args.config),
            "config": config,
            "settings": {
                "lengths": args.lengths,
                "repeats": args.repeats,
                "warmup_runs": 1,
                "threads": args.threads,
                "batch": 1,
                "dtype": "float32",
                "mode": "torch.inference_mode",
                "variants": {v: {"implementation": VARIANTS[v][0], "use_cache": VARIANTS[v][1]} for v in VARIANTS},
                "order": "round-robin over variants in two long-lived worker processes, rotated each repeat",
                "speedup": "median(builtin) / median(ours, use_cache=False)",
                "peak_memory": "VmHWM after resetting it via /proc/self/clear_refs before each call; "
                "peak_rise = VmHWM - VmRSS just before the call",
                "checkpoint": "kimi_linear_conversion.random_checkpoint.make_random_checkpoint(seed=0, float32)",
                "check_tolerance_rel": RTOL,
            },
        }
        report.update(bench_models(args, ckpt, tmp))
        if not args.skip_kda:
            report["kda_layer"] = bench_kda(args, tmp)
        T = REQUIRED_LENGTH if str(REQUIRED_LENGTH) in report["prefill"] else max(args.lengths)
        ratio = report["prefill"][str(T)]["speedup"]
        report["headline"] = {
            "length": T,
            "ratio": ratio,
            "target": TARGET_RATIO,
            "pass": ratio >= TARGET_RATIO,
            "ratio_ours_cache": report["prefill"][str(T)]["speedup_ours_cache"],
            "kda_layer_ratio": report["kda_layer"]["speedup"] if "kda_layer" in report else None,
            "note": None if T == REQUIRED_LENGTH else f"{REQUIRED_LENGTH} not among --lengths; headline at {T}",
        }
        report["total_runtime_s"] = time.perf_counter() - START
        report["metadata"]["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        json_path, png_path = args.out_dir / "cpu_prefill.json", args.out_dir / "cpu_prefill.png"
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        plot(report, png_path)
        print_table(report)
        log(f"wrote {json_path} and {png_path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
