"""MLA's prefill attention in Triton: causal flash attention over the expanded heads (q and k of 192 values per head,
taken as two products of 128 and 64, values of 128), one launch, compiled once for every prompt length.

PyTorch twin: `F.scaled_dot_product_attention(q, k, v, is_causal=True)`, which on an H100 runs cuDNN's kernel. cuDNN
builds an execution plan for every new shape (50-70 ms of host time); the model calls this kernel instead where
that plan would stall the GPU (the first prompt of a new length, KimiMLAAttention._attend_expanded), and cuDNN once
its plan is built. The prompt length is not specialized on (do_not_specialize): a new length compiles nothing.

Each program takes BM queries of one head, longest rows first (causal rows grow with the position), and walks the
keys before its block without a mask, then its diagonal block with the causal one. Scores, the running max and sum
are float32 in base 2 (the scale folded into log2(e)); the probabilities meet the values in the inputs' dtype.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _step(acc, l_i, m_i, qa, qb, k_rows, v_rows, n0, offs_m, offs_n, T, stride_kt, stride_vt, qk_scale,
          DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr, DIAGONAL: tl.constexpr):  # fmt: skip
    """One block of BN keys starting at n0: scores, online softmax, values."""
    rows = (n0 + offs_n).to(tl.int64)
    ok = (n0 + offs_n) < T
    if DIAGONAL:
        ka = tl.load(k_rows + rows[:, None] * stride_kt + tl.arange(0, DA)[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_rows + rows[:, None] * stride_vt + tl.arange(0, DV)[None, :], mask=ok[:, None], other=0.0)
    else:
        ka = tl.load(k_rows + rows[:, None] * stride_kt + tl.arange(0, DA)[None, :])
        v = tl.load(v_rows + rows[:, None] * stride_vt + tl.arange(0, DV)[None, :])
    qk = tl.dot(qa, tl.trans(ka))
    if DB > 0:
        if DIAGONAL:
            kb = tl.load(k_rows + rows[:, None] * stride_kt + DA + tl.arange(0, DB)[None, :], mask=ok[:, None],
                         other=0.0)  # fmt: skip
        else:
            kb = tl.load(k_rows + rows[:, None] * stride_kt + DA + tl.arange(0, DB)[None, :])
        qk = tl.dot(qb, tl.trans(kb), qk)
    qk = qk * qk_scale
    if DIAGONAL:
        qk = tl.where(offs_m[:, None] >= (n0 + offs_n)[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["T"])
def _fwd(Q, K, V, O, T, H, qk_scale, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
         stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
         DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    start_m = tl.cdiv(T, BM) - 1 - tl.program_id(0)  # the longest rows first
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)
    offs_m = start_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    m_ok = offs_m < T
    q_rows = Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt
    qa = tl.load(q_rows + tl.arange(0, DA)[None, :], mask=m_ok[:, None], other=0.0)
    qb = qa
    if DB > 0:
        qb = tl.load(q_rows + DA + tl.arange(0, DB)[None, :], mask=m_ok[:, None], other=0.0)
    k_rows = K + b * stride_kb + h * stride_kh
    v_rows = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, DV], dtype=tl.float32)
    for n0 in range(0, start_m * BM, BN):  # keys wholly before the block
        acc, l_i, m_i = _step(acc, l_i, m_i, qa, qb, k_rows, v_rows, n0, offs_m, offs_n, T, stride_kt, stride_vt,
                              qk_scale, DA, DB, DV, False)  # fmt: skip
    for n0 in range(start_m * BM, tl.minimum((start_m + 1) * BM, T), BN):  # the diagonal block
        acc, l_i, m_i = _step(acc, l_i, m_i, qa, qb, k_rows, v_rows, n0, offs_m, offs_n, T, stride_kt, stride_vt,
                              qk_scale, DA, DB, DV, True)  # fmt: skip
    out = acc / l_i[:, None]
    o_rows = O + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot
    tl.store(o_rows + tl.arange(0, DV)[None, :], out.to(O.dtype.element_ty), mask=m_ok[:, None])


def split_dims(d):
    """The two power-of-two widths (the second may be 0) a q/k head dimension is taken in, or None."""
    a = 1 << (d.bit_length() - 1)
    b = d - a
    return (a, b) if a >= 16 and (b == 0 or (b >= 16 and b & (b - 1) == 0)) else None


def mla_prefill(q, k, v, scale, block_m=128, block_n=128, num_warps=8, num_stages=2):
    """softmax(scale * q k^T, causal) v for q, k [B, H, T, D] and v [B, H, T, DV] (any strides, the last dimension
    contiguous; D a power of two or the sum of two, each at least 16, DV a power of two). Returns [B, H, T, DV] in
    the inputs' dtype, laid out in memory as [B, T, H, DV] (as SDPA lays out the output of q in that layout)."""
    B, H, T, D = q.shape
    DV = v.shape[-1]
    dims = split_dims(D)
    if k.shape != q.shape or v.shape[:3] != (B, H, T):
        raise ValueError(f"mla_prefill needs q, k [B, H, T, D] and v [B, H, T, DV]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")  # fmt: skip
    if dims is None or DV < 16 or DV & (DV - 1):
        raise ValueError(f"mla_prefill takes head dims of 2^a (+ 2^b), each >= 16, and a power-of-two value dim; "
                         f"got {D} and {DV}")  # fmt: skip
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("mla_prefill needs the last dimension of q, k and v contiguous")
    if block_m % block_n:
        raise ValueError(f"block_m ({block_m}) must be a multiple of block_n ({block_n})")
    out = torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device).transpose(1, 2)
    if T == 0:
        return out
    _fwd[(triton.cdiv(T, block_m), B * H)](
        q, k, v, out, T, H, float(scale) * 1.4426950408889634,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        DA=dims[0], DB=dims[1], DV=DV, BM=block_m, BN=block_n, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
