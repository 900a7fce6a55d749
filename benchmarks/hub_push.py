"""Push a ~600 MB Kimi Linear checkpoint with conversion/push_to_hub.py to tests/hub_server.py on 127.0.0.1 (LFS
protocol), then interrupt a second push with Ctrl-C in the middle of its second large file and run it again: time,
peak memory of the push process, and what the rerun sent.

    python benchmarks/hub_push.py                                  # ~1-2 minutes on 2 cores
    python benchmarks/hub_push.py --config conversion/configs/default.json --shard-size 50MB

The checkpoint: make_random_checkpoint of --config (float32; benchmarks/configs/cpu_prefill.json is 149M parameters,
594 MB) resharded to --shard-size. Each push runs the CLI in a fresh process (SIGINT is what Ctrl-C sends); the
server runs in this process and logs every request. Writes benchmarks/results/hub_push.json (CPU, versions, date
UTC, git commit).
"""

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from hub_server import HubServer  # noqa: E402
from kimi_linear_conversion.random_checkpoint import make_random_checkpoint  # noqa: E402
from kimi_linear_conversion.reshard import reshard  # noqa: E402

TOKEN, USER = "bench-token", "bench"


def push_cmd(folder, repo, url, *extra):
    return [sys.executable, str(REPO / "conversion" / "push_to_hub.py"), str(folder), repo, "--endpoint", url,
            "--token", TOKEN, "--quiet", "--no-results", *extra]  # fmt: skip


def run(cmd, env, workdir, interrupt_when=None):
    """Run a push; with interrupt_when (a predicate polled every 10 ms) send it SIGINT once that holds. Returns its
    exit code, wall time and peak resident set (VmHWM, polled every 10 ms: a fork's rusage would count the parent)."""
    out, err = open(workdir / "push.out", "w+"), open(workdir / "push.err", "w+")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
    interrupted, peak = False, 0
    while True:
        peak = max(peak, _vm_hwm(proc.pid))
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if interrupt_when is not None and not interrupted and interrupt_when():
            proc.send_signal(signal.SIGINT)
            interrupted = True
        time.sleep(0.01)
    seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    return {
        "rc": proc.returncode,
        "seconds": seconds,
        "interrupted": interrupted,
        "peak_rss_bytes": peak,
        "stdout_tail": out.read()[-600:],
        "stderr_tail": err.read()[-600:],
    }


def _vm_hwm(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def lfs_summary(log, repo):
    puts = [e for e in log if e["method"] == "PUT" and f"/lfs/{repo}/" in e["path"]]
    stored = [e for e in puts if e["note"].startswith("lfs stored")]
    return {
        "put_requests": len(puts),
        "put_bytes": sum(e["received"] for e in puts),
        "put_bytes_not_stored": sum(e["received"] for e in puts if e not in stored),  # cut off mid-way
        "objects_stored": len(stored),
        "stored_oids": sorted(e["path"].rsplit("/", 1)[1] for e in stored),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "benchmarks" / "configs" / "cpu_prefill.json"))
    ap.add_argument("--shard-size", default="150MB", help="(default: %(default)s)")
    ap.add_argument("--workdir", help="where the checkpoint and the server's store go (default: a temp folder)")
    ap.add_argument("--out", default=str(HERE / "results" / "hub_push.json"))
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="hub_push-"))
    t = time.perf_counter()
    single = make_random_checkpoint(args.config, work / "single", seed=0)
    folder = reshard(single, work / "model", max_shard_size=args.shard_size, progress=False)
    made = time.perf_counter() - t
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    total = sum(files.values())
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_HOME=str(work / "home"), HF_HUB_DISABLE_TELEMETRY="1")

    with HubServer(work / "hub", tokens={TOKEN: USER}) as hub:

        def push(repo, *extra, interrupt_when=None):
            mark = len(hub.log)
            r = run(push_cmd(folder, repo, hub.url, *extra), env, work, interrupt_when)
            r["lfs"] = lfs_summary(hub.log[mark:], repo)
            return r

        full = push(f"{USER}/full")
        again = push(f"{USER}/full")  # nothing changed: nothing is sent
        # One large file at a time; SIGINT once the first object arrived and half of the second is in.
        repo = f"{USER}/resume"

        def mid_second():
            stored = [e for e in hub.log if e["note"].startswith("lfs stored") and repo in e["path"]]
            receiving = [n for path, n in list(hub.in_flight.values()) if f"/lfs/{repo}/" in path]
            return stored and receiving and receiving[0] > 50e6

        cut = push(repo, "--parallel", "1", interrupt_when=mid_second)
        resumed = push(repo, "--parallel", "1")
        resent = sorted(set(cut["lfs"]["stored_oids"]) & set(resumed["lfs"]["stored_oids"]))

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    import huggingface_hub
    import torch
    import transformers

    result = {
        "what": "conversion/push_to_hub.py against tests/hub_server.py on 127.0.0.1 (LFS): a full push, a push with "
        "nothing changed, a push (--parallel 1) interrupted by SIGINT once its first object arrived and 50 MB of the "
        "second, and its rerun",
        "metadata": {
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "huggingface_hub": huggingface_hub.__version__,
            "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_commit": git.stdout.strip(),
            "loadavg": os.getloadavg(),
        },
        "checkpoint": {"config": args.config, "files": files, "bytes": total, "make_seconds": made},
        "full_push": full,
        "unchanged_push": again,
        "interrupted_push": cut,
        "resumed_push": resumed,
        "objects_sent_twice": resent,
        "full_push_MBps": total / full["seconds"] / 1e6,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"checkpoint: {len(files)} files, {total / 1e6:.0f} MB")
    for name in ("full_push", "unchanged_push", "interrupted_push", "resumed_push"):
        r = result[name]
        print(
            f"{name:17s} rc {r['rc']:>3}  {r['seconds']:6.1f} s  PUT {r['lfs']['put_requests']:2d} requests "
            f"{r['lfs']['put_bytes'] / 1e6:7.1f} MB  peak RSS {r['peak_rss_bytes'] / 1e6:6.0f} MB"
        )
    print(f"objects sent again after the interruption: {resent or 'none'}; bytes of the cut upload lost: "
          f"{cut['lfs']['put_bytes_not_stored'] / 1e6:.1f} MB")  # fmt: skip
    print(f"wrote {args.out}")


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
