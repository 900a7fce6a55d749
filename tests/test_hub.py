"""Hub round trip against a real HTTP server of our own (tests/hub_server.py on 127.0.0.1): push with
conversion/push_to_hub.py through huggingface_hub's own upload code, pull with
AutoModelForCausalLM.from_pretrained(repo, revision=..., trust_remote_code=True) in a fresh process (HF_ENDPOINT
pointed at the server, a fresh HF_HOME, HF_HUB_OFFLINE=0), logits compared with the folder that was pushed."""

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import HfApi

from conftest import ROOT, tiny_config_dict
from hub_server import HubServer
from kimi_linear.modeling_kimi_linear import AUTO_MAP, CODE_FILES, KimiLinearForCausalLM
from kimi_linear_conversion.io import CheckpointError
from kimi_linear_conversion.push_to_hub import PushError, main, plan_upload, push_to_hub
from kimi_linear_conversion.random_checkpoint import make_random_checkpoint
from kimi_linear_conversion.reshard import reshard

TOKEN, USER = "hf_test_write_token", "alice"
REPO = f"{USER}/tiny-kimi"
IDS = torch.arange(3, 40)[None]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1 for the whole suite, and huggingface_hub reads it at import: pushes made in this
    # process need it off. Pulls run in subprocesses with their own environment (see pull()).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer(tmp_path / "hub", tokens={TOKEN: USER}, multipart_chunk=2**20) as server:
        yield server


@pytest.fixture
def no_backoff_wait(monkeypatch):
    """huggingface_hub retries a failed request 5 times, sleeping 1, 2, 4, 8, 8 s: the retries stay real, the waits
    are recorded instead of slept."""
    waits = []
    monkeypatch.setattr(huggingface_hub.utils._http, "time", types.SimpleNamespace(sleep=waits.append))
    return waits


def push(folder, hub, **kw):
    kw.setdefault("token", TOKEN)
    return push_to_hub(folder, REPO, endpoint=hub.url, progress=False, **kw)


def local_logits(folder):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the pulling process: the same reduction order, so equal bit for bit
    try:
        with torch.no_grad():
            return KimiLinearForCausalLM.from_pretrained(folder).eval()(IDS).logits
    finally:
        torch.set_num_threads(threads)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sharded(tmp_path, seed, name):
    src = make_random_checkpoint(tiny_config_dict(), tmp_path / f"{name}-single", seed=seed)
    return reshard(src, tmp_path / name, max_shard_size="800KB", progress=False)


PULL = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    repo = sys.argv[1]
    torch.set_num_threads(1)  # as local_logits(): bit-for-bit comparable whatever the machine's core count
    for n, line in enumerate(sys.stdin):  # a JSON list of revisions per line; answers with the file of their logits
        revisions, logits = json.loads(line), {}
        for rev in revisions:
            model = AutoModelForCausalLM.from_pretrained(repo, revision=rev, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            with torch.no_grad():
                logits[rev] = model(torch.arange(3, 40)[None]).logits
        tok = AutoTokenizer.from_pretrained(repo, revision=revisions[0], trust_remote_code=True)
        assert tok.decode(tok("To be, or not")["input_ids"]) == "To be, or not"
        torch.save(logits, f"logits-{n}.pt")
        print(f"logits-{n}.pt", flush=True)
""")


def hub_env(hub, home):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1")
    return env


class Puller:
    """A fresh process with HF_ENDPOINT at the server and its own HF_HOME that loads `repo` from the Hub at the
    revisions asked for, as many times as asked (one process: torch and transformers are imported once)."""

    def __init__(self, hub, home, repo=REPO):
        self.home = Path(home)
        self.home.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PULL, repo], env=hub_env(hub, self.home), cwd=self.home, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.home / "stderr.txt", "w"),
        )  # fmt: skip

    def __call__(self, revisions):
        """{revision: logits}."""
        self.proc.stdin.write(json.dumps(revisions) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, (self.home / "stderr.txt").read_text()[-4000:]
        return torch.load(self.home / answer)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def remote_files(hub, revision):
    """{path: (size, LFS sha256 or None)} of the repo at `revision`, as the Hub's tree API lists it."""
    api = HfApi(endpoint=hub.url)
    files = api.list_repo_tree(REPO, recursive=True, revision=revision)
    return {f.path: (f.size, f.lfs.sha256 if f.lfs else None) for f in files}


def commits(hub):
    return [e for e in hub.log if e["path"].endswith("/commit/main") and e["status"] == 200]


def strip_code(folder):
    """A folder without our code files and without auto_map in config.json, holding an old README.md."""
    for name in CODE_FILES:
        (folder / name).unlink()
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "README.md").write_text("an old card\n")
    return config


def test_push_then_pull_at_each_revision(hub, tmp_path):
    a = sharded(tmp_path, seed=1, name="a")
    strip_code(a)  # the push must bring configuration_kimi_linear.py, modeling_kimi_linear.py and auto_map
    b = make_random_checkpoint(tiny_config_dict(), tmp_path / "b", seed=2)  # single file: replaces a's shards
    ref_a, ref_b = local_logits(a), local_logits(b)
    assert not torch.equal(ref_a, ref_b)

    first = push(a, hub)
    assert first.changed and first.transfer == "lfs"  # the server speaks LFS only; auto found that out
    files = remote_files(hub, first.commit)
    local = {p.name: p for p in a.iterdir() if p.name != "README.md"}
    assert set(files) == set(local) | set(CODE_FILES) | {"README.md", ".gitattributes"}
    for name, path in local.items():
        if name == "config.json":
            continue
        size, lfs_sha = files[name]
        assert size == path.stat().st_size
        if name.endswith(".safetensors"):
            assert lfs_sha == sha256(path), name  # stored as LFS objects, byte for byte
    puller = Puller(hub, tmp_path / "home")
    assert torch.equal(puller(["main"])["main"], ref_a)

    second = push(b, hub)
    shards = sorted(n for n in local if n.endswith((".safetensors", ".index.json")))
    assert second.deleted == shards  # the old shards and index would contradict model.safetensors
    added = {path for kind, path in commits(hub)[-1]["operations"] if kind != "deletedFile"}
    # code, tokenizer and generation config unchanged: not sent again; config.json now comes with its own auto_map
    assert added == {"model.safetensors", "config.json", "README.md"}
    # The same process and cache: "main" must move to the new commit, the first commit must still give the old weights.
    got = puller([first.commit, "main", second.commit[:12]])
    puller.close()
    assert torch.equal(got[first.commit], ref_a)
    assert torch.equal(got["main"], ref_b)
    assert torch.equal(got[second.commit[:12]], ref_b)
    assert any(e["note"].endswith("from 3 parts") for e in hub.log)  # 2.6 MB in 1 MiB parts: multipart path taken

    again = push(b, hub)
    assert not again.changed and again.commit == second.commit


def test_dry_run_lists_everything_and_sends_nothing(hub, tmp_path, capsys):
    folder = sharded(tmp_path, seed=3, name="m")
    config = strip_code(folder)

    assert main([str(folder), REPO, "--dry-run", "--endpoint", hub.url, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert hub.log == []  # not a single request
    row = re.compile(r"(\S+) +[\d.]+ [KMG]?B +(yes|no) +([0-9a-f]{64}) +(.+)")
    rows = {m[1]: m.groups()[1:] for m in map(row.fullmatch, out.splitlines()) if m}
    for p in folder.iterdir():
        if p.name not in ("config.json", "README.md"):
            assert rows[p.name] == ("yes" if p.suffix == ".safetensors" else "no", sha256(p), "folder"), p.name
    for name in CODE_FILES:  # taken from the installed package
        assert rows[name] == ("no", sha256(ROOT / name), "package")
    assert rows["config.json"][2] == "folder, auto_map added"
    assert rows["README.md"][2] == "generated"
    assert "not sent: README.md (replaced by the generated model card;" in out
    assert "library_name: transformers" in out  # the card is shown

    result = push(folder, hub)
    assert json.loads((folder / "config.json").read_text()) == config  # the folder is left as it was
    api = HfApi(endpoint=hub.url)
    fetch = lambda name: Path(api.hf_hub_download(REPO, name, revision=result.commit, cache_dir=tmp_path / "c"))
    for name in CODE_FILES:
        assert fetch(name).read_bytes() == (ROOT / name).read_bytes()
    assert json.loads(fetch("config.json").read_text()) == {**config, "auto_map": AUTO_MAP}


def test_model_card(hub, tmp_path):
    folder = make_random_checkpoint(tiny_config_dict(), tmp_path / "m", seed=4)
    results = tmp_path / "results.json"
    row = {"benchmark": "wikitext-2 perplexity", "value": "12.34", "card": "NVIDIA H100", "date": "2026-11-20"}
    results.write_text(json.dumps([row]))
    result = push(
        folder, hub, base_model="moonshotai/Kimi-Linear-48B-A3B-Instruct", license="apache-2.0",
        datasets=["acme/shakespeare"], tags=["tiny"], results=[results],
    )  # fmt: skip
    path = HfApi(endpoint=hub.url).hf_hub_download(REPO, "README.md", revision=result.commit, cache_dir=tmp_path / "c")
    card = Path(path).read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "moonshotai/Kimi-Linear-48B-A3B-Instruct" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["acme/shakespeare"]
    assert {"kimi_linear", "custom_code", "tiny"} <= set(meta["tags"])
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}", trust_remote_code=True' in body
    assert "| wikitext-2 perplexity | 12.34 | NVIDIA H100 | 2026-11-20 |" in body
    assert f"| `model.safetensors` | 2.6 MB | `{sha256(folder / 'model.safetensors')}` |" in body
    n_params = sum(p.numel() for p in KimiLinearForCausalLM.from_pretrained(folder).parameters())
    assert f"{n_params / 1e3:.1f}K parameters" in body

    # Without results given: the project's committed benchmark numbers, each with its machine and date.
    bench = json.loads((ROOT / "benchmarks" / "results" / "cpu_prefill.json").read_text())
    default = plan_upload(folder, REPO, progress=False).card
    r = bench["prefill"]["4096"]
    assert (
        f"{r['ours']['median_s']:.1f} s (transformers' built-in kimi_linear: {r['builtin']['median_s']:.1f} s)"
        in default
    )
    assert f"| {bench['metadata']['cpu_model']}, {bench['metadata']['cpu_count']} cores |" in default
    assert bench["metadata"]["date_utc"][:10] in default
    none = plan_upload(folder, REPO, progress=False, benchmark_results=False).card
    assert "## Measured results\n\nNone published with this upload." in none

    (folder / "README.md").write_text("my own card\n")
    kept = plan_upload(folder, REPO, progress=False, keep_readme=True)
    assert kept.card == "" and [i.origin for i in kept.items if i.path == "README.md"] == ["folder"]

    results.write_text(json.dumps([{"benchmark": "mmlu", "value": "1.0", "card": "H100"}]))
    with pytest.raises(ValueError, match="row 0 has no date"):
        plan_upload(folder, REPO, progress=False, results=[results])


def _released_auto_map(folder):
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_kimi.KimiLinearConfig"}
    (folder / "config.json").write_text(json.dumps(config))


def _drop_a_tensor(folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.self_attn.q_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "config.json").unlink(), "has no config.json"),
        (
            lambda f: (f / "config.json").write_text(json.dumps({**tiny_config_dict(), "model_type": "llama"})),
            "model_type 'llama', not 'kimi_linear'",
        ),
        (_released_auto_map, r"is not this repo's code.*from_released\.py"),
        (_drop_a_tensor, r"missing: model\.layers\.1\.self_attn\.q_proj\.weight"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x10"), "is not a safetensors file"),
        (lambda f: (f / "model-old.safetensors").write_bytes(b"x"), r"holds \['model-old\.safetensors'\]"),
    ],
)
def test_bad_folders_are_refused_before_anything_is_sent(hub, tmp_path, damage, message):
    folder = make_random_checkpoint(tiny_config_dict(), tmp_path / "m", seed=5)
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        push(folder, hub)
    assert hub.log == []


@pytest.mark.parametrize("repo_exists", [False, True])
def test_wrong_token_is_a_clear_error(hub, tmp_path, capsys, repo_exists):
    folder = make_random_checkpoint(tiny_config_dict(), tmp_path / "m", seed=6)
    if repo_exists:
        HfApi(endpoint=hub.url, token=TOKEN).create_repo(REPO)
    with pytest.raises(PushError, match=r"refused the token \(401.*--token.*HF_TOKEN"):
        push(folder, hub, token="hf_not_a_valid_token")
    assert main([str(folder), REPO, "--endpoint", hub.url, "--token", "hf_nope", "--quiet"]) == 1
    assert "error: the Hub at" in capsys.readouterr().err
    assert not [e for e in hub.log if e["method"] == "PUT" or e["path"].endswith("/commit/main")]


def test_pull_of_a_missing_repo_or_revision_is_a_clear_error(hub, tmp_path):
    push(make_random_checkpoint(tiny_config_dict(), tmp_path / "m", seed=7), hub)
    script = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM
        for repo, rev in [("{USER}/no-such-model", None), ("{REPO}", "no-such-branch")]:
            try:
                AutoModelForCausalLM.from_pretrained(repo, revision=rev, trust_remote_code=True)
            except OSError as err:
                print("ERROR", repo, type(err.__cause__).__name__, str(err).replace(chr(10), " "))
    """)
    r = subprocess.run(
        [sys.executable, "-c", script], env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=300
    )
    lines = [line for line in r.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 2, r.stdout + r.stderr[-3000:]
    assert f"ERROR {USER}/no-such-model RepositoryNotFoundError" in lines[0]
    assert "is not a local folder and is not a valid model identifier" in lines[0]
    assert f"ERROR {REPO} RevisionNotFoundError" in lines[1] and "no-such-branch" in lines[1]


def test_a_connection_dropped_once_is_retried(hub, tmp_path, no_backoff_wait):
    folder = sharded(tmp_path, seed=8, name="m")
    hub.drop_lfs_puts(2)  # the server reads half of the second upload, then closes the socket
    result = push(folder, hub, parallel=1)
    assert [e["status"] for e in hub.log if e["method"] == "PUT"].count("dropped") == 1
    assert no_backoff_wait == [1]
    for p in folder.glob("*.safetensors"):
        assert len(hub.lfs_puts(sha256(p))) == 1, p.name  # stored once, whole
        assert remote_files(hub, result.commit)[p.name][1] == sha256(p)


def test_lost_connection_then_rerun_sends_only_what_is_missing(hub, tmp_path, no_backoff_wait):
    folder = sharded(tmp_path, seed=9, name="m")
    shards = {sha256(p): p.name for p in folder.glob("*.safetensors")}
    assert len(shards) >= 3
    hub.drop_lfs_puts(3, count=None)  # the link goes down after two uploads and stays down
    with pytest.raises(PushError, match=r"lost the connection to .* while uploading .*2 of the \d+ large files had "
                       r"fully arrived\. Run the same command again"):  # fmt: skip
        push(folder, hub, parallel=1)
    assert no_backoff_wait == [1, 2, 4, 8, 8]  # huggingface_hub's own retries, all dropped
    arrived = {oid for oid in shards if hub.lfs_puts(oid)}
    assert len(arrived) == 2 and not commits(hub)
    hub.clear_drops()
    restart = len(hub.log)

    result = push(folder, hub, parallel=1)
    puts = [e for e in hub.log[restart:] if e["method"] == "PUT"]
    assert not [e for e in puts if any(oid in e["path"] for oid in arrived)]  # nothing that arrived is sent again
    assert {oid for oid in shards if hub.lfs_puts(oid)} == set(shards)
    files = remote_files(hub, result.commit)
    assert {files[name][1] for name in shards.values()} == set(shards)


def test_dropped_commit_is_a_clear_error_and_the_rerun_sends_no_weights_again(hub, tmp_path):
    folder = sharded(tmp_path, seed=10, name="m")
    hub.drop_commits(1)
    with pytest.raises(PushError, match="lost the connection to .* while committing"):
        push(folder, hub)
    restart = len(hub.log)
    result = push(folder, hub)
    assert not [e for e in hub.log[restart:] if e["method"] == "PUT"]
    assert set(remote_files(hub, result.commit)) >= {p.name for p in folder.iterdir()}


def test_server_runs_standalone(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "hub_server.py"), "--port", "0", "--root", str(tmp_path), "--token", "t"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = proc.stdout.readline().split(" at ")[1].split()[0]
        api = HfApi(endpoint=url, token="t")
        with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError):
            api.model_info("user/none")
        assert api.whoami()["name"] == "user"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_offline_mode_is_refused_up_front(hub, tmp_path, monkeypatch):
    folder = make_random_checkpoint(tiny_config_dict(), tmp_path / "m", seed=11)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE is set"):
        push(folder, hub)
    assert hub.log == []
