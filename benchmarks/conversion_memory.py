"""Peak memory of the streaming conversions on a multi-GB checkpoint, against the largest tensor.

    python benchmarks/conversion_memory.py                    # ~2.8 GB float32 source, ~3 minutes on 2 cores
    python benchmarks/conversion_memory.py --workdir /big/tmp --keep

1. Writes a synthetic float32 checkpoint in the released layout (names and shapes from our model on the meta device)
   of a scaled config: the released widths (hidden 2304, 32 x 128 heads, MLA dims, MoE width 1024), 4 layers
   (dense layer 0, KDA 1-3, MLA 4), 16 experts, vocabulary 32768. About 705M parameters, 2.8 GB, the largest
   tensors (embedding, lm_head) 302 MB each. Written tensor by tensor with io.ShardWriter into 1 GB shards.
2. Runs, each in a fresh subprocess: reshard (cast to bfloat16, 1 GB shards; io.ShardWriter with specs, written once),
   convert_layout to transformers' built-in layout (io.ShardWriter without specs), and from_released (hard links and
   sha256 of every shard). Each subprocess records VmRSS after its imports (baseline) and VmHWM (peak resident set)
   at the end; the parent also samples the child's RssAnon (anonymous memory, i.e. without the mapped file pages of
   the source shard, which the kernel can drop) every 20 ms.
3. Prints a table and writes benchmarks/results/conversion_memory.json (CPU, versions, date UTC, git commit).
"""

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "conversion_memory.json"

SCALE = {
    "num_hidden_layers": 4,
    "linear_attn_config": {
        "full_attn_layers": [4],
        "head_dim": 128,
        "kda_layers": [1, 2, 3],
        "num_heads": 32,
        "short_conv_kernel_size": 4,
    },
    "num_experts": 16,
    "num_experts_per_token": 4,
    "vocab_size": 32768,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "dtype": "float32",
}

CHILD = r"""
import json, sys, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out
from kimi_linear_conversion import convert_layout, from_released, reshard  # imports before the baseline
import kimi_linear.modeling_kimi_linear  # noqa: F401
base = status()
tool, args = sys.argv[1], sys.argv[2:]
t = time.perf_counter()
rc = {"reshard": reshard.main, "from_released": from_released.main, "convert_layout": convert_layout.main}[tool](args)
seconds = time.perf_counter() - t
print("RESULT " + json.dumps({"rc": rc, "seconds": seconds, "baseline": base, "end": status()}))
"""


def write_source(folder, shard_bytes):
    """The synthetic float32 checkpoint, one tensor at a time (values: a seeded normal per tensor)."""
    import torch

    from kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM
    from kimi_linear_conversion.io import ShardWriter, numel

    config = json.loads((REPO / ".." / "shared" / "reference" / "official_config_48b_a3b.json").read_text())
    config.update(SCALE)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in KimiLinearForCausalLM(KimiLinearConfig(**config)).state_dict().items()}
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    with ShardWriter(folder, max_shard_bytes=shard_bytes) as writer:
        for name, shape in shapes.items():
            writer.add(name, torch.empty(shape).normal_(0, 0.02, generator=gen))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "tiktoken.model").write_text("IQ== 0\n")
    largest = max(shapes, key=lambda n: numel(shapes[n]))
    return {
        "config": config,
        "num_tensors": len(shapes),
        "num_parameters": sum(numel(s) for s in shapes.values()),
        "bytes": 4 * sum(numel(s) for s in shapes.values()),
        "largest_tensor": {"name": largest, "shape": list(shapes[largest]), "bytes": 4 * numel(shapes[largest])},
        "files": sorted(p.name for p in folder.iterdir()),
    }


def run_child(tool, args):
    """Run one conversion in a fresh interpreter; return its timings and memory, with RssAnon sampled from here."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, tool, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    peak = {"RssAnon": 0, "RssFile": 0}

    def sample():
        path = f"/proc/{proc.pid}/status"
        while proc.poll() is None:
            try:
                for line in open(path):
                    key, _, value = line.partition(":")
                    if key in peak:
                        peak[key] = max(peak[key], int(value.split()[0]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{tool} failed (rc {proc.returncode}):\n{err[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    if result["rc"] != 0:
        raise RuntimeError(f"{tool} returned {result['rc']}:\n{err[-3000:]}")
    result["sampled_peak_rss_anon"] = peak["RssAnon"]
    result["sampled_peak_rss_file"] = peak["RssFile"]
    return result


def metadata():
    import safetensors
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "conversion/io.py",
                "conversion/reshard.py",
                "conversion/from_released.py",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, ""
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "platform": platform.platform(),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit,
        "conversion_files_uncommitted": dirty.splitlines(),
        "loadavg": list(os.getloadavg()),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder in /tmp)")
    ap.add_argument("--shard", default="1GB", help="output shard size for reshard (default: %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kimi-conv-mem-", dir=args.workdir))
    t0 = time.perf_counter()
    try:
        t = time.perf_counter()
        source = write_source(work / "src", 10**9)
        source["write_seconds"] = time.perf_counter() - t
        print(
            f"source: {source['num_parameters'] / 1e6:.0f}M parameters, {source['bytes'] / 1e9:.2f} GB float32, "
            f"largest tensor {source['largest_tensor']['name']} {source['largest_tensor']['bytes'] / 1e6:.0f} MB "
            f"({source['write_seconds']:.0f} s to write)",
            flush=True,
        )
        runs = {}
        plans = {
            "reshard bf16 (streaming)": (
                "reshard",
                [
                    str(work / "src"),
                    "--out",
                    str(work / "bf16"),
                    "--dtype",
                    "bfloat16",
                    "--max-shard-size",
                    args.shard,
                    "--quiet",
                ],
            ),
            "convert_layout to builtin (io.ShardWriter without specs: spilled shards)": (
                "convert_layout",
                [
                    str(work / "src"),
                    str(work / "builtin"),
                    "--to",
                    "builtin",
                    "--max-shard-size",
                    args.shard,
                    "--no-progress",
                ],
            ),  # fmt: skip
            "from_released (hard links + sha256)": (
                "from_released",
                [str(work / "src"), "--out", str(work / "ours"), "--quiet"],
            ),
        }
        for label, (tool, argv) in plans.items():
            runs[label] = run_child(tool, argv)
            runs[label]["argv"] = [tool, *argv]
            print(f"  {label}: {runs[label]['seconds']:.1f} s", flush=True)
        outputs = {name: sorted(p.name for p in (work / name).iterdir()) for name in ("bf16", "builtin", "ours")}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    largest = source["largest_tensor"]["bytes"]
    rows = []
    for label, r in runs.items():
        rise = r["end"]["VmHWM"] - r["baseline"]["VmRSS"]
        anon_rise = r["sampled_peak_rss_anon"] - r["baseline"]["RssAnon"]
        r["peak_rise_bytes"] = rise
        r["peak_anon_rise_bytes"] = anon_rise
        r["peak_rise_over_largest_tensor"] = rise / largest
        r["peak_anon_rise_over_largest_tensor"] = anon_rise / largest
        rows.append((label, r["seconds"], r["baseline"]["VmRSS"], r["end"]["VmHWM"], rise, anon_rise))
    gb = 1e9
    print(
        f"\nsource {source['bytes'] / gb:.2f} GB float32 in 1 GB shards; largest tensor {largest / 1e6:.0f} MB; "
        f"output shards {args.shard}"
    )
    print(f"{'run':44} {'time':>7} {'base RSS':>9} {'peak RSS':>9} {'rise':>8} {'x largest':>9} {'anon rise':>9}")
    for label, sec, base, hwm, rise, anon in rows:
        print(
            f"{label:44} {sec:6.1f}s {base / gb:8.2f}G {hwm / gb:8.2f}G {rise / gb:7.2f}G {rise / largest:8.2f}x "
            f"{anon / gb:8.2f}G"
        )
    result = {
        "what": "peak resident memory of conversion/reshard.py, convert_layout.py and from_released.py on a multi-GB "
        "checkpoint, against its largest tensor",
        "metadata": metadata(),
        "source": source,
        "output_shard_size": args.shard,
        "outputs": outputs,
        "runs": runs,
        "definitions": {
            "baseline.VmRSS": "resident set of the child after importing torch, transformers and the conversion code",
            "end.VmHWM": "the child's peak resident set (kernel high-water mark), read at its end",
            "peak_rise_bytes": "VmHWM - baseline VmRSS: what the conversion itself added, file-backed pages included",
            "sampled_peak_rss_anon": "max RssAnon of the child sampled every 20 ms by the parent (excludes the "
            "mmapped source shard's page-cache pages)",
        },
        "total_runtime_s": time.perf_counter() - t0,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
