"""KDA's short convolution (causal depthwise, width W, then SiLU) in Triton, forward and backward, for prefill and
training on [B, T, D] activations (channels contiguous, as the projections leave them).

PyTorch twin: `short_conv` in modeling_kimi_linear.py (the window concatenated in front, F.conv1d, F.silu, with a
transpose to [B, D, T] and back). Here each program reads its tokens' W taps straight from the projection output
(and from the cached window for the first W-1 tokens), sums in float32 and applies SiLU before the one rounding: no
concatenation, no layout copies. The backward recomputes the pre-activation (nothing but the input is saved) and
gives the input's, the weight's and the starting window's gradients in one launch; the weight's per-block partial
sums are added up afterwards (deterministic, no atomics).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _tap(X, ST, b, p, d, dm, T, D, sxb, sxt, HAS_STATE: tl.constexpr, W: tl.constexpr):
    """Input X(p) as float32 for positions p [BT] and channels d [BD]: x[b, p] for 0 <= p < T, the starting window's
    entry p + W - 1 for -(W-1) <= p < 0, else 0."""
    inside = (p >= 0) & (p < T)
    v = tl.load(X + b * sxb + p[:, None].to(tl.int64) * sxt + d[None, :], mask=inside[:, None] & dm[None, :], other=0.0)
    v = v.to(tl.float32)
    if HAS_STATE:
        early = (p < 0) & (p >= 1 - W)
        s = tl.load(ST + b * D * (W - 1) + d[None, :] * (W - 1) + (p + W - 1)[:, None],
                    mask=early[:, None] & dm[None, :], other=0.0)  # fmt: skip
        v += s.to(tl.float32)
    return v


@triton.jit
def _fwd_kernel(X, WT, ST, Y, T, D, sxb, sxt, syb, syt,
                HAS_STATE: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """Program (token block, channel block, row): y[t] = silu(sum_j w[j] X(t - (W-1) + j))."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    b = tl.program_id(2).to(tl.int64)
    dm = d < D
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        w = tl.load(WT + d * W + j, mask=dm, other=0.0).to(tl.float32)
        acc += _tap(X, ST, b, t - (W - 1) + j, d, dm, T, D, sxb, sxt, HAS_STATE, W) * w[None, :]
    y = acc * tl.sigmoid(acc)
    tl.store(Y + b * syb + t[:, None].to(tl.int64) * syt + d[None, :], y.to(Y.dtype.element_ty),
             mask=(t < T)[:, None] & dm[None, :])  # fmt: skip


@triton.jit
def _bwd_kernel(X, WT, ST, DY, DXE, DWP, T, D, sxb, sxt, sdb, sdt, nblocks,
                HAS_STATE: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """Program (block of extended positions, channel block, row): dX(p) for p = -(W-1) ... T-1 (the starting window,
    then the tokens) into DXE[b, p + W - 1]; the weight's partial sums over this block's outputs into DWP."""
    tb = tl.program_id(0)
    p = tb * BT - (W - 1) + tl.arange(0, BT)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    b = tl.program_id(2).to(tl.int64)
    dm = d < D
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    for jj in tl.static_range(W):
        # output t = p + (W-1) - jj reads X(p) through tap jj; its pre-activation recomputed from its W taps
        t = p + (W - 1) - jj
        pre = tl.zeros([BT, BD], dtype=tl.float32)
        for j in tl.static_range(W):
            w = tl.load(WT + d * W + j, mask=dm, other=0.0).to(tl.float32)
            pre += _tap(X, ST, b, p - jj + j, d, dm, T, D, sxb, sxt, HAS_STATE, W) * w[None, :]
        live = (t >= 0) & (t < T)
        dy = tl.load(DY + b * sdb + t[:, None].to(tl.int64) * sdt + d[None, :], mask=live[:, None] & dm[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        sig = tl.sigmoid(pre)
        dpre = dy * sig * (1.0 + pre * (1.0 - sig))
        w_jj = tl.load(WT + d * W + jj, mask=dm, other=0.0).to(tl.float32)
        dx += dpre * w_jj[None, :]
        if jj == W - 1:  # t == p: this block's own outputs give the weight's partial sums
            for j in tl.static_range(W):
                tap = _tap(X, ST, b, p - (W - 1) + j, d, dm, T, D, sxb, sxt, HAS_STATE, W)
                tl.store(DWP + ((b * nblocks + tb) * D + d) * W + j, tl.sum(dpre * tap, axis=0), mask=dm)
    pe = p + (W - 1)
    tl.store(DXE + b * (T + W - 1) * D + pe[:, None].to(tl.int64) * D + d[None, :], dx.to(DXE.dtype.element_ty),
             mask=(pe < T + W - 1)[:, None] & dm[None, :])  # fmt: skip


BT, BD = 32, 128


def _launch_checks(x, weight, state):
    B, T, D = x.shape
    W = weight.shape[-1]
    if weight.numel() != D * W or x.stride(-1) != 1:
        raise ValueError(f"short_conv needs x [B, T, D] with channels contiguous and weight [D, 1, W]; got "
                         f"{tuple(x.shape)} (strides {x.stride()}) and {tuple(weight.shape)}")  # fmt: skip
    if state is not None and tuple(state.shape) != (B, D, W - 1):
        raise ValueError(f"short_conv's window must be [B, D, W-1] = {(B, D, W - 1)}, got {tuple(state.shape)}")


class _ShortConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, state):
        B, T, D = x.shape
        W = weight.shape[-1]
        w = weight.reshape(D, W).contiguous()
        st = state.to(x.dtype).contiguous() if state is not None else None
        y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
        _fwd_kernel[(triton.cdiv(T, BT), triton.cdiv(D, BD), B)](
            x, w, st if st is not None else x, y, T, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            HAS_STATE=st is not None, W=W, BT=BT, BD=BD, num_warps=4,
        )  # fmt: skip
        ctx.save_for_backward(x, w, st)
        ctx.weight_shape, ctx.weight_dtype, ctx.state_dtype = weight.shape, weight.dtype, getattr(state, "dtype", None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, st = ctx.saved_tensors
        B, T, D = x.shape
        W = w.shape[-1]
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        nblocks = triton.cdiv(T + W - 1, BT)
        dxe = torch.empty(B, T + W - 1, D, dtype=x.dtype, device=x.device)
        dwp = torch.empty(B, nblocks, D, W, dtype=torch.float32, device=x.device)
        _bwd_kernel[(nblocks, triton.cdiv(D, BD), B)](
            x, w, st if st is not None else x, dy, dxe, dwp, T, D, x.stride(0), x.stride(1), dy.stride(0),
            dy.stride(1), nblocks, HAS_STATE=st is not None, W=W, BT=BT, BD=BD, num_warps=4,
        )  # fmt: skip
        dw = dwp.sum((0, 1)).to(ctx.weight_dtype).view(ctx.weight_shape) if ctx.needs_input_grad[1] else None
        dstate = None
        if st is not None and ctx.needs_input_grad[2]:
            dstate = dxe[:, : W - 1].transpose(1, 2).to(ctx.state_dtype)
        return dxe[:, W - 1 :], dw, dstate


def short_conv(x, weight, state=None):
    """silu(causal depthwise conv(x)) for x [B, T, D] (channels contiguous), weight [D, 1, W], state [B, D, W-1] the
    W-1 inputs before x (None: zeros). Returns y [B, T, D] in x's dtype; differentiable in x, weight and state. The
    new window (the last W-1 inputs) is the caller's to take."""
    _launch_checks(x, weight, state)
    return _ShortConv.apply(x, weight, state)
