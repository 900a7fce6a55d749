"""GPU paths (fla-core's Triton KDA) against the PyTorch specification. Run on a CUDA machine with fla-core."""

import pytest
import torch

import kimi_linear_kernels as kernels
from conftest import build_model, tiny_config_dict
from kimi_linear.modeling_kimi_linear import KimiLinearCache, kda_chunk_torch, kda_step_torch
from test_kda import kda_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


@pytest.fixture(autouse=True)
def need_fla():
    usable, reason = kernels.fla_status()
    if not usable:
        pytest.skip(reason)


@pytest.mark.parametrize("T", [63, 64, 1000, 8192])
@pytest.mark.parametrize("with_state", [False, True])
def test_fla_chunk_matches_float64_reference(T, with_state):
    q, k, v, g, beta, h0 = kda_inputs(1, T, 4, 128, 128, seed=T)
    h0 = h0 if with_state else None
    ref_o, ref_s = kda_chunk_torch(
        *(x.double() for x in (q, k, v, g, beta)), initial_state=None if h0 is None else h0.double()
    )
    dev = [x.cuda() for x in (q, k, v)]
    o, s = kernels.kda_chunk(
        *(x.bfloat16() for x in dev), g.cuda(), beta.cuda().bfloat16(), initial_state=None if h0 is None else h0.cuda()
    )
    assert rel_rms(o.cpu(), ref_o) < 5e-3
    assert rel_rms(s.cpu(), ref_s) < 5e-3


def test_fla_decode_step_matches_torch_step():
    q, k, v, g, beta, h0 = kda_inputs(4, 1, 8, 128, 128, seed=1)
    ref_o, ref_s = kda_step_torch(
        q[:, 0].double(), k[:, 0].double(), v[:, 0].double(), g[:, 0].double(), beta[:, 0].double(), h0.double()
    )
    o, s = kernels.kda_decode(*(x.cuda() for x in (q, k, v, g, beta)), h0.cuda())
    assert rel_rms(o[:, 0].cpu(), ref_o) < 5e-3 and rel_rms(s.cpu(), ref_s) < 5e-3


@torch.no_grad()
def test_model_on_cuda_with_fla_matches_torch_path():
    lac = dict(tiny_config_dict()["linear_attn_config"], num_heads=2, head_dim=64)
    model = build_model(linear_attn_config=lac).cuda()
    ids = torch.randint(3, 512, (2, 200), generator=torch.Generator().manual_seed(0)).cuda()
    assert kernels.kda_backend(ids.float()) == "triton"
    fast = model(ids).logits
    cache = KimiLinearCache(model.config)
    steps = [model(ids[:, :150], cache=cache).logits] + [
        model(ids[:, t : t + 1], cache=cache).logits for t in range(150, 200)
    ]
    try:
        kernels.force_backend("torch")
        plain = model(ids).logits
    finally:
        kernels.force_backend(None)
    assert rel_rms(fast, plain) < 5e-3
    assert rel_rms(torch.cat(steps, 1), plain) < 5e-3


@torch.no_grad()
def test_cpu_model_never_reaches_triton_on_a_gpu_machine():
    model = build_model()
    ids = torch.randint(3, 512, (1, 100), generator=torch.Generator().manual_seed(3))
    assert kernels.kda_backend(ids.float()) == "torch"
    out = model(ids).logits  # would raise inside Triton if a CPU tensor reached it
    assert torch.isfinite(out).all()
