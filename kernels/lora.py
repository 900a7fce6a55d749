"""A LoRA-adapted linear layer's training step in Triton: y = x W^T (+ bias) + s (x A^T) B^T with half-precision
activations and a frozen half-precision W, float32 adapters A [r, in] and B [out, r] (PEFT's default), forward and
backward.

PyTorch twin (the specification): PEFT's `lora.Linear.forward`, `result + lora_B(lora_A(x.float())) * scaling`, then
rounded to the result's dtype; `lora_linear_torch` below says the same in one line. PEFT makes a float32 copy of
every adapted layer's input (saved for the backward), runs the two small products in float32 and then scales, adds
and rounds the [tokens, out] result in three more float32 passes; its backward does as many. Here the products of
rank r read the half-precision tensors directly and keep float32 inside (three-pass TF32 products, float32
accumulation: float32 accuracy to about 2^-22; plain TF32 would round to 2^-11):
  forward:  h = x A^T (one launch, [tokens, r] float32, the only thing saved besides x), then y += s h B^T in place on
            the base product, rounded once;
  backward: dh = s dy B (one launch), dA = dh^T x and dB = s (h^T dy)^T together in one launch (each program one
            column block over every row: deterministic, nothing to add up after), dx = dy W (cuBLAS) += dh A in place.
The result equals PEFT's to float32 rounding before the final rounding to the activations' dtype (the input gradient
is rounded once where PEFT rounds its two parts separately). Lengths are not specialized on (do_not_specialize).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2

MAX_RANK = 128  # larger ranks keep PEFT's path (the [rows, rank] float32 tiles would crowd the registers)


@triton.jit(do_not_specialize=["M"])
def _down(X, V, Z, M, K, R, sxm, svr, svk, scale, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
          PREC: tl.constexpr):  # fmt: skip
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
        acc += tl.dot(x.to(tl.float32), v.to(tl.float32), input_precision=PREC)
    tl.store(Z + rows[:, None].to(tl.int64) * R + rr[None, :], acc * scale, mask=rm[:, None] & (rr < R)[None, :])


@triton.jit(do_not_specialize=["M"])
def _up(Y, Z, V, M, N, R, sym, svr, svn, scale, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
        PREC: tl.constexpr):  # fmt: skip
    """Y[M, N] = round(Y + scale * Z[M, R] @ V[R, N]) in place (V addressed by strides); program: BM x BN tile."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    rm, nm = rows < M, n < N
    rr = tl.arange(0, BR)
    z = tl.load(Z + rows[:, None].to(tl.int64) * R + rr[None, :], mask=rm[:, None] & (rr < R)[None, :], other=0.0)
    v = tl.load(V + rr[:, None] * svr + n[None, :] * svn, mask=(rr < R)[:, None] & nm[None, :], other=0.0)
    acc = tl.dot(z, v.to(tl.float32), input_precision=PREC)
    ptr = Y + rows[:, None].to(tl.int64) * sym + n[None, :]
    mask = rm[:, None] & nm[None, :]
    y = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (y + acc * scale).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _outer_block(Z, Y, P, nb, M, N, R, sym, spr, spn, scale, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                 PREC: tl.constexpr):  # fmt: skip
    """P[r, n] (at P + r spr + n spn) = scale * sum over all M rows of Z[m, r] Y[m, n] for columns block nb."""
    n = nb * BN + tl.arange(0, BN)
    nm = n < N
    rr = tl.arange(0, BR)
    acc = tl.zeros([BR, BN], dtype=tl.float32)
    for m0 in range(0, M, BM):
        rows = m0 + tl.arange(0, BM)
        rm = rows < M
        z = tl.load(Z + rows[:, None].to(tl.int64) * R + rr[None, :], mask=rm[:, None] & (rr < R)[None, :], other=0.0)
        y = tl.load(Y + rows[:, None].to(tl.int64) * sym + n[None, :], mask=rm[:, None] & nm[None, :], other=0.0)
        acc += tl.dot(tl.trans(z), y.to(tl.float32), input_precision=PREC)
    tl.store(P + rr[:, None] * spr + n[None, :] * spn, acc * scale, mask=(rr < R)[:, None] & nm[None, :])


@triton.jit(do_not_specialize=["M"])
def _outer2(Z1, Y1, P1, N1, sy1, spr1, spn1, scale1, blocks1, Z2, Y2, P2, N2, sy2, spr2, spn2, scale2, M, R,
            BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """The adapters' two weight gradients in one launch: programs 0 .. blocks1-1 sum Z1^T Y1 into P1, the rest
    Z2^T Y2 into P2 (each program one column block over every row: deterministic, nothing to add up after)."""
    pid = tl.program_id(0)
    if pid < blocks1:
        _outer_block(Z1, Y1, P1, pid, M, N1, R, sy1, spr1, spn1, scale1, BM, BN, BR, PREC)
    else:
        _outer_block(Z2, Y2, P2, pid - blocks1, M, N2, R, sy2, spr2, spn2, scale2, BM, BN, BR, PREC)


# Launch settings (tiles, warps, pipeline stages) and the products' precision, from a sweep on an H200
# (benchmarks/probe_lora_kernels.py, results/probe_lora.log; 4096 rows, rank 16). "tf32x3" splits each float32
# operand into two TF32 parts and sums three tensor-core products (float32 accumulation): float32 accuracy to about
# 2^-22, 2.3-4x faster than plain float32 FMA ("ieee") in x A^T (26.6 vs 95.2 us at 2304 inputs; 88 vs 365 at 9216),
# 1.5x in the in-place update (18.2 vs 26.1 us at 2304 outputs).
DOWN = {"BM": 32, "BK": 128, "num_warps": 4, "num_stages": 3}
UP = {"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 2}
OUTER = {"BM": 128, "BN": 32, "num_warps": 4, "num_stages": 3}
PRECISION = "tf32x3"


def _rank_tile(r):
    return max(16, next_power_of_2(r))


def _down_call(x, v, svr, svk, r, scale):
    M, K = x.shape
    z = torch.empty(M, r, dtype=torch.float32, device=x.device)
    _down[(cdiv(M, DOWN["BM"]),)](x, v, z, M, K, r, x.stride(0), svr, svk, float(scale), BR=_rank_tile(r),
                                  PREC=PRECISION, **DOWN)  # fmt: skip
    return z


def _up_call(y, z, v, svr, svn, scale):
    M, N = y.shape
    grid = (cdiv(M, UP["BM"]), cdiv(N, UP["BN"]))
    _up[grid](y, z, v, M, N, z.shape[1], y.stride(0), svr, svn, float(scale), BR=_rank_tile(z.shape[1]),
              PREC=PRECISION, **UP)  # fmt: skip


def _outer_call(z1, y1, p1, scale1, z2, y2, p2, scale2):
    """p1 = scale1 z1^T y1 and p2 = scale2 z2^T y2 (z [M, r] float32, y [M, N], p [r, N] float32 or any strides
    given as a [r, N] view) in one launch; either pair may be None."""
    pairs = [(z, y, p, s) for z, y, p, s in ((z1, y1, p1, scale1), (z2, y2, p2, scale2)) if z is not None]
    (z1, y1, p1, scale1), (z2, y2, p2, scale2) = (pairs * 2)[:2]
    blocks1 = cdiv(y1.shape[1], OUTER["BN"])
    blocks2 = cdiv(y2.shape[1], OUTER["BN"]) if len(pairs) == 2 else 0
    M, r = z1.shape
    _outer2[(blocks1 + blocks2,)](z1, y1, p1, y1.shape[1], y1.stride(0), p1.stride(0), p1.stride(1), float(scale1),
                                  blocks1, z2, y2, p2, y2.shape[1], y2.stride(0), p2.stride(0), p2.stride(1),
                                  float(scale2), M, r, BR=_rank_tile(r), PREC=PRECISION, **OUTER)  # fmt: skip


def _rows_of(t):
    """t as a [rows, last dimension] matrix with unit column stride (a view where it can be)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        shape = x.shape
        x2 = _rows_of(x)
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
        dy2 = _rows_of(dy)
        dh = _down_call(dy2, lora_b, lora_b.stride(1), lora_b.stride(0), lora_b.shape[1], s)  # s dy B
        need_a, need_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        da = torch.empty_like(lora_a) if need_a else None
        db = torch.empty_like(lora_b) if need_b else None
        if need_a or need_b:  # dA = dh^T x and dB^T = s h^T dy, written transposed into dB
            _outer_call(dh if need_a else None, x2, da, 1.0, h if need_b else None, dy2,
                        db.t() if need_b else None, s)  # fmt: skip
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ weight
            _up_call(dx, dh, lora_a, lora_a.stride(0), lora_a.stride(1), 1.0)  # += dh A
            dx = dx.view(ctx.shape)
        return dx, None, None, da, db, None


def serves(x, weight, bias, lora_a, lora_b):
    """Whether lora_linear takes these tensors: plain tensors, x half precision and not empty on a CUDA device,
    weight of x's dtype and device and frozen, bias None or frozen, float32 adapters of rank <= MAX_RANK, no autocast.
    Otherwise PEFT's own forward runs."""
    if not all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in (x, weight, lora_a, lora_b)):
        return False  # tensor subclasses (DTensor parameters of a sharded model) keep PEFT's path
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cuda"):
        return False
    if x.numel() == 0:  # nothing to launch over
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
