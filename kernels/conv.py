"""KDA's short convolution (causal depthwise, width W, then SiLU) in Triton, forward and backward, for prefill and
training on [B, T, D] activations (channels contiguous, as the projections leave them).

PyTorch twin: `short_conv` in modeling_kimi_linear.py (the window concatenated in front, F.conv1d, F.silu, with a
transpose to [B, D, T] and back). Here each program reads its tokens' W taps straight from the projection output
(and from the cached window for the first W-1 tokens), sums in float32 and applies SiLU before the one rounding: no
concatenation, no layout copies. The backward (nothing but the input is saved) takes two launches: the
pre-activation's gradient once per output (recomputed from its taps; float32) with the weight's per-block partial
sums, then each input's gradient (and the starting window's) from the W outputs it feeds; the partial sums are added
up afterwards (deterministic, no atomics).
Lengths are not specialized on (do_not_specialize): a prompt of a new length compiles nothing.
"""

import torch
import triton
import triton.language as tl

from .host import cdiv


@triton.jit
def _tap(X, ST, b, p, start, wrow, d, dm, T, D, sxb, sxt, HAS_STATE: tl.constexpr, W: tl.constexpr):
    """Input X(p) as float32 for positions p [BT] and channels d [BD], as seen by outputs whose sequence starts at
    start [BT] and whose starting window is row wrow [BT] of ST: x[b, p] for start <= p < T, the window's entry
    p - start + W - 1 for start - (W-1) <= p < start, else 0."""
    inside = (p >= start) & (p < T)
    v = tl.load(X + b * sxb + p[:, None].to(tl.int64) * sxt + d[None, :], mask=inside[:, None] & dm[None, :], other=0.0)
    v = v.to(tl.float32)
    if HAS_STATE:
        early = (p < start) & (p >= start - (W - 1))
        s = tl.load(ST + wrow[:, None] * (D * (W - 1)) + d[None, :] * (W - 1) + (p - start + W - 1)[:, None],
                    mask=early[:, None] & dm[None, :], other=0.0)  # fmt: skip
        v += s.to(tl.float32)
    return v


@triton.jit
def _pre_activation(X, WT, ST, b, t, start, wrow, d, dm, T, D, sxb, sxt, HAS_STATE: tl.constexpr, W: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """sum_j w[j] X(t - (W-1) + j) for outputs t [BT] and channels d [BD], float32: the conv before its SiLU."""
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        w = tl.load(WT + d * W + j, mask=dm, other=0.0).to(tl.float32)
        acc += _tap(X, ST, b, t - (W - 1) + j, start, wrow, d, dm, T, D, sxb, sxt, HAS_STATE, W) * w[None, :]
    return acc


@triton.jit
def _sequence(STARTS, SEQS, b, t, tm, VARLEN: tl.constexpr, BT: tl.constexpr):
    """Where the sequences of outputs t [BT] start and which window row they use: from STARTS / SEQS (packed
    sequences in one row), else row b's sequence, starting at 0."""
    if VARLEN:
        start = tl.load(STARTS + t, mask=tm, other=0)
        wrow = tl.load(SEQS + t, mask=tm, other=0).to(tl.int64)
    else:
        start = tl.zeros([BT], dtype=tl.int32)
        wrow = tl.zeros([BT], dtype=tl.int64) + b
    return start, wrow


@triton.jit(do_not_specialize=["T"])
def _fwd_kernel(X, WT, ST, STARTS, SEQS, Y, T, D, sxb, sxt, syb, syt,
                HAS_STATE: tl.constexpr, VARLEN: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
                BD: tl.constexpr):  # fmt: skip
    """Program (token block, channel block, row): y[t] = silu(sum_j w[j] X(t - (W-1) + j))."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    b = tl.program_id(2).to(tl.int64)
    dm = d < D
    start, wrow = _sequence(STARTS, SEQS, b, t, t < T, VARLEN, BT)
    acc = _pre_activation(X, WT, ST, b, t, start, wrow, d, dm, T, D, sxb, sxt, HAS_STATE, W, BT, BD)
    y = acc * tl.sigmoid(acc)
    tl.store(Y + b * syb + t[:, None].to(tl.int64) * syt + d[None, :], y.to(Y.dtype.element_ty),
             mask=(t < T)[:, None] & dm[None, :])  # fmt: skip


@triton.jit(do_not_specialize=["T", "nblocks"])
def _dpre_kernel(X, WT, ST, STARTS, SEQS, DY, DPRE, DWP, T, D, sxb, sxt, sdb, sdt, nblocks,
                 HAS_STATE: tl.constexpr, VARLEN: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
                 BD: tl.constexpr):  # fmt: skip
    """Backward, first pass. Program (token block, channel block, row): the pre-activation's gradient
    dpre[t] = dy[t] silu'(pre[t]) (pre recomputed from the W taps) into DPRE (float32), and the weight's partial sums
    over these outputs, sum_t dpre[t] X(t - (W-1) + j), into DWP."""
    tb = tl.program_id(0)
    t = tb * BT + tl.arange(0, BT)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    b = tl.program_id(2).to(tl.int64)
    dm = d < D
    tm = t < T
    start, wrow = _sequence(STARTS, SEQS, b, t, tm, VARLEN, BT)
    pre = _pre_activation(X, WT, ST, b, t, start, wrow, d, dm, T, D, sxb, sxt, HAS_STATE, W, BT, BD)
    dy = tl.load(DY + b * sdb + t[:, None].to(tl.int64) * sdt + d[None, :], mask=tm[:, None] & dm[None, :],
                 other=0.0).to(tl.float32)  # fmt: skip
    sig = tl.sigmoid(pre)
    dpre = dy * sig * (1.0 + pre * (1.0 - sig))
    tl.store(DPRE + b * T * D + t[:, None].to(tl.int64) * D + d[None, :], dpre, mask=tm[:, None] & dm[None, :])
    for j in tl.static_range(W):
        tap = _tap(X, ST, b, t - (W - 1) + j, start, wrow, d, dm, T, D, sxb, sxt, HAS_STATE, W)
        tl.store(DWP + ((b * nblocks + tb) * D + d) * W + j, tl.sum(dpre * tap, axis=0), mask=dm)


@triton.jit(do_not_specialize=["T"])
def _dx_kernel(DPRE, WT, STARTS, DXE, T, D, VARLEN: tl.constexpr, OFF: tl.constexpr, W: tl.constexpr,
               BT: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """Backward, second pass. Program (position block, channel block, row): dX(p) = sum_jj w[jj] dpre[p + (W-1) - jj]
    into DXE[b, p + OFF]. Dense rows (OFF = W-1): p = -(W-1) ... T-1, the starting window's positions first (its
    gradient). Packed sequences (OFF = 0): p = 0 ... T-1, each output feeding only its own sequence's inputs (their
    windows get no gradient)."""
    p = tl.program_id(0) * BT - OFF + tl.arange(0, BT)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    b = tl.program_id(2).to(tl.int64)
    dm = d < D
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    for jj in tl.static_range(W):
        t = p + (W - 1) - jj  # the output that reads X(p) through tap jj
        live = (t >= 0) & (t < T)
        if VARLEN:
            live = live & (p >= tl.load(STARTS + t, mask=live, other=0))
        g = tl.load(DPRE + b * T * D + t[:, None].to(tl.int64) * D + d[None, :], mask=live[:, None] & dm[None, :],
                    other=0.0)  # fmt: skip
        dx += g * tl.load(WT + d * W + jj, mask=dm, other=0.0).to(tl.float32)[None, :]
    pe = p + OFF
    tl.store(DXE + b * (T + OFF) * D + pe[:, None].to(tl.int64) * D + d[None, :], dx.to(DXE.dtype.element_ty),
             mask=(pe < T + OFF)[:, None] & dm[None, :])  # fmt: skip


BT, BD = 32, 128


class _ShortConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, state, starts, seqs):
        B, T, D = x.shape
        W = weight.shape[-1]
        w = weight.reshape(D, W).contiguous()
        st = state.to(x.dtype).contiguous() if state is not None else None
        y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
        varlen = starts is not None
        _fwd_kernel[(cdiv(T, BT), cdiv(D, BD), B)](
            x, w, st if st is not None else x, starts if varlen else x, seqs if varlen else x, y, T, D,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            HAS_STATE=st is not None, VARLEN=varlen, W=W, BT=BT, BD=BD, num_warps=4,
        )  # fmt: skip
        ctx.save_for_backward(x, w, st, starts, seqs)
        ctx.weight_shape, ctx.weight_dtype, ctx.state_dtype = weight.shape, weight.dtype, getattr(state, "dtype", None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, st, starts, seqs = ctx.saved_tensors
        B, T, D = x.shape
        W = w.shape[-1]
        varlen = starts is not None
        off = 0 if varlen else W - 1
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        nblocks = cdiv(T, BT)
        dpre = torch.empty(B, T, D, dtype=torch.float32, device=x.device)
        dwp = torch.empty(B, nblocks, D, W, dtype=torch.float32, device=x.device)
        _dpre_kernel[(nblocks, cdiv(D, BD), B)](
            x, w, st if st is not None else x, starts if varlen else x, seqs if varlen else x, dy, dpre, dwp, T, D,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), nblocks,
            HAS_STATE=st is not None, VARLEN=varlen, W=W, BT=BT, BD=BD, num_warps=4,
        )  # fmt: skip
        dxe = torch.empty(B, T + off, D, dtype=x.dtype, device=x.device)
        _dx_kernel[(cdiv(T + off, BT), cdiv(D, BD), B)](
            dpre, w, starts if varlen else x, dxe, T, D, VARLEN=varlen, OFF=off, W=W, BT=BT, BD=BD, num_warps=4,
        )  # fmt: skip
        dw = dwp.sum((0, 1)).to(ctx.weight_dtype).view(ctx.weight_shape) if ctx.needs_input_grad[1] else None
        dstate = None
        if st is not None and ctx.needs_input_grad[2]:
            dstate = dxe[:, : W - 1].transpose(1, 2).to(ctx.state_dtype)
        return dxe[:, off:], dw, dstate, None, None


def _check(x, weight, D):
    W = weight.shape[-1]
    if weight.numel() != D * W or x.stride(-1) != 1:
        raise ValueError(f"short_conv needs activations with channels contiguous and weight [D, 1, W] (D = {D}); got "
                         f"{tuple(x.shape)} (strides {x.stride()}) and {tuple(weight.shape)}")  # fmt: skip
    return W


def short_conv(x, weight, state=None):
    """silu(causal depthwise conv(x)) for x [B, T, D] (channels contiguous), weight [D, 1, W], state [B, D, W-1] the
    W-1 inputs before x (None: zeros). Returns y [B, T, D] in x's dtype; differentiable in x, weight and state. The
    new window (the last W-1 inputs) is the caller's to take."""
    B, T, D = x.shape
    W = _check(x, weight, D)
    if state is not None and tuple(state.shape) != (B, D, W - 1):
        raise ValueError(f"short_conv's window must be [B, D, W-1] = {(B, D, W - 1)}, got {tuple(state.shape)}")
    return _ShortConv.apply(x, weight, state, None, None)


def short_conv_varlen(x, weight, windows, cu_seqlens, seq_of_token):
    """short_conv over packed sequences: x [N, D] the tokens of S sequences one after another (cu_seqlens [S+1]),
    seq_of_token [N] each token's sequence, windows [S, D, W-1] each sequence's starting window. No tap reads
    another sequence. Returns y [N, D]; differentiable in x and weight (not in the windows: starting windows of
    packed training rows are zeros)."""
    N, D = x.shape
    W = _check(x, weight, D)
    if windows.dim() != 3 or tuple(windows.shape[1:]) != (D, W - 1) or windows.shape[0] != len(cu_seqlens) - 1:
        want = (len(cu_seqlens) - 1, D, W - 1)
        raise ValueError(f"short_conv_varlen's windows must be [sequences, D, W-1] = {want}, got {windows.shape}")
    if windows.requires_grad and torch.is_grad_enabled():
        raise ValueError("short_conv_varlen gives no gradient for the starting windows; pass them detached")
    seqs = seq_of_token.to(torch.int32).contiguous()
    starts = cu_seqlens[:-1].to(torch.int32)[seq_of_token].contiguous()
    return _ShortConv.apply(x[None], weight, windows.contiguous(), starts, seqs)[0]
