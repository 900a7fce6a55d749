"""The kernel dispatch: CPU tensors never reach a Triton kernel, whatever is installed; tests can pin a path."""

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


def test_kernels_folder_is_not_importable_as_top_level_kernels():
    # Hugging Face's `kernels` package owns that import name; ours installs as kimi_linear_kernels.
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    assert spec is None or "kimi" not in str(spec.origin or spec.submodule_search_locations)


FLA_SITE = os.environ.get("KIMI_FLA_SITE")


@pytest.mark.skipif(not FLA_SITE, reason="set KIMI_FLA_SITE to a folder holding fla-core + triton (.ci/run does)")
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
    with_fla = subprocess.run(
        [sys.executable, "-c", script, FLA_SITE, cfg], capture_output=True, text=True, timeout=300
    )
    assert with_fla.returncode == 0, with_fla.stderr[-3000:]
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
