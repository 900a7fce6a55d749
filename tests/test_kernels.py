"""The kernel dispatch: CPU tensors never reach a Triton kernel, whatever is installed; tests can pin a path."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kimi_linear_kernels as kernels


def test_cpu_tensors_take_the_torch_path():
    assert kernels.kda_backend(torch.zeros(1)) == "torch"


def test_forcing_triton_on_cpu_is_refused_and_torch_can_be_pinned():
    try:
        kernels.force_backend("torch")
        assert kernels.kda_backend(torch.zeros(1)) == "torch"
        kernels.force_backend("triton")
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            kernels.kda_backend(torch.zeros(1))
        with pytest.raises(ValueError, match="backend must be"):
            kernels.force_backend("cuda")
    finally:
        kernels.force_backend(None)


def test_every_launcher_runs_with_its_tensors_device_current():
    # Triton launches on the current CUDA device: every function of the package that launches work must make its
    # input's device current (on_input_device; a model split over GPUs calls with tensors on another device). The
    # predicates and switches launch nothing.
    import inspect

    quiet = {"force_backend", "fla_status", "kda_backend", "triton_serves", "on_input_device"}
    public = [n for n, f in vars(kernels).items() if inspect.isfunction(f) and not n.startswith("_")]
    launchers = [n for n in public if n not in quiet and not n.endswith("_serves")]
    assert len(launchers) >= 15 and {"rms_norm", "kda_prefill", "lora_linear", "grouped_lora_add_"} <= set(launchers)
    unguarded = [n for n in launchers if getattr(getattr(kernels, n), "__wrapped__", None) is None]
    assert not unguarded, unguarded


def test_kernels_folder_is_not_importable_as_top_level_kernels():
    # Hugging Face's `kernels` package owns that import name; ours installs as kimi_linear_kernels.
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    assert spec is None or "kimi" not in str(spec.origin or spec.submodule_search_locations)


FLA_SITE = os.environ.get("KIMI_FLA_SITE")
needs_fla_site = pytest.mark.skipif(
    not FLA_SITE, reason="set KIMI_FLA_SITE to a folder holding fla-core + triton (.ci/run does)"
)


def run_script(script, *args):
    """Run `script` in a fresh Python with `args` (sys.argv[1:]); it must succeed. Returns the finished process."""
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@needs_fla_site
def test_kda_ops_import_without_the_rest_of_fla():
    # fla's package __init__ files import every op, layer and model it has (seconds of a cold start); the KDA ops
    # import without them, and `import fla` afterwards still gets the whole package (its __init__ runs on first use).
    script = textwrap.dedent("""
        import sys, importlib.metadata as md
        sys.path.insert(0, sys.argv[1])
        import kimi_linear_kernels as k
        chunk_kda, fused_recurrent_kda = k._import_kda_ops()
        assert chunk_kda.__module__.startswith("fla.ops.kda"), chunk_kda.__module__
        imported = [m for m in ("fla.ops.abc", "fla.ops.gated_delta_rule", "fla.modules.mlp") if m in sys.modules]
        assert not imported, imported
        import fla
        assert fla.__version__ == md.version("fla-core")
        from fla.ops import chunk_gated_delta_rule  # fla.ops's own __init__ runs here
        assert "fla.ops.gated_delta_rule" in sys.modules and callable(chunk_gated_delta_rule)
        assert fla.ops.kda.chunk_kda is chunk_kda and fla.ops.fused_recurrent_kda is fused_recurrent_kda
        try:
            fla.no_such_name
        except AttributeError as e:
            assert "no_such_name" in str(e)
        else:
            raise AssertionError("a missing attribute must raise AttributeError")
    """)
    run_script(script, FLA_SITE)


@needs_fla_site
def test_model_on_cpu_runs_with_fla_and_triton_installed():
    # With fla and triton importable on a machine without a GPU, every Triton op would raise; the model must
    # still run on CPU tensors (and match the run without fla on the path).
    script = textwrap.dedent("""
        import sys, torch, importlib.metadata as md
        sys.path.insert(0, sys.argv[1])
        import fla.ops.kda, triton  # both importable here
        import kimi_linear_kernels as kernels
        assert kernels.fla_status()[0], kernels.fla_status()
        from kimi_linear.configuration_kimi_linear import KimiLinearConfig
        from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM
        import json
        cfg = KimiLinearConfig(**json.load(open(sys.argv[2])))
        torch.manual_seed(0)
        model = KimiLinearForCausalLM(cfg).eval()
        ids = torch.arange(3, 80)[None]
        with torch.no_grad():
            print(model(ids).logits.double().sum().item())
            print(model.generate(ids, max_new_tokens=3, do_sample=False)[0, -3:].tolist())
    """)
    cfg = os.path.join(os.path.dirname(__file__), "..", "conversion", "configs", "tiny.json")
    with_fla = run_script(script, FLA_SITE, cfg)
    without = subprocess.run(
        [
            sys.executable,
            "-c",
            script.replace("import fla.ops.kda, triton  # both importable here", "").replace(
                "assert kernels.fla_status()[0], kernels.fla_status()", ""
            ),
            "/nonexistent",
            cfg,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert without.returncode == 0, without.stderr[-3000:]
    assert with_fla.stdout == without.stdout


@needs_fla_site
def test_pinned_configurations_round_trip_through_fla_autotuners(tmp_path):
    # On fla's real kernel objects (most are wrapped by @triton.heuristics): choices recorded from the autotuners'
    # caches come back into fresh caches, serve the loose variants (varlen, other batch sizes), and a file from
    # another fla / Triton / GPU pins nothing. No GPU here: the machine identity is fixed by hand.
    script = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        import fla.ops.kda  # noqa: F401  (defines the KDA kernels)
        import kimi_linear_kernels.tuned as tuned
        ident = {"fla-core": "0.6.0", "triton": "3.6.0", "capability": [9, 0]}
        tuned._identity = lambda: dict(ident)
        tuners = list(tuned._autotuners())
        names = {m for m, _, _ in tuners}
        assert {"fla.ops.kda.chunk_intra", "fla.ops.common.chunk_delta_h", "fla.ops.kda.wy_fast"} <= names, names
        picked = {}
        for m, a, t in tuners:
            key = tuple(True if k == "IS_VARLEN" else 7 for k in t.keys) + ("torch.bfloat16",)
            t.cache[key] = t.configs[-1]
            picked[(m, a)] = (key, t.configs[-1])
        data = tuned.record(sys.argv[2])
        assert len(data["kernels"]) == len(tuners)
        for _, _, t in tuners:
            t.cache.clear()
        assert tuned.pin(sys.argv[2]) == len(tuners)
        for (m, a), (key, cfg) in picked.items():
            t = tuned._unwrap(getattr(sys.modules[m], a))
            assert t.cache[key].all_kwargs() == cfg.all_kwargs(), (m, a)
            loose = tuple(False if k == "IS_VARLEN" else (3 if k == "B" else v) for k, v in zip(t.keys, key)) + key[-1:]
            assert loose in t.cache and t.cache[loose].all_kwargs() == cfg.all_kwargs()
            optional = key + ("torch.float32", "torch.int64")  # an initial state and varlen offsets given
            assert optional in t.cache and t.cache[optional].all_kwargs() == cfg.all_kwargs()
            assert key[:-1] + ("torch.float32",) not in t.cache  # another input dtype is another choice
            if any(k not in tuned.LOOSE_KEYS for k in t.keys):
                strict = tuple(v + 1 if k not in tuned.LOOSE_KEYS else v for k, v in zip(t.keys, key)) + key[-1:]
                assert strict not in t.cache, (m, a)
        other = json.load(open(sys.argv[2]))
        other["triton"] = "9.9.9"
        json.dump(other, open(sys.argv[3], "w"))
        assert tuned.pin(sys.argv[3]) == 0
        print(len(tuners))
    """)
    out = run_script(script, FLA_SITE, tmp_path / "a.json", tmp_path / "b.json")
    assert int(out.stdout.split()[-1]) >= 20


@needs_fla_site
def test_precompile_record_is_matched_to_the_machine_and_its_failures_are_contained(tmp_path):
    # No GPU here (the record itself and the bit-for-bit check run in test_gpu.py): a record names fla kernels by
    # their full Triton names, is ignored for another fla / Triton / GPU, asks only for the phases a call needs,
    # each once, and a variant that cannot be preloaded is reported and skipped, never raised.
    script = textwrap.dedent("""
        import json, logging, os, sys
        sys.path.insert(0, sys.argv[1])
        import torch
        import kimi_linear_kernels.precompile as pc
        import kimi_linear_kernels.tuned as tuned
        ident = {"fla-core": "0.6.0", "triton": "3.6.0", "capability": [9, 0]}
        pc._identity = tuned._identity = lambda: dict(ident)
        name = "fla.ops.kda.chunk_intra.chunk_kda_fwd_kernel_inter_solve_fused"
        assert pc._jit_function(name).__class__.__name__ == "JITFunction"
        assert pc.phases(torch.bfloat16, True) == ["bfloat16:forward", "bfloat16:backward"]
        assert pc.phases(torch.float32, False) == ["float32:forward"]
        variants = [{"phase": "bfloat16:forward", "name": name, "data": "{}"},
                    {"phase": "bfloat16:backward", "name": name, "data": "{}"}]
        record = {**ident, "triton_dir": "/elsewhere", "variants": variants}
        json.dump(record, open(sys.argv[2], "w"))
        json.dump({**record, "triton": "9.9.9"}, open(sys.argv[3], "w"))
        assert pc.warm(torch.bfloat16, False, path=sys.argv[3]) == (0, 0.0)  # another Triton: ignored
        pc._done.clear()
        logging.basicConfig(level=logging.WARNING)
        count, _ = pc.warm(torch.bfloat16, False, path=sys.argv[2])  # the preload fails: no GPU, data empty
        assert count == 1, count
        assert pc.warm(torch.bfloat16, False, path=sys.argv[2]) == (0, 0.0)  # each phase once per process
        assert pc.warm(torch.bfloat16, True, path=sys.argv[2])[0] == 1  # training adds only the backward phase
        pc._done.clear()
        os.environ["KIMI_FLA_PRECOMPILE"] = "0"
        assert pc.warm(torch.bfloat16, True, path=sys.argv[2]) == (0, 0.0)
        print("ok")
    """)
    out = run_script(script, FLA_SITE, tmp_path / "a.json", tmp_path / "b.json")
    assert out.stdout.split()[-1] == "ok"
    assert "could not be precompiled" in out.stderr


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 4e-3)])
def test_l2norm_before_the_chunk_kernel_matches_float64(dtype, tol):
    # the q/k L2 norm kda_prefill applies before fla's chunk_kda; fla's formula x / sqrt(sum x^2 + eps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 64, generator=gen) * torch.logspace(-3, 2, 5).view(1, 5, 1, 1)
    x = x.to(dtype).requires_grad_(True)
    y = kernels.l2norm(x)
    x64 = x.detach().double().requires_grad_(True)
    ref = x64 / (x64.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    assert y.dtype == dtype
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (y.double() * w).sum().backward()
    (ref * w).sum().backward()
    assert ((x.grad.double() - x64.grad).norm() / x64.grad.norm()).item() < 2 * tol


def test_tuned_files_merge_by_key_and_refuse_other_setups(tmp_path):
    from kimi_linear_kernels.tuned import merge

    def entry(key, bv):
        return {"key": key, "kwargs": {"BV": bv}, "num_warps": 4, "num_stages": 3, "num_ctas": 1, "maxnreg": None}

    ident = {"fla-core": "0.6.0", "triton": "3.6.0", "capability": [9, 0], "card": "H100"}
    a = {**ident, "kernels": {"m:k1": [entry([1, "torch.bfloat16"], 32)]}}
    b = {**ident, "kernels": {"m:k1": [entry([1, "torch.bfloat16"], 64), entry([1, "torch.float32"], 16)],
                              "m:k2": [entry([7], 8)]}}  # fmt: skip
    paths = []
    for name, data in (("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    out = tmp_path / "merged.json"
    merged = merge(paths, out)
    assert json.loads(out.read_text()) == merged
    k1 = {json.dumps(e["key"]): e["kwargs"]["BV"] for e in merged["kernels"]["m:k1"]}
    assert k1 == {'[1, "torch.bfloat16"]': 32, '[1, "torch.float32"]': 16}  # the first file wins a shared key
    assert merged["kernels"]["m:k2"][0]["key"] == [7]
    paths[1].write_text(json.dumps({**b, "triton": "3.5.0"}))
    with pytest.raises(ValueError, match="one setup"):
        merge(paths, out)
    assert json.loads(out.read_text()) == merged  # nothing half-written
