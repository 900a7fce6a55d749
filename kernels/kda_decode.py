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

from .host import cdiv, next_power_of_2


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
def _head_qk(xq, xk, cq, ck, wq, wk, H: tl.constexpr, K: tl.constexpr, W: tl.constexpr, WP: tl.constexpr):
    """The program's (sequence b, head h) and that head's channels ch [K], with its q and k after their conv step
    (windows shifted in place), SiLU and L2 norm: [K] each, float32."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    ch = h * K + tl.arange(0, K)
    q = _conv_step(xq, cq, wq, b, ch, H * K, W, WP)
    k = _conv_step(xk, ck, wk, b, ch, H * K, W, WP)
    return b, h, ch, q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6), k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)


@triton.jit
def _decay(gr, A_log, h):
    """exp(g) for g = -exp(A_log) * softplus(gr), gr = g_raw + dt_bias [K]; softplus(x) = x above 20 (as torch)."""
    softplus = tl.where(gr > 20.0, gr, tl.log(1.0 + tl.exp(tl.minimum(gr, 20.0))))
    return tl.exp(-tl.exp(tl.load(A_log + h).to(tl.float32)) * softplus)


@triton.jit
def _update_tile(xv, cv, wv, S, q, k, decay, beta, scale, b, h, vb,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                 BV: tl.constexpr):  # fmt: skip
    """Columns vb .. vb + BV of head h: v's conv step, the state tile decayed then delta-updated (in place), and
    the output scale * S^T q for those columns [BV], float32."""
    offv = vb + tl.arange(0, BV)
    v = _conv_step(xv, cv, wv, b, h * V + offv, H * V, W, WP)  # [BV]
    ptrs = S + (b * H + h) * K * V + tl.arange(0, K)[:, None] * V + offv[None, :]
    s = tl.load(ptrs) * decay[:, None]  # decay first
    u = beta * (v - tl.sum(s * k[:, None], axis=0))
    s = s + k[:, None] * u[None, :]  # then the delta update
    tl.store(ptrs, s)
    return scale * tl.sum(s * q[:, None], axis=0)


@triton.jit
def _kda_decode_kernel(
    xq, xk, xv, cq, ck, cv, wq, wk, wv, g_raw, A_log, dt_bias, b_raw, S, o,
    scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    b, h, ch, q, k = _head_qk(xq, xk, cq, ck, wq, wk, H, K, W, WP)
    decay = _decay(tl.load(g_raw + b * H * K + ch).to(tl.float32) + tl.load(dt_bias + ch).to(tl.float32), A_log, h)
    beta = tl.sigmoid(tl.load(b_raw + b * H + h).to(tl.float32))
    for vb in tl.static_range(0, V, BV):
        out = _update_tile(xv, cv, wv, S, q, k, decay, beta, scale, b, h, vb, H, K, V, W, WP, BV)
        tl.store(o + (b * H + h) * V + vb + tl.arange(0, BV), out)


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
        H=H, K=K, V=V, W=W, WP=next_power_of_2(max(W - 1, 2)), BV=block_v or min(V, 64),
        num_warps=num_warps or 4,
    )  # fmt: skip
    return o


@triton.jit
def _proj_kernel(X, W1, W2, W3, W4, W5, W6, Y1, Y2, Y3, Y4, Y5, Y6, H, R1, R2, R3, R4, R5, R6,
                 BR: tl.constexpr, BH: tl.constexpr):  # fmt: skip
    """Y_i[b] = W_i x[b] for up to six projections of the same input in one launch (R_i = 0: unused); program_id(1)
    walks the row blocks of W1, then W2, ... Each program streams BR whole rows."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    e1 = tl.cdiv(R1, BR)
    e2 = e1 + tl.cdiv(R2, BR)
    e3 = e2 + tl.cdiv(R3, BR)
    e4 = e3 + tl.cdiv(R4, BR)
    e5 = e4 + tl.cdiv(R5, BR)
    if p < e1:
        w, y, rows_total, r0 = W1, Y1, R1, p * BR
    elif p < e2:
        w, y, rows_total, r0 = W2, Y2, R2, (p - e1) * BR
    elif p < e3:
        w, y, rows_total, r0 = W3, Y3, R3, (p - e2) * BR
    elif p < e4:
        w, y, rows_total, r0 = W4, Y4, R4, (p - e3) * BR
    elif p < e5:
        w, y, rows_total, r0 = W5, Y5, R5, (p - e4) * BR
    else:
        w, y, rows_total, r0 = W6, Y6, R6, (p - e5) * BR
    rows = r0 + tl.arange(0, BR)
    acc = tl.zeros([BR, BH], dtype=tl.float32)
    for h0 in range(0, H, BH):
        h = h0 + tl.arange(0, BH)
        x = tl.load(X + b * H + h, mask=h < H, other=0.0).to(tl.float32)[None, :]
        tile = tl.load(
            w + rows[:, None] * H + h[None, :], mask=(rows < rows_total)[:, None] & (h < H)[None, :], other=0.0
        )
        acc += tile.to(tl.float32) * x
    tl.store(y + b * rows_total + rows, tl.sum(acc, axis=1).to(y.dtype.element_ty), mask=rows < rows_total)


def projections(x, *weights, block_r=2, block_h=512):
    """[x @ w.T for w in weights] for x [B, hidden] and up to six nn.Linear weights [R_i, hidden] of x's dtype, in one
    launch: a KDA decode step's q, k, v, f_a, g_a and b_proj, instead of six latency-bound products (float32 sums,
    each output rounded to x's dtype as nn.Linear's is)."""
    if not 1 <= len(weights) <= 6:
        raise ValueError(f"projections takes one to six weights, got {len(weights)}")
    B, H = x.shape
    for w in weights:
        if w.shape[-1] != H or not w.is_contiguous() or w.dtype != x.dtype:
            raise ValueError(f"projections needs contiguous [rows, {H}] weights of {x.dtype}, got {tuple(w.shape)} "
                             f"{w.dtype}")  # fmt: skip
    x = x.contiguous()
    outs = [torch.empty(B, w.shape[0], dtype=x.dtype, device=x.device) for w in weights]
    pad = 6 - len(weights)
    blocks = sum(cdiv(w.shape[0], block_r) for w in weights)
    _proj_kernel[(B, blocks)](
        x, *weights, *(x,) * pad, *outs, *(x,) * pad, H, *(w.shape[0] for w in weights), *(0,) * pad,
        BR=block_r, BH=block_h, num_warps=4,
    )  # fmt: skip
    return outs


@triton.jit
def _kda_layer_decode_kernel(
    xq, xk, xv, cq, ck, cv, wq, wk, wv, FA, WFB, A_log, dt_bias, b_raw, S, GA, WGB, WN, O32, OUT,
    scale, eps, R,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, RP: tl.constexpr,
    BV: tl.constexpr,
):  # fmt: skip
    b, h, ch, q, k = _head_qk(xq, xk, cq, ck, wq, wk, H, K, W, WP)

    # the gate's low-rank second half for this head: f_b rows [K, R] x f_a(x) [R], rounded as f_b's output is
    r = tl.arange(0, RP)
    fa = tl.load(FA + b * R + r, mask=r < R, other=0.0).to(tl.float32)
    wfb = tl.load(WFB + ch[:, None] * R + r[None, :], mask=(r < R)[None, :], other=0.0).to(tl.float32)
    g_raw = tl.sum(wfb * fa[None, :], axis=1).to(FA.dtype.element_ty).to(tl.float32)
    decay = _decay(g_raw + tl.load(dt_bias + ch).to(tl.float32), A_log, h)
    beta = tl.sigmoid(tl.load(b_raw + b * H + h).to(tl.float32))

    o_base = (b * H + h) * V
    sumsq = 0.0
    for vb in tl.static_range(0, V, BV):
        o = _update_tile(xv, cv, wv, S, q, k, decay, beta, scale, b, h, vb, H, K, V, W, WP, BV)
        o = o.to(OUT.dtype.element_ty).to(tl.float32)  # o in x's dtype, as the plain path hands it to the norm
        sumsq += tl.sum(o * o, axis=0)
        tl.store(O32 + o_base + vb + tl.arange(0, BV), o)
    tl.debug_barrier()  # the tiles just stored are read back by other threads of this program
    rstd = tl.rsqrt(sumsq / V + eps)
    ga = tl.load(GA + b * R + r, mask=r < R, other=0.0).to(tl.float32)
    for vb in tl.static_range(0, V, BV):
        offv = vb + tl.arange(0, BV)
        wgb = tl.load(WGB + (h * V + offv)[:, None] * R + r[None, :], mask=(r < R)[None, :], other=0.0)
        gate = tl.sum(wgb.to(tl.float32) * ga[None, :], axis=1).to(GA.dtype.element_ty).to(tl.float32)
        o = tl.load(O32 + o_base + offv)
        y = tl.load(WN + offv).to(tl.float32) * (o * rstd) * tl.sigmoid(gate)
        tl.store(OUT + o_base + offv, y.to(OUT.dtype.element_ty))


def kda_decode_layer(
    xq, xk, xv, conv_q, conv_k, conv_v, wq, wk, wv, fa, f_b, A_log, dt_bias, b_raw, state, ga, g_b, norm_weight,
    eps, scale=None, block_v=None, num_warps=None,
):  # fmt: skip
    """kda_decode_fused and what surrounds it in a decode step, in one launch: the gate's second low-rank projection
    g_raw = f_b @ fa, the step itself (in place on the windows and the state), and the output's gated RMSNorm with
    the output gate g_b @ ga. fa, ga [B, R]: f_a(x), g_a(x); f_b, g_b [H*K, R] / [H*V, R] weights; norm_weight [V].
    Returns the normed, gated output [B, H*V] in fa's dtype, ready for o_proj. Twin: KimiDeltaAttention._decode's
    plain path (kda_decode_torch, then o_norm)."""
    B, H = b_raw.shape
    K, V = state.shape[-2:]
    W = wq.shape[-1]
    R = fa.shape[-1]
    for t in (xq, xk, xv, conv_q, conv_k, conv_v, fa, f_b, b_raw, state, ga, g_b):
        if not t.is_contiguous():
            raise ValueError("kda_decode_layer needs contiguous inputs (the cache keeps its tensors contiguous)")
    if state.dtype != torch.float32:
        raise ValueError(f"the recurrent state must be float32, got {state.dtype}")
    scratch = torch.empty(B, H, V, device=state.device, dtype=torch.float32)
    out = torch.empty(B, H * V, device=state.device, dtype=fa.dtype)
    _kda_layer_decode_kernel[(B * H,)](
        xq, xk, xv, conv_q, conv_k, conv_v, wq, wk, wv, fa, f_b, A_log, dt_bias, b_raw, state, ga, g_b, norm_weight,
        scratch, out, K**-0.5 if scale is None else scale, eps, R,
        H=H, K=K, V=V, W=W, WP=next_power_of_2(max(W - 1, 2)), RP=next_power_of_2(R),
        BV=block_v or min(V, 64), num_warps=num_warps or 4,
    )  # fmt: skip
    return out
