"""Fused one-token KDA decode step (Triton): short-conv window update + SiLU, q/k L2 norm, forget gate, beta,
delta-rule state update and output, in one launch, in place on the cache's tensors.

PyTorch twin (same signature, same in-place effect): `kda_decode_torch` in modeling_kimi_linear.py.

One program per (sequence, head) owns that head's q/k/v conv channels and its [K, V] state, so the in-place updates
race with nothing; the state is walked in [K, BV] tiles. Fixed launch configuration: nothing is tuned at run time,
so a new batch size costs no tuning (BV = 64 with 4 warps was the fastest of the swept configurations on an H200 at
every batch from 1 to 256: benchmarks/kda_gpu.py).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_step(x_ptr, c_ptr, w_ptr, b, ch, D, W: tl.constexpr, WP: tl.constexpr):
    """Causal depthwise conv of one new input per channel, then SiLU; shifts the [W-1] window in place.
    ch: channel offsets [N]; returns the activations [N] in float32."""
    j = tl.arange(0, WP)
    hist = j < W - 1
    x = tl.load(x_ptr + b * D + ch).to(tl.float32)
    row = (b * D + ch)[:, None] * (W - 1)
    window = tl.load(c_ptr + row + j[None, :], mask=hist[None, :], other=0.0).to(tl.float32)  # [N, WP]
    w_hist = tl.load(w_ptr + ch[:, None] * W + j[None, :], mask=hist[None, :], other=0.0).to(tl.float32)
    w_last = tl.load(w_ptr + ch * W + (W - 1)).to(tl.float32)
    acc = tl.sum(window * w_hist, axis=1) + x * w_last
    # new window: slots 1..W-2 move down one, the new input goes last
    nxt = tl.load(c_ptr + row + j[None, :] + 1, mask=(j < W - 2)[None, :], other=0.0).to(tl.float32)
    shifted = tl.where((j == W - 2)[None, :], x[:, None], nxt)
    tl.store(c_ptr + row + j[None, :], shifted.to(c_ptr.dtype.element_ty), mask=hist[None, :])
    return acc * tl.sigmoid(acc)


@triton.jit
def _kda_decode_kernel(
    xq, xk, xv, cq, ck, cv, wq, wk, wv, g_raw, A_log, dt_bias, b_raw, S, o,
    scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    ck_ch = h * K + tl.arange(0, K)
    q = _conv_step(xq, cq, wq, b, ck_ch, H * K, W, WP)
    k = _conv_step(xk, ck, wk, b, ck_ch, H * K, W, WP)
    q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6)
    k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)

    # g = -exp(A_log) * softplus(g_raw + dt_bias), softplus(x) = x above 20 (as torch)
    gr = tl.load(g_raw + b * H * K + ck_ch).to(tl.float32) + tl.load(dt_bias + ck_ch).to(tl.float32)
    softplus = tl.where(gr > 20.0, gr, tl.log(1.0 + tl.exp(tl.minimum(gr, 20.0))))
    decay = tl.exp(-tl.exp(tl.load(A_log + h).to(tl.float32)) * softplus)  # [K]
    beta = tl.sigmoid(tl.load(b_raw + b * H + h).to(tl.float32))

    s_base = S + (b * H + h) * K * V
    for vb in tl.static_range(0, V, BV):
        offv = vb + tl.arange(0, BV)
        v = _conv_step(xv, cv, wv, b, h * V + offv, H * V, W, WP)  # [BV]
        ptrs = s_base + tl.arange(0, K)[:, None] * V + offv[None, :]
        s = tl.load(ptrs) * decay[:, None]  # decay first
        u = beta * (v - tl.sum(s * k[:, None], axis=0))
        s = s + k[:, None] * u[None, :]  # then the delta update
        tl.store(ptrs, s)
        tl.store(o + (b * H + h) * V + offv, scale * tl.sum(s * q[:, None], axis=0))


def kda_decode_fused(
    xq, xk, xv, conv_q, conv_k, conv_v, wq, wk, wv, g_raw, A_log, dt_bias, b_raw, state, scale=None,
    block_v=None, num_warps=None,
):  # fmt: skip
    """One KDA decode step for B tokens on CUDA. xq, xk [B, H*K], xv [B, H*V]: projections before the conv;
    conv_*: [B, D, W-1] windows; w*: conv weights [D, 1, W]; g_raw [B, H*K] = f_b(f_a(x)); A_log [H] (any shape
    with H elements); dt_bias [H*K]; b_raw [B, H] = b_proj(x); state [B, H, K, V] float32.
    Updates the windows and the state in place; returns o [B, H, V] float32. block_v / num_warps override the
    fixed launch configuration (benchmarks sweep them)."""
    B, H = b_raw.shape
    K, V = state.shape[-2:]
    W = wq.shape[-1]
    for t in (xq, xk, xv, conv_q, conv_k, conv_v, g_raw, b_raw, state):
        if not t.is_contiguous():
            raise ValueError("kda_decode_fused needs contiguous inputs (the cache keeps its tensors contiguous)")
    if state.dtype != torch.float32:
        raise ValueError(f"the recurrent state must be float32, got {state.dtype}")
    o = torch.empty(B, H, V, device=state.device, dtype=torch.float32)
    _kda_decode_kernel[(B * H,)](
        xq, xk, xv, conv_q, conv_k, conv_v, wq, wk, wv, g_raw, A_log, dt_bias, b_raw, state, o,
        K**-0.5 if scale is None else scale,
        H=H, K=K, V=V, W=W, WP=triton.next_power_of_2(max(W - 1, 2)), BV=block_v or min(V, 64),
        num_warps=num_warps or 4,
    )  # fmt: skip
    return o
