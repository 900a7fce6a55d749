"""Publish a Kimi Linear model folder to the Hugging Face Hub in one commit: the safetensors weights, config.json with
`auto_map`, this repo's code files, the tokenizer, generation_config.json and a generated model card (README.md).

    python conversion/push_to_hub.py DIR user/my-kimi-linear --dry-run      # list what would be sent; send nothing
    python conversion/push_to_hub.py DIR user/my-kimi-linear [--private] [--token hf_...]
    python conversion/push_to_hub.py DIR user/my-kimi-linear --base-model moonshotai/Kimi-Linear-48B-A3B-Instruct \\
        --license mit --dataset my-org/my-data --results my_eval.json

    from kimi_linear_conversion.push_to_hub import push_to_hub
    push_to_hub("DIR", "user/my-kimi-linear")          # -> PushResult(commit=..., url=...)

Checked before anything is sent: config.json says model_type "kimi_linear"; the weights (model.safetensors, or the
index and every shard it lists) are complete and hold exactly the tensors and shapes the config describes; the
config's `auto_map` is this repo's (when absent it is added to the uploaded copy; the folder is never modified).
Sent: every top-level file of DIR except hidden ones and non-safetensors weights; configuration_kimi_linear.py and
modeling_kimi_linear.py from the installed package when DIR lacks them; the generated README.md (one in DIR is
replaced unless --keep-readme).

How: the repo is created if missing; the large files go first, --parallel at a time, as LFS objects (or through
Xet when hf_xet is installed and the Hub hands out Xet tokens), then a single commit adds every file, so each
revision on the Hub is a complete model. Interrupted (Ctrl-C, a dropped connection)? Run the same command again:
the Hub keeps each object that fully arrived and answers "already there" for it (by sha256), so only the rest is
sent; files unchanged on the branch are left out of the commit.
Token: --token, else HF_TOKEN, else the one `hf auth login` stored. Hub: --endpoint, else HF_ENDPOINT.
"""

import argparse
import contextlib
import hashlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from kimi_linear_conversion.from_released import check_layout, read_config, sha256_file
from kimi_linear_conversion.io import CLI_ERRORS, INDEX, SINGLE, CheckpointError, CheckpointReader, numel

# Files the Hub's default .gitattributes stores with LFS (what a model folder holds), and its size rule. Only used
# to predict the upload mode in --dry-run; on a real push the Hub decides.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model", ".msgpack", ".h5", ".onnx", ".gguf")
LFS_MIN_SIZE = 10 * 2**20
UNPUBLISHED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tiktoken.model", "vocab.json")
DEFAULT_TAGS = ("kimi_linear", "kimi-linear", "linear-attention", "kda", "mla", "moe", "custom_code")
DEFAULT_LICENSE = "mit"  # the released Kimi Linear weights and this repo's code are MIT
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


class PushError(RuntimeError):
    """The Hub refused or lost the push; the message says why and what to do."""


@dataclass
class Item:
    """One file of the upload: from the folder, from the installed package, or generated (data)."""

    path: str
    size: int
    sha256: str
    origin: str
    source: Path | None = None
    data: bytes | None = None

    @property
    def lfs(self):
        return self.path.endswith(LFS_SUFFIXES) or self.size >= LFS_MIN_SIZE


@dataclass
class Plan:
    folder: Path
    repo_id: str
    items: list
    skipped: list = field(default_factory=list)  # [(name, reason)]
    notes: list = field(default_factory=list)
    card: str = ""

    @property
    def total_bytes(self):
        return sum(i.size for i in self.items)


@dataclass
class PushResult:
    repo_id: str
    url: str
    commit: str | None  # None for a dry run
    changed: bool
    transfer: str | None
    plan: Plan
    deleted: list = field(default_factory=list)  # stale weight files removed from the branch


# ---------------------------------------------------------------------------------------------------------------
# What to send
# ---------------------------------------------------------------------------------------------------------------
def _package_code():
    from kimi_linear.modeling_kimi_linear import AUTO_MAP, CODE_FILES

    here = Path(sys.modules["kimi_linear.modeling_kimi_linear"].__file__).resolve().parent
    return AUTO_MAP, {name: here / name for name in CODE_FILES}


def plan_upload(
    folder,
    repo_id,
    *,
    base_model=None,
    license=DEFAULT_LICENSE,
    datasets=(),
    tags=(),
    results=None,
    benchmark_results=True,
    keep_readme=False,
    progress=True,
):
    """Check `folder` and list what a push sends (sha256 of every file computed). Raises CheckpointError (a
    ValueError) naming what is wrong with the folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder.")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id: use namespace/name, e.g. my-user/kimi-linear-tiny.")
    config = read_config(folder)
    if config.get("model_type") != "kimi_linear":
        raise CheckpointError(
            f"{folder / 'config.json'} has model_type {config.get('model_type')!r}, not 'kimi_linear': "
            "this command publishes Kimi Linear checkpoints only."
        )
    auto_map, code = _package_code()
    if config.get("auto_map") not in (None, auto_map):
        raise CheckpointError(
            f"{folder / 'config.json'}'s auto_map {config['auto_map']} is not this repo's code {auto_map}: convert "
            f"the folder first (python conversion/from_released.py {folder} --out NEW_FOLDER) and push NEW_FOLDER."
        )
    names = {p.name for p in folder.iterdir()}
    if SINGLE in names and INDEX in names:
        raise CheckpointError(
            f"{folder} holds both {SINGLE} and {INDEX}; transformers would read {SINGLE} alone. Remove the stale one."
        )
    reader = CheckpointReader(folder)  # every shard present and complete, index and shards agree
    check_layout(reader.shapes, config, folder)
    shards = set(reader.location.values())
    stray = sorted(n for n in names if n.endswith(".safetensors") and n not in shards)
    if stray:
        raise CheckpointError(
            f"{folder} holds {stray}, which {INDEX if INDEX in names else SINGLE} does not use: no loader reads "
            "them, so they would only be published by mistake. Move them out of the folder."
        )

    plan = Plan(folder, repo_id, [])
    files = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name.startswith("."):
            plan.skipped.append((name, "hidden"))
        elif entry.is_dir():
            plan.skipped.append((name, "a folder: only top-level files are published"))
        elif name.endswith(UNPUBLISHED_WEIGHTS):
            plan.skipped.append((name, "not safetensors: only the safetensors weights are published"))
        elif name == "README.md" and not keep_readme:
            plan.skipped.append((name, "replaced by the generated model card; --keep-readme sends it instead"))
        else:
            files.append(name)
    with tqdm(
        total=sum((folder / n).stat().st_size for n in files), unit="B", unit_scale=True, desc="sha256",
        disable=not progress,
    ) as bar:  # fmt: skip
        for name in files:
            path = folder / name
            if name == "config.json" and "auto_map" not in config:
                data = (
                    json.dumps({**config, "auto_map": dict(auto_map)}, indent=2, ensure_ascii=False) + "\n"
                ).encode()
                plan.items.append(_item_from_bytes(name, data, "folder, auto_map added"))
                bar.update(path.stat().st_size)
                continue
            plan.items.append(Item(name, path.stat().st_size, sha256_file(path, bar), "folder", source=path))
    for name, path in code.items():
        if name not in names:
            plan.items.append(Item(name, path.stat().st_size, sha256_file(path), "package", source=path))
        elif (folder / name).read_bytes() != path.read_bytes():
            plan.notes.append(f"{name} differs from the installed package's copy; the folder's is published")
    if not any(n in names for n in TOKENIZER_FILES):
        plan.notes.append("no tokenizer files: the model card's example leaves the tokenizer out")
    if "generation_config.json" not in names:
        plan.notes.append("no generation_config.json: generate() will use transformers' defaults")

    if base_model is None:
        base_model = _manifest_source(folder)
    if not keep_readme or "README.md" not in names:
        card = model_card(
            config, reader, plan.items, repo_id, base_model=base_model, license=license, datasets=datasets,
            tags=tags, results=measured_results(results, benchmark_results),
        )  # fmt: skip
        plan.card = card
        plan.items.append(_item_from_bytes("README.md", card.encode(), "generated"))
    plan.items.sort(key=lambda i: (not i.lfs, i.path))  # large files first, as they are sent
    return plan


def _item_from_bytes(path, data, origin):
    return Item(path, len(data), hashlib.sha256(data).hexdigest(), origin, data=data)


def _manifest_source(folder):
    """The Hub id a folder was converted from (from_released.py's manifest), as the card's base_model."""
    path = Path(folder) / "kimi_linear_manifest.json"
    if path.exists():
        with contextlib.suppress(ValueError, OSError):
            source = json.loads(path.read_text()).get("source")
            if isinstance(source, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not Path(source).exists():
                return source
    return None


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------
def _human(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _count(n):
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def model_card(config, reader, items, repo_id, *, base_model=None, license=DEFAULT_LICENSE, datasets=(), tags=(),
               results=""):  # fmt: skip
    """README.md for the Hub: YAML metadata, what the model is (from its config and weights), how to load it, its
    files, and measured results (given, never made up)."""
    from huggingface_hub import ModelCardData

    from kimi_linear.configuration_kimi_linear import KDA, SUPPORTED_TRANSFORMERS, KimiLinearConfig

    cfg = KimiLinearConfig(**{k: v for k, v in config.items() if k != "auto_map"})
    meta = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        base_model=base_model,
        datasets=list(datasets) or None,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
    )
    n_params = sum(numel(s) for s in reader.shapes.values())
    by_dtype = {}
    for name, dt in reader.dtypes.items():
        by_dtype[dt] = by_dtype.get(dt, 0) + reader.nbytes(name)
    dtypes = ", ".join(
        f"{dt} ({b / sum(by_dtype.values()):.0%})" for dt, b in sorted(by_dtype.items(), key=lambda x: -x[1])
    )
    n_kda = sum(t == KDA for t in cfg.layer_types)
    n_moe = sum(t == "moe" for t in cfg.mlp_types)
    has_tok = any(i.path in TOKENIZER_FILES for i in items)
    name = repo_id.split("/")[1]
    lines = [
        "---",
        meta.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        f"A Kimi Linear causal language model with {_count(n_params)} parameters stored as {dtypes}: "
        f"{cfg.num_hidden_layers} layers, {n_kda} with Kimi Delta Attention (linear attention, constant-size state) "
        f"and {cfg.num_hidden_layers - n_kda} with NoPE Multi-head Latent Attention; {n_moe} mixture-of-experts "
        f"layers with {cfg.num_experts} experts ({cfg.num_experts_per_token} routed per token, "
        f"{cfg.num_shared_experts} shared); hidden size {cfg.hidden_size}, vocabulary {cfg.vocab_size}, "
        f"context length {config.get('model_max_length', 'not set')}."
        + (f" Derived from [{base_model}](https://huggingface.co/{base_model})." if base_model else ""),
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM" + (", AutoTokenizer" if has_tok else ""),
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True, dtype="auto")',
    ]
    if has_tok:
        lines += [
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)',
            'inputs = tokenizer("To be, or not to be", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
        ]
    lines += [
        "```",
        "",
        "`trust_remote_code=True` is required: it loads `modeling_kimi_linear.py` from this repo. The config keeps "
        '`model_type: "kimi_linear"` (what vLLM, SGLang and llama.cpp key on), and transformers >= 5.17 would '
        "otherwise load its own built-in class for that type. The code runs on transformers "
        f">= {SUPPORTED_TRANSFORMERS[0]}, < {SUPPORTED_TRANSFORMERS[1]} with plain PyTorch on any device; fla's "
        "Triton kernels are used on a GPU when the `kimi_linear_kernels` package and fla-core are installed. Pin "
        "`revision=` to a commit for reproducible loads.",
        "",
        "## Files",
        "",
        "| file | size | sha256 |",
        "|---|---|---|",
    ]
    lines += [f"| `{i.path}` | {_human(i.size)} | `{i.sha256}` |" for i in sorted(items, key=lambda i: i.path)]
    lines += ["", "## Measured results", "", results or "None published with this upload.", ""]
    return "\n".join(lines)


def measured_results(results=None, benchmark_results=True):
    """Markdown for the card's results section: the given files (a .md is inserted as is; a .json is a list of rows,
    each naming its card and date), else this project's committed benchmark results, else ""."""
    if results:
        parts = []
        for path in [results] if isinstance(results, (str, Path)) else results:
            path = Path(path)
            if path.suffix == ".md":
                parts.append(path.read_text().strip())
            elif path.suffix == ".json":
                parts.append(_rows_table(_result_rows(path)))
            else:
                raise ValueError(f"{path}: results must be a .md or a .json file.")
        return "\n\n".join(parts)
    if benchmark_results:
        rows = _benchmark_rows(BENCHMARKS)
        if rows:
            return (
                "Speed of the code in this repo, measured on benchmark configurations (not on these weights), from "
                "the project's committed `benchmarks/results/`:\n\n" + _rows_table(rows)
            )
    return ""


def _result_rows(path):
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None
    rows = data.get("results") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f'{path}: expected a list of rows (objects), or {{"results": [rows]}}.')
    for i, row in enumerate(rows):
        missing = [k for k in ("card", "date") if not row.get(k)]
        if missing:
            raise ValueError(
                f"{path}: row {i} has no {' and no '.join(missing)}; every measured result must say the card (or "
                f"CPU) it ran on and the date it was measured."
            )
    return rows


def _rows_table(rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(out)


def _benchmark_rows(folder):
    """Rows from benchmarks/results/{cpu_prefill,kda_gpu}.json; a file that is missing or laid out differently is
    left out."""
    rows = []
    with contextlib.suppress(OSError, KeyError, TypeError, ValueError):
        d = json.loads((folder / "cpu_prefill.json").read_text())
        m = d["metadata"]
        params = d["loading"]["ours"]["num_parameters"]
        for length, r in sorted(d["prefill"].items(), key=lambda kv: int(kv[0])):
            rows.append(
                {
                    "measurement": f"prefill {length} tokens, batch 1, {d['settings']['dtype']}, "
                    f"{_count(params)}-parameter config",
                    "result": f"{r['ours']['median_s']:.1f} s (transformers' built-in kimi_linear: "
                    f"{r['builtin']['median_s']:.1f} s)",
                    "card": f"{m['cpu_model']}, {m['cpu_count']} cores",
                    "software": f"torch {m['torch']}, transformers {m['transformers']}",
                    "date": m["date_utc"][:10],
                    "commit": m["git_commit"],
                }
            )
    with contextlib.suppress(OSError, KeyError, TypeError, ValueError):
        d = json.loads((folder / "kda_gpu.json").read_text())
        m, dims = d["metadata"], d["dims"]
        for r in d["decode"]:
            if r["B"] not in (1, 64):
                continue
            rows.append(
                {
                    "measurement": f"KDA decode step (kimi_linear_kernels), one layer ({dims['H']} heads x "
                    f"{dims['K']}), batch {r['B']}, CUDA graph",
                    "result": f"{r['ours_default']['graph_us']:.1f} us (fla fused_recurrent_kda kernel alone: "
                    f"{r['fla_kernel']['graph_us']:.1f} us)",
                    "card": m["card"],
                    "software": f"torch {m['torch']}, triton {m['triton']}, fla-core {m['fla-core']}",
                    "date": m["date_utc"][:10],
                    "commit": m["git_commit"],
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------------------------
def _is_weight(path):
    """Weight files a push replaces: left on the branch they would contradict the new checkpoint (an old shard, an
    index beside a single file)."""
    return "/" not in path and (path.endswith((".safetensors", *UNPUBLISHED_WEIGHTS)) or path.endswith(".index.json"))


def _transport_error(err):
    """The network error behind `err` (httpx's, or an OSError), if any."""
    while err is not None:
        module = type(err).__module__.split(".")[0]
        if module in ("httpx", "httpx2", "httpcore", "httpcore2") or isinstance(err, (ConnectionError, TimeoutError)):
            return err
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def _explained(endpoint, repo_id, state):
    """Turn the Hub's refusals and lost connections into a PushError that says what to do."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        said = (getattr(err, "server_message", None) or str(err).strip().splitlines()[0]).strip()
        if status == 401:
            raise PushError(
                f"the Hub at {endpoint} refused the token (401 Unauthorized: {said}). Pass a valid write token with "
                f"--token (token= in Python) or set HF_TOKEN; `hf auth login` stores one. Tokens are made at "
                f"{endpoint}/settings/tokens."
            ) from err
        if status == 403:
            raise PushError(
                f"the token may not write to {repo_id} (403 Forbidden: {said}). Use a token with write access to "
                f"the namespace {repo_id.split('/')[0]!r}, or push to your own namespace."
            ) from err
        raise PushError(f"the Hub at {endpoint} refused the push ({status}: {said}).") from err
    except Exception as err:
        net = _transport_error(err)
        if net is None:
            raise
        where = f" ({err})" if err is not net else ""  # huggingface_hub's RuntimeError names the file
        raise PushError(
            f"lost the connection to {endpoint} while {state['step']}{where}: {type(net).__name__}: {net}. "
            f"{state['arrived']} of the {state['large']} large files had fully arrived. Run the same command again to "
            "resume: the Hub keeps every object that arrived whole, and those are not sent again."
        ) from err


def _xet_enabled():
    """hf_xet installed and not switched off (HF_HUB_DISABLE_XET=1)."""
    from huggingface_hub import constants

    return not getattr(constants, "HF_HUB_DISABLE_XET", False) and importlib.util.find_spec("hf_xet") is not None


def _xet_offered(api, repo_id, token):
    """Whether this Hub hands out Xet write tokens for the repo (huggingface.co does; an LFS-only Hub answers 404)."""
    from huggingface_hub.utils import build_hf_headers, get_session

    r = get_session().get(
        f"{api.endpoint}/api/models/{repo_id}/xet-write-token/main", headers=build_hf_headers(token=token)
    )
    return r.status_code == 200


@contextlib.contextmanager
def _lfs_only(enabled):
    """huggingface_hub sends every file through Xet whenever hf_xet is installed; its HF_HUB_DISABLE_XET switch
    (read when a transfer starts) sends them with the LFS protocol instead. Restored afterwards."""
    from huggingface_hub import constants

    before = getattr(constants, "HF_HUB_DISABLE_XET", None)
    if enabled:
        constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        if before is not None:
            constants.HF_HUB_DISABLE_XET = before


@contextlib.contextmanager
def _hub_progress_bars(enabled):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def push_to_hub(
    folder,
    repo_id,
    *,
    token=None,
    endpoint=None,
    private=False,
    commit_message=None,
    dry_run=False,
    transfer="auto",
    parallel=4,
    progress=True,
    **card,
):
    """Publish `folder` to the Hub repo `repo_id` (created if missing) in one commit on main; returns a PushResult.
    `card` takes plan_upload's model-card arguments (base_model, license, datasets, tags, results,
    benchmark_results, keep_readme). transfer: "auto" (Xet where the Hub and hf_xet allow, else LFS), "xet" or
    "lfs". Raises CheckpointError / ValueError for a bad folder, PushError when the Hub refuses or the connection
    is lost (run it again to resume)."""
    if transfer not in ("auto", "xet", "lfs"):
        raise ValueError(f"transfer must be auto, xet or lfs, not {transfer!r}")
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    plan = plan_upload(folder, repo_id, progress=progress, **card)
    api = HfApi(endpoint=endpoint, token=token)
    url = f"{api.endpoint}/{repo_id}"
    if dry_run:
        return PushResult(repo_id, url, None, False, None, plan)
    if constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE is set, so huggingface_hub sends nothing: unset it (or HF_HUB_OFFLINE=0).")

    large = [i for i in plan.items if i.lfs]
    state = {"step": "creating the repo", "arrived": 0, "large": len(large)}
    with _explained(api.endpoint, repo_id, state), _hub_progress_bars(progress):
        api.create_repo(repo_id, private=private, exist_ok=True)
        state["step"] = "reading the repo"
        head = api.model_info(repo_id, revision="main").sha
        planned = {i.path for i in plan.items}
        stale = sorted(p for p in api.list_repo_files(repo_id, revision=head) if p not in planned and _is_weight(p))
        use_xet = _xet_enabled() and (transfer == "xet" or (transfer == "auto" and _xet_offered(api, repo_id, token)))
        with _lfs_only(not use_xet):
            ops = []
            for item in plan.items:
                op = CommitOperationAdd(item.path, item.data if item.data is not None else str(item.source))
                op.upload_info.sha256 = bytes.fromhex(item.sha256)  # hashed once, while planning
                ops.append(op)
            big = [op for op, item in zip(ops, plan.items) if item.lfs]
            with tqdm(
                total=sum(i.size for i in large), unit="B", unit_scale=True, desc=f"{repo_id}: large files",
                disable=not progress or not big,
            ) as bar:  # fmt: skip
                for start in range(0, len(big), parallel):
                    batch = big[start : start + parallel]
                    state["step"] = "uploading " + ", ".join(op.path_in_repo for op in batch)
                    api.preupload_lfs_files(repo_id, additions=batch, num_threads=parallel)
                    state["arrived"] += len(batch)
                    bar.update(sum(op.upload_info.size for op in batch))
            state["step"] = "committing"
            info = api.create_commit(
                repo_id,
                operations=ops + [CommitOperationDelete(p) for p in stale],
                parent_commit=head,
                commit_message=commit_message or f"Upload Kimi Linear model ({len(ops)} files)",
                num_threads=parallel,
            )
    return PushResult(repo_id, url, info.oid, info.oid != head, "xet" if use_xet else "lfs", plan, stale)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def print_plan(plan, file=None):
    file = file or sys.stdout
    width = max(len(i.path) for i in plan.items)
    print(f"{'file':<{width}}  {'size':>9}  LFS  {'sha256':<64}  from", file=file)
    for i in plan.items:
        print(
            f"{i.path:<{width}}  {_human(i.size):>9}  {'yes' if i.lfs else 'no ':<3}  {i.sha256}  {i.origin}", file=file
        )
    print(f"{len(plan.items)} files, {_human(plan.total_bytes)}", file=file)
    for name, why in plan.skipped:
        print(f"not sent: {name} ({why})", file=file)
    for note in plan.notes:
        print(f"note: {note}", file=file)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="the model folder (config.json, safetensors weights, tokenizer, ...)")
    ap.add_argument("repo_id", help="namespace/name on the Hub")
    ap.add_argument(
        "--dry-run", action="store_true", help="check the folder, list the files and the model card; send nothing"
    )
    ap.add_argument("--token", help="write token (default: HF_TOKEN, else the one `hf auth login` stored)")
    ap.add_argument("--endpoint", help="the Hub's URL (default: HF_ENDPOINT, else https://huggingface.co)")
    ap.add_argument("--private", action="store_true", help="create the repo private (an existing repo is unchanged)")
    ap.add_argument("--commit-message", help="(default: 'Upload Kimi Linear model (N files)')")
    ap.add_argument("--base-model", help="card metadata (default: the Hub id in kimi_linear_manifest.json, if any)")
    ap.add_argument("--license", default=DEFAULT_LICENSE, help="card metadata (default: %(default)s)")
    ap.add_argument("--dataset", action="append", default=[], help="card metadata: a training dataset (repeatable)")
    ap.add_argument("--tag", action="append", default=[], help=f"card tag, besides {', '.join(DEFAULT_TAGS)}")
    ap.add_argument(
        "--results", action="append", help="measured results for the card: a .md inserted as is, or a .json list of "
        "rows each with 'card' and 'date' (repeatable; default: the project's benchmarks/results/)"
    )  # fmt: skip
    ap.add_argument("--no-results", action="store_true", help="no measured-results table in the card")
    ap.add_argument("--keep-readme", action="store_true", help="send the folder's README.md instead of a generated one")
    ap.add_argument("--transfer", choices=["auto", "xet", "lfs"], default="auto", help="(default: %(default)s)")
    ap.add_argument("--parallel", type=int, default=4, help="large files in flight at once (default: %(default)s)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        result = push_to_hub(
            args.folder, args.repo_id, token=args.token, endpoint=args.endpoint, private=args.private,
            commit_message=args.commit_message, dry_run=args.dry_run, transfer=args.transfer,
            parallel=args.parallel, progress=not args.quiet, base_model=args.base_model, license=args.license,
            datasets=args.dataset, tags=args.tag, results=args.results, benchmark_results=not args.no_results,
            keep_readme=args.keep_readme,
        )  # fmt: skip
    except (*CLI_ERRORS, PushError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: run the same command again to resume (what fully arrived is not sent again)", file=sys.stderr
        )
        return 130
    print_plan(result.plan)
    if args.dry_run:
        if result.plan.card:
            print("\n--- README.md (generated model card) ---\n" + result.plan.card)
        print(f"dry run: nothing was sent to {result.url}")
    elif result.changed:
        for name in result.deleted:
            print(f"deleted on the Hub: {name} (a weight file this checkpoint does not have)")
        print(f"published to {result.url} at commit {result.commit} ({result.transfer})")
        load = f"{args.repo_id!r}, revision={result.commit!r}, trust_remote_code=True"
        print(f"load with: AutoModelForCausalLM.from_pretrained({load})")
    else:
        print(f"nothing changed: {result.url} already holds these files at commit {result.commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
