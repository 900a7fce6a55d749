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


@triton.jit
def _rows_times(X, V, rows, rm, K, R, sxm, svr, svk, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                PREC: tl.constexpr):  # fmt: skip
    """X[rows] @ V[R, K]^T (V addressed by strides), [BM, BR] float32; rows where rm is False read as zeros."""
    rr = tl.arange(0, BR)
    acc = tl.zeros([BM, BR], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        km = k < K
        x = tl.load(X + rows[:, None].to(tl.int64) * sxm + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        v = tl.load(V + rr[None, :] * svr + k[:, None] * svk, mask=km[:, None] & (rr < R)[None, :], other=0.0)
        acc += tl.dot(x.to(tl.float32), v.to(tl.float32), input_precision=PREC)
    return acc


@triton.jit(do_not_specialize=["M"])
def _down(X, V, Z, M, K, R, sxm, svr, svk, scale, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
          PREC: tl.constexpr):  # fmt: skip
    """Z[M, R] = scale * X[M, K] @ V[R, K]^T (V addressed by strides), float32; program: BM rows."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rm = rows < M
    rr = tl.arange(0, BR)
    acc = _rows_times(X, V, rows, rm, K, R, sxm, svr, svk, BM, BK, BR, PREC)
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
    _add_scaled(Y, rows, n, rm, nm, sym, tl.dot(z, v.to(tl.float32), input_precision=PREC), scale)


@triton.jit
def _add_scaled(Y, rows, n, rm, nm, sym, acc, scale):
    """Y[rows, n] = round(Y[rows, n] + scale * acc) in place, float32 inside; masked by rm and nm."""
    ptr = Y + rows[:, None].to(tl.int64) * sym + n[None, :]
    mask = rm[:, None] & nm[None, :]
    y = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (y + acc * scale).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _outer_block(Z, Y, P, nb, start, end, N, R, sym, spr, spn, scale, BM: tl.constexpr, BN: tl.constexpr,
                 BR: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """P[r, n] (at P + r spr + n spn) = scale * sum over rows start .. end-1 of Z[m, r] Y[m, n] for columns block
    nb (zero for no rows)."""
    n = nb * BN + tl.arange(0, BN)
    nm = n < N
    rr = tl.arange(0, BR)
    acc = tl.zeros([BR, BN], dtype=tl.float32)
    for m0 in range(start, end, BM):
        rows = m0 + tl.arange(0, BM)
        rm = rows < end
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
        _outer_block(Z1, Y1, P1, pid, 0, M, N1, R, sy1, spr1, spn1, scale1, BM, BN, BR, PREC)
    else:
        _outer_block(Z2, Y2, P2, pid - blocks1, 0, M, N2, R, sy2, spr2, spn2, scale2, BM, BN, BR, PREC)


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


def _two_products(z1, y1, p1, scale1, z2, y2, p2, scale2):
    """The outer-product kernels' two (z, y, p, scale) products, where either may be given as None: both given
    ones (the only one twice), and the column blocks of each (0 for a repeat, which launches nothing)."""
    pairs = [(z, y, p, s) for z, y, p, s in ((z1, y1, p1, scale1), (z2, y2, p2, scale2)) if z is not None]
    first, second = (pairs * 2)[:2]
    blocks = [cdiv(first[1].shape[1], OUTER["BN"]), cdiv(second[1].shape[1], OUTER["BN"]) if len(pairs) == 2 else 0]
    return first, second, blocks


def _outer_call(z1, y1, p1, scale1, z2, y2, p2, scale2):
    """p1 = scale1 z1^T y1 and p2 = scale2 z2^T y2 (z [M, r] float32, y [M, N], p [r, N] float32 or any strides
    given as a [r, N] view) in one launch; either pair may be None."""
    first, second, (blocks1, blocks2) = _two_products(z1, y1, p1, scale1, z2, y2, p2, scale2)
    (z1, y1, p1, scale1), (z2, y2, p2, scale2) = first, second
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


def _plain_half_rows(x, *others):
    """Plain tensors (tensor subclasses, such as the DTensor parameters of a sharded model, keep PEFT's path), x half
    precision on a CUDA device, no autocast: what both adapter kernels need first."""
    if not all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in (x, *others)):
        return False
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled("cuda")


def serves(x, weight, bias, lora_a, lora_b):
    """Whether lora_linear takes these tensors: plain tensors, x half precision and not empty on a CUDA device,
    weight of x's dtype and device and frozen, bias None or frozen, float32 adapters of rank <= MAX_RANK, no autocast.
    Otherwise PEFT's own forward runs."""
    if not _plain_half_rows(x, weight, lora_a, lora_b):
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


# LoRA on every routed expert of an MoE layer: the (token, expert) rows sorted by expert, expert e's rows
# [ENDS[e-1], ENDS[e]) (ENDS: each group's end, the offsets torch._grouped_mm takes), adapters stacked per expert,
# A [E, r, in] and B [E, out, r] float32. Same arithmetic as above, each row with its own expert's adapter; the group
# bounds are read on the device only (no host sync: a training step with them can be captured in a CUDA graph).
# A row tile may straddle groups: its programs visit each expert present in the tile in turn (EXP: every row's
# expert), keeping each row's own product.


@triton.jit
def _next_expert(EXP, ENDS, e, e_last, M):
    """The expert of the first row after expert e's rows, or e_last + 1 past the tile's last expert (at least e + 1:
    rows out of order end the visit instead of looping)."""
    nxt = tl.load(ENDS + e)
    following = tl.where(nxt < M, tl.load(EXP + tl.minimum(nxt, M - 1)), e_last + 1).to(tl.int32)
    return tl.maximum(following, e + 1)


@triton.jit(do_not_specialize=["M"])
def _gdown(X, V, Z, EXP, ENDS, M, K, R, sxm, sve, svr, svk, scale, BM: tl.constexpr, BK: tl.constexpr,
           BR: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Z[m, :R] = scale * X[m] @ V[e(m)]^T (V[e] an [R, K] matrix addressed by strides), float32; program: BM rows."""
    row0 = tl.program_id(0) * BM
    rows = row0 + tl.arange(0, BM)
    rm = rows < M
    own = tl.load(EXP + rows, mask=rm, other=-1).to(tl.int32)
    rr = tl.arange(0, BR)
    e = tl.load(EXP + row0).to(tl.int32)
    e_last = tl.load(EXP + tl.minimum(row0 + BM, M) - 1).to(tl.int32)
    out = tl.zeros([BM, BR], dtype=tl.float32)
    while e <= e_last:
        mine = rm & (own == e)
        acc = _rows_times(X, V + e.to(tl.int64) * sve, rows, mine, K, R, sxm, svr, svk, BM, BK, BR, PREC)
        out = tl.where(mine[:, None], acc, out)
        e = _next_expert(EXP, ENDS, e, e_last, M)
    tl.store(Z + rows[:, None].to(tl.int64) * R + rr[None, :], out * scale, mask=rm[:, None] & (rr < R)[None, :])


@triton.jit(do_not_specialize=["M"])
def _gup(Y, Z, V, EXP, ENDS, M, N, R, sym, sve, svr, svn, scale, BM: tl.constexpr, BN: tl.constexpr,
         BR: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Y[m] = round(Y[m] + scale * Z[m, :R] @ V[e(m)]) in place (V[e] an [R, N] matrix addressed by strides);
    program: BM x BN tile."""
    row0 = tl.program_id(0) * BM
    rows = row0 + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    rm, nm = rows < M, n < N
    own = tl.load(EXP + rows, mask=rm, other=-1).to(tl.int32)
    rr = tl.arange(0, BR)
    z = tl.load(Z + rows[:, None].to(tl.int64) * R + rr[None, :], mask=rm[:, None] & (rr < R)[None, :], other=0.0)
    e = tl.load(EXP + row0).to(tl.int32)
    e_last = tl.load(EXP + tl.minimum(row0 + BM, M) - 1).to(tl.int32)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    while e <= e_last:
        v = tl.load(V + e.to(tl.int64) * sve + rr[:, None] * svr + n[None, :] * svn,
                    mask=(rr < R)[:, None] & nm[None, :], other=0.0)  # fmt: skip
        part = tl.dot(tl.where((own == e)[:, None], z, 0.0), v.to(tl.float32), input_precision=PREC)
        acc += part
        e = _next_expert(EXP, ENDS, e, e_last, M)
    _add_scaled(Y, rows, n, rm, nm, sym, acc, scale)


@triton.jit
def _gouter_block(Z, Y, P, ENDS, e, nb, N, R, sym, spe, spr, spn, scale, BM: tl.constexpr, BN: tl.constexpr,
                  BR: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """P[e][r, n] (at P + e spe + r spr + n spn) = scale * sum over expert e's rows of Z[m, r] Y[m, n], column block
    nb; zero for an expert without rows."""
    start = tl.load(ENDS + e - 1, mask=e > 0, other=0)
    end = tl.load(ENDS + e)
    _outer_block(Z, Y, P + e.to(tl.int64) * spe, nb, start, end, N, R, sym, spr, spn, scale, BM, BN, BR, PREC)


@triton.jit
def _gouter2(Z1, Y1, P1, N1, sy1, spe1, spr1, spn1, scale1, blocks1, Z2, Y2, P2, N2, sy2, spe2, spr2, spn2, scale2,
             ENDS, R, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Both adapters' weight gradients of every expert in one launch: program (e, b) sums expert e's rows of
    Z1^T Y1 into P1[e] for b < blocks1, else of Z2^T Y2 into P2[e] (deterministic: no atomics)."""
    e = tl.program_id(0)
    b = tl.program_id(1)
    if b < blocks1:
        _gouter_block(Z1, Y1, P1, ENDS, e, b, N1, R, sy1, spe1, spr1, spn1, scale1, BM, BN, BR, PREC)
    else:
        _gouter_block(Z2, Y2, P2, ENDS, e, b - blocks1, N2, R, sy2, spe2, spr2, spn2, scale2, BM, BN, BR, PREC)


# the grouped kernels' tiles: those of the dense kernels (a tile mostly holds one expert's rows at training sizes)
GDOWN, GUP, GOUTER = DOWN, UP, OUTER


def _gdown_call(x, v, sve, svr, svk, r, scale, exp, ends):
    M, K = x.shape
    z = torch.empty(M, r, dtype=torch.float32, device=x.device)
    _gdown[(cdiv(M, GDOWN["BM"]),)](x, v, z, exp, ends, M, K, r, x.stride(0), sve, svr, svk, float(scale),
                                    BR=_rank_tile(r), PREC=PRECISION, **GDOWN)  # fmt: skip
    return z


def _gup_call(y, z, v, sve, svr, svn, scale, exp, ends):
    M, N = y.shape
    grid = (cdiv(M, GUP["BM"]), cdiv(N, GUP["BN"]))
    _gup[grid](y, z, v, exp, ends, M, N, z.shape[1], y.stride(0), sve, svr, svn, float(scale),
               BR=_rank_tile(z.shape[1]), PREC=PRECISION, **GUP)  # fmt: skip


def _gouter_call(ends, z1, y1, p1, scale1, z2, y2, p2, scale2):
    """p1[e] = scale1 z1_e^T y1_e and p2[e] = scale2 z2_e^T y2_e over each expert e's rows (z [M, r] float32, y [M, N],
    p [E, r, N] float32 or any strides given as such a view) in one launch; either triple may be None."""
    first, second, (blocks1, blocks2) = _two_products(z1, y1, p1, scale1, z2, y2, p2, scale2)
    (z1, y1, p1, scale1), (z2, y2, p2, scale2) = first, second
    grid = (ends.shape[0], blocks1 + blocks2)
    _gouter2[grid](z1, y1, p1, y1.shape[1], y1.stride(0), *p1.stride(), float(scale1), blocks1,
                   z2, y2, p2, y2.shape[1], y2.stride(0), *p2.stride(), float(scale2), ends, z1.shape[1],
                   BR=_rank_tile(z1.shape[1]), PREC=PRECISION, **GOUTER)  # fmt: skip


class _GroupedLoraAdd(torch.autograd.Function):
    """y[:, c_j : c_j + N_j] += s (x A_j[e]^T) B_j[e]^T in place for each adapter pair j (its columns follow the last
    pair's), each row's expert e; differentiable in y (the identity), x and every A_j, B_j."""

    @staticmethod
    def forward(ctx, y, x, exp, ends, scaling, *adapters):
        ctx.mark_dirty(y)
        zs, col = [], 0
        for a, b in zip(adapters[::2], adapters[1::2]):
            z = _gdown_call(x, a, a.stride(0), a.stride(1), a.stride(2), a.shape[1], 1.0, exp, ends)  # x A^T
            n = b.shape[1]
            _gup_call(y[:, col : col + n], z, b, b.stride(0), b.stride(2), b.stride(1), scaling, exp, ends)
            zs.append(z)
            col += n
        ctx.save_for_backward(x, exp, ends, *adapters, *zs)
        ctx.scaling, ctx.pairs = scaling, len(zs)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, exp, ends, *rest = ctx.saved_tensors
        dy = dy if dy.stride(1) == 1 else dy.contiguous()
        adapters, zs = rest[: 2 * ctx.pairs], rest[2 * ctx.pairs :]
        s = ctx.scaling
        grads = []
        dx = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
        col = 0
        for j, (a, b, z) in enumerate(zip(adapters[::2], adapters[1::2], zs)):
            n = b.shape[1]
            dyj = dy[:, col : col + n]
            col += n
            dz = _gdown_call(dyj, b, b.stride(0), b.stride(2), b.stride(1), b.shape[2], s, exp, ends)  # s dy B
            need_a, need_b = ctx.needs_input_grad[5 + 2 * j], ctx.needs_input_grad[6 + 2 * j]
            da = torch.empty_like(a) if need_a else None
            db = torch.empty_like(b) if need_b else None
            if need_a or need_b:  # dA[e] = dz_e^T x_e and dB[e]^T = s z_e^T dy_e, written transposed into dB
                _gouter_call(ends, dz if need_a else None, x, da, 1.0, z if need_b else None, dyj,
                             db.transpose(1, 2) if need_b else None, s)  # fmt: skip
            if dx is not None:
                _gup_call(dx, dz, a, a.stride(0), a.stride(1), a.stride(2), 1.0, exp, ends)  # += dz A
            grads += [da, db]
        return dy, dx, None, None, None, *grads


def grouped_serves(y, x, adapters, expert=None, ends=None):
    """Whether grouped_lora_add_ takes these tensors: x and y half precision on one CUDA device with rows of unit
    stride, float32 adapters [E, r, in] and [E, out, r] of rank <= MAX_RANK whose outputs fit y's columns, no
    autocast; expert [M] and ends [E] integer tensors on that device where given (their order is the caller's
    promise: rows sorted by expert). (The caller checks that Triton serves.)"""
    for t, n in ((expert, x.shape[0]), (ends, adapters[0].shape[0] if adapters else 0)):
        if t is not None and (t.dim() != 1 or t.shape[0] != n or t.is_floating_point() or t.device != x.device):
            return False
    if not _plain_half_rows(x, y, *adapters):
        return False
    if y.dtype != x.dtype or y.device != x.device or y.dim() != 2 or x.dim() != 2 or y.shape[0] != x.shape[0]:
        return False
    if x.shape[0] == 0:
        return False
    if x.stride(1) != 1 or y.stride(1) != 1 or any(t.device != x.device or t.dtype != torch.float32 for t in adapters):
        return False
    width, inputs = 0, x.shape[1]
    for a, b in zip(adapters[::2], adapters[1::2]):
        E, r = a.shape[:2]
        if a.shape != (E, r, inputs) or b.dim() != 3 or b.shape[0] != E or b.shape[2] != r or r > MAX_RANK:
            return False
        if E != adapters[0].shape[0]:
            return False
        width += b.shape[1]
    return width <= y.shape[1]


def grouped_lora_add_(y, x, adapters, scaling, expert, ends):
    """y[:, c_j : c_j + N_j] += scaling * (x A_j[e]^T) B_j[e]^T in place, rounded once, for adapters = [A_0, B_0,
    A_1, B_1, ...] (A_j [E, r, in], B_j [E, N_j, r] float32; their columns one after another from 0), each row m of
    x [M, in] and y [M, out] with its expert e = expert[m] (sorted; ends [E] int32: each expert's end row).
    Differentiable in y, x and the adapters; returns y. The adapter products in float32 as PEFT runs them."""
    return _GroupedLoraAdd.apply(y, x, expert, ends, float(scaling), *adapters)


def grouped_lora_add_torch(y, x, adapters, scaling, expert, ends):
    """The twin: each row's adapter products in float32 (in the adapters' dtype) on a copy of x, one rounding."""
    idx = expert.long()
    deltas = [((x.to(a.dtype).unsqueeze(1) @ a[idx].transpose(1, 2)) @ b[idx].transpose(1, 2)).squeeze(1)
              for a, b in zip(adapters[::2], adapters[1::2])]  # fmt: skip
    delta = torch.cat(deltas, dim=-1)
    n = delta.shape[1]
    return torch.cat([(y[:, :n] + delta * scaling).to(y.dtype), y[:, n:]], dim=-1)
