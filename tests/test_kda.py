"""KDA in plain PyTorch against the float64 per-token loop written from the math (kernels/naive.py)."""

import pytest
import torch

from conftest import rel_err
from kimi_linear.modeling_kimi_linear import (
    _new_window,
    kda_chunk_torch,
    kda_gate,
    kda_step_torch,
    l2norm,
    short_conv,
)
from kimi_linear_kernels.naive import kda_recurrent_reference


def kda_inputs(B, T, H, K, V, seed, strong_decay=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(B, T, H, K, generator=g))
    k = l2norm(torch.randn(B, T, H, K, generator=g))
    v = torch.randn(B, T, H, V, generator=g)
    # The released gate is unbounded: per-token log-decays of -100 and below do occur.
    scale = 60.0 if strong_decay else 1.0
    logdecay = -torch.exp(torch.randn(B, T, H, K, generator=g)) * scale * torch.rand(B, T, H, K, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    h0 = torch.randn(B, H, K, V, generator=g)
    return [x.to(dtype) for x in (q, k, v)] + [logdecay, beta.to(dtype), h0]


@pytest.mark.parametrize("T", [1, 15, 63, 64, 65, 200, 1000])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_matches_token_loop(T, with_state):
    q, k, v, g, beta, h0 = kda_inputs(2, T, 3, 16, 12, seed=T)
    h0 = h0 if with_state else None
    o, s = kda_chunk_torch(q, k, v, g, beta, initial_state=h0)
    ro, rs = kda_recurrent_reference(q, k, v, g, beta, initial_state=h0)
    assert rel_err(o, ro) < 1e-5
    assert rel_err(s, rs) < 1e-5


def test_chunk_survives_unbounded_decay():
    # Cumulative log-decays reach thousands inside a chunk: no exp of a positive number may appear.
    q, k, v, g, beta, h0 = kda_inputs(1, 130, 2, 16, 8, seed=1, strong_decay=True)
    assert g.sum(1).min() < -2000
    o, s = kda_chunk_torch(q, k, v, g, beta, initial_state=h0)
    ro, rs = kda_recurrent_reference(q, k, v, g, beta, initial_state=h0)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_err(o, ro) < 1e-5 and rel_err(s, rs) < 1e-5
    for t in (q, k, v, g, beta, h0):
        t.requires_grad_(True)
    o, s = kda_chunk_torch(q, k, v, g, beta, initial_state=h0)
    (o.sum() + s.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, g, beta, h0))


@pytest.mark.parametrize("T", [1, 63, 64, 65, 150])
def test_chunk_gradients_match_token_loop(T):
    inputs = kda_inputs(1, T, 2, 8, 8, seed=100 + T)
    ours = [t.clone().requires_grad_(True) for t in inputs]
    ref = [t.double().clone().requires_grad_(True) for t in inputs]
    w_o = torch.randn(1, T, 2, 8, dtype=torch.float64)
    w_s = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    o, s = kda_chunk_torch(*ours[:5], initial_state=ours[5])
    ((o.double() * w_o).sum() + (s.double() * w_s).sum()).backward()
    ro, rs = kda_recurrent_reference(*ref[:5], initial_state=ref[5])
    ((ro * w_o).sum() + (rs * w_s).sum()).backward()
    for name, a, b in zip(("q", "k", "v", "g", "beta", "h0"), ours, ref):
        assert rel_err(a.grad, b.grad) < 1e-4, name


def test_step_matches_token_loop():
    q, k, v, g, beta, h0 = kda_inputs(2, 9, 3, 16, 12, seed=7)
    state, outs = h0.clone(), []
    for t in range(9):
        o, state = kda_step_torch(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o)
    ro, rs = kda_recurrent_reference(q, k, v, g, beta, initial_state=h0)
    assert rel_err(torch.stack(outs, 1), ro) < 1e-6
    assert rel_err(state, rs) < 1e-6


def test_chunk_in_pieces_equals_one_pass():
    q, k, v, g, beta, h0 = kda_inputs(1, 300, 2, 16, 16, seed=3)
    o_all, s_all = kda_chunk_torch(q, k, v, g, beta, initial_state=h0)
    o1, s1 = kda_chunk_torch(q[:, :77], k[:, :77], v[:, :77], g[:, :77], beta[:, :77], initial_state=h0)
    o2, s2 = kda_chunk_torch(q[:, 77:], k[:, 77:], v[:, 77:], g[:, 77:], beta[:, 77:], initial_state=s1)
    assert rel_err(torch.cat([o1, o2], 1), o_all) < 1e-5
    assert rel_err(s2, s_all) < 1e-5


def test_bfloat16_inputs():
    q, k, v, g, beta, h0 = kda_inputs(1, 100, 2, 16, 16, seed=5, dtype=torch.bfloat16)
    o, s = kda_chunk_torch(q, k, v, g, beta, initial_state=h0)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ro, rs = kda_recurrent_reference(q, k, v, g, beta, initial_state=h0)
    assert rel_err(o, ro) < 1e-2 and rel_err(s, rs) < 1e-4


def test_memory_stays_inside_chunks():
    # No [T, T, K] tensor: every intermediate at T=4096 must stay far below T*T*K floats (8 GiB here).
    T, H, K = 4096, 1, 128
    q, k, v, g, beta, _ = kda_inputs(1, T, H, K, K, seed=2)
    peak = {"bytes": 0}

    def track(func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                peak["bytes"] = max(peak["bytes"], t.numel() * t.element_size())
        return out

    from torch.overrides import TorchFunctionMode

    class Track(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return track(func, types, args, kwargs)

    with torch.no_grad(), Track():
        kda_chunk_torch(q, k, v, g, beta)
    assert peak["bytes"] < 64 * 2**20, f"largest intermediate {peak['bytes'] / 2**20:.0f} MiB"


def test_gate_is_the_released_formula():
    x = torch.randn(2, 5, 3, 4)
    A_log = torch.randn(1, 1, 3, 1)
    dt_bias = torch.randn(12)
    g = kda_gate(x, A_log, dt_bias)
    expected = -torch.exp(A_log.view(3, 1)) * torch.log1p(torch.exp(x + dt_bias.view(3, 4)))
    assert torch.allclose(g, expected, atol=1e-6)
    assert (g <= 0).all()


def test_short_conv_matches_direct_sum_and_carries_state():
    B, T, D, W = 2, 11, 6, 4
    x, w = torch.randn(B, T, D), torch.randn(D, 1, W)
    y, state = short_conv(x, w)
    padded = torch.cat([torch.zeros(B, W - 1, D), x], 1)
    direct = torch.stack([(padded[:, t : t + W] * w[:, 0].T).sum(1) for t in range(T)], 1)
    assert torch.allclose(y, torch.nn.functional.silu(direct), atol=1e-6)
    y1, s1 = short_conv(x[:, :5], w)
    y2, s2 = short_conv(x[:, 5:], w, s1)
    assert torch.allclose(torch.cat([y1, y2], 1), y, atol=1e-6) and torch.allclose(s2, state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_short_conv_in_each_dtype_whole_and_token_by_token_near_float64(dtype):
    # a prompt at once and the same tokens one decode step at a time (the CPU's product-and-sum path): each within
    # one rounding of the float64 direct sum (half types summed in float32 and rounded once)
    B, T, D, W = 2, 9, 40, 4
    x, w, state = torch.randn(B, T, D).double(), torch.randn(D, 1, W).double(), torch.randn(B, D, W - 1).double()
    padded = torch.cat([state.transpose(1, 2), x], 1)
    direct = torch.nn.functional.silu(torch.stack([(padded[:, t : t + W] * w[:, 0].T).sum(1) for t in range(T)], 1))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2 * torch.finfo(dtype).eps)
    whole, last = short_conv(x.to(dtype), w.to(dtype), state.to(dtype))
    window, steps = state.to(dtype), []
    for t in range(T):
        y, window = short_conv(x[:, t : t + 1].to(dtype), w.to(dtype), window)
        steps.append(y)
    for got in (whole, torch.cat(steps, 1)):
        assert got.dtype == dtype and ((got.double() - direct).abs() <= tol * (1 + direct.abs())).all()
    assert torch.equal(window, last) and torch.equal(last, x[:, -(W - 1) :].transpose(1, 2).to(dtype))


@pytest.mark.parametrize("T", [1, 2, 3, 7])
@pytest.mark.parametrize("with_state", [False, True])
def test_new_window_of_the_triton_conv_path_equals_the_twins(T, with_state):
    # the Triton conv path (CUDA) takes its new window from _new_window: the twin's, also for fewer tokens than
    # the window holds (the old window's end first)
    x = torch.randn(2, T, 6)
    state = torch.randn(2, 6, 3) if with_state else None
    _, want = short_conv(x, torch.randn(6, 1, 4), state)
    assert torch.equal(_new_window(x, state, 4), want)


def test_chunk_keeps_float64_for_references():
    q, k, v, g, beta, h0 = (t.double() for t in kda_inputs(1, 70, 2, 8, 8, seed=4))
    o, s = kda_chunk_torch(q, k, v, g, beta, initial_state=h0)
    ro, rs = kda_recurrent_reference(q, k, v, g, beta, initial_state=h0)
    assert o.dtype == s.dtype == torch.float64
    assert rel_err(o, ro) < 1e-12 and rel_err(s, rs) < 1e-12
