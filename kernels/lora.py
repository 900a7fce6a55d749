"""A LoRA-adapted linear layer's training step in Triton: y = x W^T (+ bias) + s (x A^T) B^T with half-precision
activations and a frozen half-precision W, float32 adapters A [r, in] and B [out, r] (PEFT's default), forward and
backward.

PyTorch twin (the specification): PEFT's `lora.Linear.forward`, `result + lora_B(lora_A(x.float())) * scaling`, then
rounded to the result's dtype; `lora_linear_torch` below says the same in one line. PEFT makes a float32 copy of
every adapted layer's input (saved for the backward), runs the two small products in float32 and then scales, adds
and rounds the [tokens, out] result in three more float32 passes; its backward does as many. Here the products of
rank r read the half-precision tensors directly and keep float32 inside (float32 FMA products, no TF32):
  forward:  h = x A^T (one launch, [tokens, r] float32, the only thing saved besides x), then y += s h B^T in place on
            the base product, rounded once;
  backward: dh = s dy B (one launch), dB = s h^T dy and dA = dh^T x (one launch each, split over tokens, partial sums
            added afterwards: deterministic), dx = dy W (cuBLAS) += dh A in place.
The result equals PEFT's to float32 summation order before the final rounding (the input gradient is rounded once
where PEFT rounds its two parts separately). Lengths are not specialized on (do_not_specialize).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_RANK = 128  # larger ranks keep PEFT's path (the [rows, rank] float32 tiles would crowd the registers)


@triton.jit(do_not_specialize=["M"])
def _down(X, V, Z, M, K, R, sxm, svr, svk, scale, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """Z[M, R] = scale * X[M, K] @ V[R, K]^T (V addressed by strides), float32; program: BM rows."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rm = rows < M
    rr = tl.arange(0, BR)
    acc = tl.zeros([BM, BR], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        km = k < K
        x = tl.load(X + rows[:, None].to(tl.int64) * sxm + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        v = tl.load(V + rr[None, :] * svr + k[:, None] * svk, mask=km[:, None] & (rr < R)[None, :], other=0.0)
        acc += tl.dot(x.to(tl.float32), v.to(tl.float32), input_precision="ieee")
    tl.store(Z + rows[:, None].to(tl.int64) * R + rr[None, :], acc * scale, mask=rm[:, None] & (rr < R)[None, :])


@triton.jit(do_not_specialize=["M"])
def _up(Y, Z, V, M, N, R, sym, svr, svn, scale, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """Y[M, N] = round(Y + scale * Z[M, R] @ V[R, N]) in place (V addressed by strides); program: BM x BN tile."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    rm, nm = rows < M, n < N
    rr = tl.arange(0, BR)
    z = tl.load(Z + rows[:, None].to(tl.int64) * R + rr[None, :], mask=rm[:, None] & (rr < R)[None, :], other=0.0)
    v = tl.load(V + rr[:, None] * svr + n[None, :] * svn, mask=(rr < R)[:, None] & nm[None, :], other=0.0)
    acc = tl.dot(z, v.to(tl.float32), input_precision="ieee")
    ptr = Y + rows[:, None].to(tl.int64) * sym + n[None, :]
    mask = rm[:, None] & nm[None, :]
    y = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (y + acc * scale).to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "per_split"])
def _outer(Z, Y, P, M, N, R, sym, per_split, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """P[s, R, N] = Z[rows of s, R]^T @ Y[rows of s, N], float32; program (column block, split s), the split's rows
    per_split (a multiple of BM) from s * per_split."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    s = tl.program_id(1)
    nm = n < N
    rr = tl.arange(0, BR)
    acc = tl.zeros([BR, BN], dtype=tl.float32)
    start = s * per_split
    for m0 in range(start, tl.minimum(start + per_split, M), BM):
        rows = m0 + tl.arange(0, BM)
        rm = rows < M
        z = tl.load(Z + rows[:, None].to(tl.int64) * R + rr[None, :], mask=rm[:, None] & (rr < R)[None, :], other=0.0)
        y = tl.load(Y + rows[:, None].to(tl.int64) * sym + n[None, :], mask=rm[:, None] & nm[None, :], other=0.0)
        acc += tl.dot(tl.trans(z), y.to(tl.float32), input_precision="ieee")
    tl.store(P + (s * R + rr[:, None]).to(tl.int64) * N + n[None, :], acc, mask=(rr < R)[:, None] & nm[None, :])


def _rank_tile(r):
    return max(16, triton.next_power_of_2(r))


def _down_call(x, v, svr, svk, r, scale):
    M, K = x.shape
    z = torch.empty(M, r, dtype=torch.float32, device=x.device)
    BM = 32
    _down[(triton.cdiv(M, BM),)](x, v, z, M, K, r, x.stride(0), svr, svk, float(scale),
                                 BM=BM, BK=64, BR=_rank_tile(r), num_warps=4)  # fmt: skip
    return z


def _up_call(y, z, v, svr, svn, scale):
    M, N = y.shape
    BM, BN = 64, 128
    _up[(triton.cdiv(M, BM), triton.cdiv(N, BN))](y, z, v, M, N, z.shape[1], y.stride(0), svr, svn, float(scale),
                                                  BM=BM, BN=BN, BR=_rank_tile(z.shape[1]), num_warps=4)  # fmt: skip


def _outer_call(z, y):
    """z^T @ y for z [M, r] float32 and y [M, N]: [r, N] float32, split over rows for parallelism."""
    M, r = z.shape
    N = y.shape[1]
    BM, BN = 64, 64
    blocks = triton.cdiv(N, BN)
    sms = torch.cuda.get_device_properties(y.device).multi_processor_count if y.is_cuda else 4
    splits = max(1, min(triton.cdiv(M, BM), triton.cdiv(4 * sms, blocks)))
    per_split = triton.cdiv(triton.cdiv(M, splits), BM) * BM
    splits = triton.cdiv(M, per_split)
    p = torch.empty(splits, r, N, dtype=torch.float32, device=y.device)
    _outer[(blocks, splits)](z, y, p, M, N, r, y.stride(0), per_split, BM=BM, BN=BN, BR=_rank_tile(r), num_warps=4)
    return p.sum(0)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = F.linear(x2, weight, bias)
        h = _down_call(x2, lora_a, lora_a.stride(0), lora_a.stride(1), lora_a.shape[0], 1.0)  # x A^T
        _up_call(y, h, lora_b, lora_b.stride(1), lora_b.stride(0), scaling)  # y += s h B^T
        ctx.save_for_backward(x2, weight, lora_a, lora_b, h)
        ctx.scaling, ctx.shape = scaling, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, h = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        dh = _down_call(dy2, lora_b, lora_b.stride(1), lora_b.stride(0), lora_b.shape[1], s)  # s dy B
        da = _outer_call(dh, x2) if ctx.needs_input_grad[3] else None  # dh^T x
        db = (_outer_call(h, dy2).t() * s).contiguous() if ctx.needs_input_grad[4] else None  # s dy^T h
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ weight
            _up_call(dx, dh, lora_a, lora_a.stride(0), lora_a.stride(1), 1.0)  # += dh A
            dx = dx.view(ctx.shape)
        return dx, None, None, da, db, None


def serves(x, weight, bias, lora_a, lora_b):
    """Whether lora_linear takes these tensors: x half precision on a CUDA device (Triton present), weight of x's
    dtype and device and frozen, bias None or frozen, float32 adapters of rank <= MAX_RANK, no autocast. Otherwise
    PEFT's own forward runs."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cuda"):
        return False
    if weight.dtype != x.dtype or weight.device != x.device or weight.requires_grad or weight.dim() != 2:
        return False
    if bias is not None and bias.requires_grad:
        return False
    r = lora_a.shape[0]
    return (
        lora_a.dtype == torch.float32
        and lora_b.dtype == torch.float32
        and lora_a.device == x.device
        and lora_b.device == x.device
        and lora_a.shape == (r, weight.shape[1])
        and lora_b.shape == (weight.shape[0], r)
        and r <= MAX_RANK
        and x.shape[-1] == weight.shape[1]
    )


def lora_linear(x, weight, bias, lora_a, lora_b, scaling):
    """x W^T (+ bias) + scaling * (x A^T) B^T in x's dtype, the adapter products in float32; differentiable in x,
    lora_a and lora_b (weight and bias frozen). See the module's docstring."""
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling))


def lora_linear_torch(x, weight, bias, lora_a, lora_b, scaling):
    """The twin: PEFT's arithmetic (float32 adapter products on a float32 copy of x, one rounding at the end)."""
    y = F.linear(x, weight, bias)
    return (y + (x.to(lora_a.dtype) @ lora_a.t()) @ lora_b.t() * scaling).to(y.dtype)
