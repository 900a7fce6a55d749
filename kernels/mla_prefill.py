"""MLA's prefill attention in Triton: causal flash attention over the expanded heads (q and k of 192 values per head,
taken as two products of 128 and 64, values of 128), one launch, compiled once for every prompt length.

PyTorch twin: `F.scaled_dot_product_attention(q, k, v, is_causal=True)`, which on an H100 or H200 runs cuDNN's
kernel. cuDNN builds an execution plan for every new shape (50-70 ms of host time on an H100 host, 150-180 ms on an
H200 host); the model calls this kernel instead where building that plan would stall the GPU (a prompt whose
1024-token bucket has no plan yet, KimiMLAAttention._attend_expanded), and cuDNN's kernel once the plan is built.
The prompt length is not specialized on (do_not_specialize): a new length compiles nothing.

Each program takes BM queries of one head, longest rows first (causal rows grow with the position), and walks the
keys before its block without a mask, then its diagonal block with the causal one. Scores, the running max and sum
are float32 in base 2 (the scale folded into log2(e)); the probabilities meet the values in the inputs' dtype.

Launch settings from a sweep on an H200 (benchmarks/probe_mla_prefill.py, results/probe_mla_prefill*.log; 32 heads,
bf16): 128 x 64 blocks, 8 warps, 3 stages, loads through TMA descriptors where the layouts allow (the model's do):
1.31x / 1.21x / 1.19x cuDNN's time at 8k / 32k / 64k tokens (cuDNN at 600-660 TFLOP/s); pointer loads within 0.05x
of that; 0.7 s to compile.
"""

import torch
import triton
import triton.language as tl

from . import _capability
from .host import cdiv


@triton.jit
def _update(acc, l_i, m_i, qk, v, offs_m, offs_n, n0, qk_scale, DIAGONAL: tl.constexpr):
    """The online softmax over one block of scores qk [BM, BN] and its values v [BN, DV]."""
    qk = qk * qk_scale
    if DIAGONAL:
        qk = tl.where(offs_m[:, None] >= (n0 + offs_n)[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _step(acc, l_i, m_i, qa, qb, k_rows, v_rows, n0, offs_m, offs_n, T, stride_kt, stride_vt, qk_scale,
          DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr, DIAGONAL: tl.constexpr):  # fmt: skip
    """One block of BN keys starting at n0, loaded through pointers (masked past T on the diagonal)."""
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
    return _update(acc, l_i, m_i, qk, v, offs_m, offs_n, n0, qk_scale, DIAGONAL)


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


@triton.jit
def _step_tma(acc, l_i, m_i, qa, qb, ka_desc, kb_desc, v_desc, k_row, k_col, v_row, v_col, n0, offs_m, offs_n,
              qk_scale, DA: tl.constexpr, DB: tl.constexpr, DIAGONAL: tl.constexpr):  # fmt: skip
    """One block of BN keys starting at n0, loaded by the tensor memory accelerator. Rows past T are the next
    head's or row's (or zeros past the tensor): real numbers, hidden by the causal mask."""
    ka = ka_desc.load([k_row + n0, k_col])
    v = v_desc.load([v_row + n0, v_col])
    qk = tl.dot(qa, tl.trans(ka))
    if DB > 0:
        kb = kb_desc.load([k_row + n0, k_col + DA])
        qk = tl.dot(qb, tl.trans(kb), qk)
    return _update(acc, l_i, m_i, qk, v, offs_m, offs_n, n0, qk_scale, DIAGONAL)


@triton.jit(do_not_specialize=["T", "q_rb", "k_rb", "k_rh", "v_rb"])
def _fwd_tma(qa_desc, qb_desc, ka_desc, kb_desc, v_desc, O, T, H, qk_scale, q_rb, q_ch, k_rb, k_rh, k_ch, v_rb, v_ch,
             stride_ob, stride_oh, stride_ot,
             DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """As _fwd, each input seen as a 2D matrix (_matrix): row b * rb + h * rh + t, columns from h * ch."""
    start_m = tl.cdiv(T, BM) - 1 - tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    offs_m = start_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    q_row = b * q_rb + start_m * BM
    qa = qa_desc.load([q_row, h * q_ch])
    qb = qa
    if DB > 0:
        qb = qb_desc.load([q_row, h * q_ch + DA])
    k_row, k_col = b * k_rb + h * k_rh, h * k_ch
    v_row, v_col = b * v_rb, h * v_ch
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, DV], dtype=tl.float32)
    for n0 in range(0, start_m * BM, BN):
        acc, l_i, m_i = _step_tma(acc, l_i, m_i, qa, qb, ka_desc, kb_desc, v_desc, k_row, k_col, v_row, v_col, n0,
                                  offs_m, offs_n, qk_scale, DA, DB, False)  # fmt: skip
    for n0 in range(start_m * BM, tl.minimum((start_m + 1) * BM, T), BN):
        acc, l_i, m_i = _step_tma(acc, l_i, m_i, qa, qb, ka_desc, kb_desc, v_desc, k_row, k_col, v_row, v_col, n0,
                                  offs_m, offs_n, qk_scale, DA, DB, True)  # fmt: skip
    out = acc / l_i[:, None]
    o_rows = (O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_ot)  # fmt: skip
    tl.store(o_rows + tl.arange(0, DV)[None, :], out.to(O.dtype.element_ty), mask=(offs_m < T)[:, None])


def _matrix(x):
    """x [B, H, T, D] (last dimension contiguous) as a 2D matrix a TMA descriptor can read: (rb, rh, ch, rows,
    columns, row stride), row b * rb + h * rh + t holding head h's values from column h * ch; or None. Two layouts
    fit: every head of a token in one row ([B, T, H, D] memory, also a view of wider rows) and one head's tokens in
    consecutive rows ([B, H, T, D] contiguous)."""
    B, H, T, D = x.shape
    sb, sh, st, _ = x.stride()
    if x.data_ptr() % 16 or (st * x.element_size()) % 16:
        return None
    if (B == 1 or sb == T * st) and (H == 1 or (sh >= D and st >= (H - 1) * sh + D)):
        return T, 0, sh, B * T, (H - 1) * sh + D, st
    if st == D and (H == 1 or sh == T * D) and (B == 1 or sb == H * T * D):
        return H * T, T, 0, B * H * T, D, st
    return None


def split_dims(d):
    """The two power-of-two widths (the second may be 0) a q/k head dimension is taken in, or None."""
    a = 1 << (d.bit_length() - 1)
    b = d - a
    return (a, b) if a >= 16 and (b == 0 or (b >= 16 and b & (b - 1) == 0)) else None


def mla_prefill(q, k, v, scale, block_m=128, block_n=64, num_warps=8, num_stages=3, tma=None):
    """softmax(scale * q k^T, causal) v for q, k [B, H, T, D] and v [B, H, T, DV] (any strides, the last dimension
    contiguous; D a power of two or the sum of two, each at least 16, DV a power of two). Returns [B, H, T, DV] in
    the inputs' dtype, laid out in memory as [B, T, H, DV] (as SDPA lays out the output of q in that layout).
    tma: load through TMA descriptors (Hopper on; default where every input's layout fits, see _matrix)."""
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
    grid = (cdiv(T, block_m), B * H)
    qk_scale = float(scale) * 1.4426950408889634  # base 2
    mats = [_matrix(x) for x in (q, k, v)] if tma is not False else None
    if tma is None:
        tma = all(m is not None for m in mats) and (not q.is_cuda or _capability(q.device) >= (9, 0))
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        if any(m is None for m in mats):
            raise ValueError("mla_prefill(tma=True) needs layouts a TMA descriptor can read (see _matrix)")
        (q_rb, _, q_ch, *qm), (k_rb, k_rh, k_ch, *km), (v_rb, _, v_ch, *vm) = mats

        def desc(x, m, rows, cols):
            return TensorDescriptor(x, [m[0], m[1]], [m[2], 1], [rows, cols])

        _fwd_tma[grid](
            desc(q, qm, block_m, dims[0]), desc(q, qm, block_m, max(dims[1], 16)), desc(k, km, block_n, dims[0]),
            desc(k, km, block_n, max(dims[1], 16)), desc(v, vm, block_n, DV), out, T, H, qk_scale,
            q_rb, q_ch, k_rb, k_rh, k_ch, v_rb, v_ch, *out.stride()[:3],
            DA=dims[0], DB=dims[1], DV=DV, BM=block_m, BN=block_n, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
        return out
    _fwd[grid](
        q, k, v, out, T, H, qk_scale, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        DA=dims[0], DB=dims[1], DV=DV, BM=block_m, BN=block_n, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
