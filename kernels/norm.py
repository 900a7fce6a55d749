"""Fused norms (Triton), forward and backward: the model's RMSNorm (optionally after a residual add), the KDA
output's gated per-head RMSNorm and the L2 norm of KDA's q and k, one launch each way instead of the seven to ten
elementwise passes (each a float32 copy of the activations) the PyTorch twins take.

PyTorch twins (the specification; same rounding points): `KimiLinearRMSNorm` and `KimiLinearGatedRMSNorm` in
modeling_kimi_linear.py, `l2norm` in kernels/__init__.py. The sums of squares are float32 (a different summation
order than torch's mean: the results agree to float32 rounding before the final cast). The backward works in float32
throughout (the twins' autograd rounds its intermediate products to the activations' dtype), and writes each
program's share of the weight gradient, summed afterwards.

Fixed launch configuration (nothing tuned at run time): tiles of about 4096 elements, several rows at a time for
short rows (the gated norm's 128-wide heads).
Row counts are not specialized on (do_not_specialize): Triton would compile another variant for a count not
divisible by 16, so the first prompt of such a length paid a compile.
"""

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2


@triton.jit(do_not_specialize=["M"])
def _fwd(X, R, W, G, Y, S, RSTD, M, D, eps,
         HAS_RES: tl.constexpr, GATED: tl.constexpr, L2: tl.constexpr, SAVE: tl.constexpr,
         BM: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + off, mask=mask, other=0.0)
    if HAS_RES:
        x = x + tl.load(R + off, mask=mask, other=0.0)  # rounded to x's dtype, as torch's add
        tl.store(S + off, x, mask=mask)
    xf = x.to(tl.float32)
    if L2:  # x / sqrt(sum(x^2) + eps), no weight
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) + eps)
    else:
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)
    n = xf * rstd[:, None]
    if L2:
        y = n
    elif GATED:  # (w * n * sigmoid(gate)) in float32, then cast
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        y = w * n * tl.sigmoid(tl.load(G + off, mask=mask, other=0.0).to(tl.float32))
    else:  # w * (n cast to x's dtype), in the promoted dtype
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        y = w * n.to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    if SAVE:
        tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit(do_not_specialize=["M", "P", "ITERS"])
def _bwd(X, W, G, DY, DS, RSTD, DX, DG, DW, M, D, P, ITERS,
         HAS_DS: tl.constexpr, GATED: tl.constexpr, L2: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """The P programs walk row blocks pid, pid + P, ... (ITERS each, past the end masked); each writes its float32
    share of the weight gradient to DW[pid]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BD)
    if not L2:
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BD], dtype=tl.float32)
    for it in range(ITERS):
        rows = (pid + it * P) * BM + tl.arange(0, BM)
        mask = (rows < M)[:, None] & (cols < D)[None, :]
        off = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(X + off, mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
        n = x.to(tl.float32) * rstd[:, None]
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        if L2:
            dn = dy
        elif GATED:
            sg = tl.sigmoid(tl.load(G + off, mask=mask, other=0.0).to(tl.float32))
            dn = dy * w * sg
            tl.store(DG + off, (dn * n * (1.0 - sg)).to(DG.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * n * sg, axis=0)
        else:
            dn = dy * w
            dw += tl.sum(dy * n.to(X.dtype.element_ty).to(tl.float32), axis=0)
        if L2:
            dx = rstd[:, None] * (dn - n * tl.sum(dn * n, axis=1)[:, None])
        else:
            dx = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
        if HAS_DS:
            dx += tl.load(DS + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * D + cols, dw, mask=cols < D)


def _multiprocessors(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _tile(D):
    BD = next_power_of_2(D)
    return BD, max(1, min(64, 4096 // BD))


class _RMSNorm(torch.autograd.Function):
    """y = norm(x [+ residual]) over the last dimension; with a residual also returns the sum (what the layer keeps).
    l2: the L2 norm x / sqrt(sum(x^2) + eps) (weight None)."""

    @staticmethod
    def forward(ctx, x, residual, weight, gate, eps, l2=False):
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D)
        M = x2.shape[0]
        gated = gate is not None
        out_dtype = x.dtype if gated or l2 else torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty(M, D, dtype=out_dtype, device=x.device)
        s = torch.empty_like(x2) if residual is not None else None
        train = any(ctx.needs_input_grad)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device) if train else None
        g2 = gate.reshape(-1, D) if gated else None
        BD, BM = _tile(D)
        _fwd[(cdiv(M, BM),)](
            x2, residual.reshape(-1, D) if residual is not None else x2, x2 if l2 else weight, g2 if gated else x2, y,
            s if s is not None else y, rstd if train else y, M, D, eps,
            HAS_RES=residual is not None, GATED=gated, L2=l2, SAVE=train, BM=BM, BD=BD, num_warps=4 if BD < 2048 else 8,
        )  # fmt: skip
        if train:
            ctx.save_for_backward(s if s is not None else x2, weight, g2, rstd)
            ctx.shape, ctx.residual, ctx.l2 = shape, residual is not None, l2
        y = y.view(shape)
        return (y, s.view(shape)) if s is not None else y

    @staticmethod
    def backward(ctx, dy, ds=None):
        x2, weight, g2, rstd = ctx.saved_tensors
        l2 = ctx.l2
        M, D = x2.shape
        BD, BM = _tile(D)
        programs = min(cdiv(M, BM), 4 * _multiprocessors(x2.device))
        dx = torch.empty_like(x2)
        dg = torch.empty_like(g2) if g2 is not None else None
        dw = torch.empty(programs, D, dtype=torch.float32, device=x2.device)
        dy = dy.reshape(-1, D).contiguous()
        ds = ds.reshape(-1, D).contiguous() if ds is not None else None
        _bwd[(programs,)](
            x2, x2 if l2 else weight, g2 if g2 is not None else x2, dy, ds if ds is not None else dy, rstd, dx,
            dg if dg is not None else dx, dw, M, D, programs, cdiv(cdiv(M, BM), programs),
            HAS_DS=ds is not None, GATED=g2 is not None, L2=l2, BM=BM, BD=BD, num_warps=4 if BD < 2048 else 8,
        )  # fmt: skip
        dx = dx.view(ctx.shape)
        dw = dw.sum(0).to(weight.dtype) if not l2 and ctx.needs_input_grad[2] else None
        dg = dg.view(ctx.shape) if dg is not None and ctx.needs_input_grad[3] else None
        return dx, dx if ctx.residual else None, dw, dg, None, None


def l2_norm(x, eps=1e-6):
    """x / sqrt(sum(x^2) + eps) over the last dimension, float32 inside, in x's dtype; one launch. Differentiable."""
    return _RMSNorm.apply(x.contiguous(), None, None, None, eps, True)


def serves(x, weight, *others):
    """Whether rms_norm takes these tensors: x contiguous in a float dtype on the weight's device, others (residual,
    gate) of x's shape and dtype or None, rows of at most 16384 values, no autocast (the twins then run, as autocast
    would have them)."""
    if torch.is_autocast_enabled(x.device.type) or weight.device != x.device or weight.shape != x.shape[-1:]:
        return False
    ok = x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.is_contiguous() and x.shape[-1] <= 16384
    return ok and all(t is None or (t.shape == x.shape and t.dtype == x.dtype and t.is_contiguous()) for t in others)


def rms_norm(x, weight, eps, residual=None, gate=None):
    """RMSNorm of x (of x + residual when given: returns (normed, sum)) over the last dimension, one launch; with
    gate, the gated norm (w * norm(x) * sigmoid(gate), float32 inside, in x's dtype). Differentiable."""
    return _RMSNorm.apply(x, residual, weight, gate, eps)
