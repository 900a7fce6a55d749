"""The projections of an inference prefill, [x W_i^T for each W_i] for up to three weights of one input, in one Triton
launch compiled once for every number of rows.

PyTorch twin: `[F.linear(x, w) for w in weights]`, which runs cuBLAS. cuBLAS chooses its kernel per exact problem
shape and keeps the choice for the process. At a number of rows it has not run, that choice costs 0.1-0.3 ms of host
time at most shapes and 2-4 ms at some: nearly every time at KDA's f_a, g_a and b_proj (2304 -> 128, 128, 32), often
at f_b and g_b (128 -> 4096) and MLA's kv_a (2304 -> 576) (benchmarks/probe_first_shapes.py --ladder,
probe_linear.py): 10-20 ms at every prompt of a new length, paid in the first layers while the GPU waits. This
product has nothing to choose: the number of rows is not specialized on (do_not_specialize) and the tile sizes are
fixed, so a new length compiles and chooses nothing. At these shapes a call takes 1.2-3.2x cuBLAS's time: 40-70 us
at 2k-8k rows, where its launch's host time sets the pace, 0.2-1 ms at 128k; its one launch for KDA's three
projections of the layer input reads the input once where cuBLAS reads it three times. On the wide projections cuBLAS
is 1.2-2.0x faster on the GPU, so the model sends them here whole only for prompts of up to CUBLAS_ROWS tokens, where
the host sets the pace and cuBLAS's choices cost 12-13 ms per new length (benchmarks/probe_short_prefill.py). Longer
prompts run them through cuBLAS in blocks of exactly CUBLAS_ROWS rows (`cublas_rows`), one shape per projection for
cuBLAS to choose for, and the rows left over here.

The column blocks of the weights are numbered one after another (W1's, then W2's, ...); each program computes one
BM x BN tile of one output, walking K in steps of BK with float32 accumulation, the programs of one row block next to
each other so that they read x from L2. Calls with many output columns (KDA's q/k/v in one call, 12288; the dense
MLP's gate/up, 18432) take the WIDE tiles instead: 256 rows by 128, in groups of GROUP_M = 8 row blocks, column by
column, so that a weight tile is read once per 2048 rows rather than once per 128. Rows past M are read as row
`rows % M` (real numbers, never stored) so that the loads need no mask; K not a multiple of BK is masked.
Half-precision inputs multiply in their dtype, float32 in full float32 (ieee).
"""

import functools

import torch
import triton
import triton.language as tl

from .host import cdiv

MAX_WEIGHTS = 3
BM, BN, BK, WARPS, STAGES = 128, 128, 64, 4, 4  # benchmarks/probe_linear.py's sweep at the low-rank shapes
GROUP_M = 1  # row blocks per group in the programs' order (tiles' optional sixth entry; 1: one row block at a time)
FIXED = (BM, BN, BK, WARPS, STAGES, GROUP_M)  # (BM, BN, BK, warps, stages, GROUP_M) of every call but the widest
# (BM, BN, BK, warps, stages, GROUP_M) for calls of at least WIDE_COLUMNS output columns (tiles_for). On an H200,
# 2001-32768 rows (benchmarks/probe_linear.py --model-calls): KDA's q/k/v (12288 columns) in 1.24-1.60x cuBLAS's GPU
# time against 1.56-1.69x with the fixed tiles, the dense MLP's gate/up (18432) in 1.23-1.50x against 1.55-1.79x.
# Narrower calls gain nothing, and those of 2304 columns with K = 4096 or 9216 lose up to 1.3x at 2001-8000 rows
# (likely because 256-row tiles leave too few programs there: 144 at 2001 rows, for the H200's 132 SMs).
WIDE = (256, 128, 64, 8, 3, 8)
WIDE_COLUMNS = 8192
BIG_SMEM = 160 * 1024  # shared memory per block that holds the fixed tiles' 4 stages and WIDE's 3 (Hopper, A100)


def tiles_for(columns, smem_bytes):
    """The tiles of a call with `columns` output columns (all its weights' together) on a GPU with smem_bytes of
    shared memory per block: WIDE from WIDE_COLUMNS columns on where its stages fit; else the fixed tiles, with 2
    stages where 4 do not fit (GPUs with about 100 KiB)."""
    if smem_bytes < BIG_SMEM:
        return BM, BN, BK, WARPS, 2, GROUP_M
    return WIDE if columns >= WIDE_COLUMNS else FIXED


@functools.cache
def _tiles(device, columns):
    if device.type != "cuda":  # Triton's interpreter
        return FIXED
    return tiles_for(columns, torch.cuda.get_device_properties(device).shared_memory_per_block_optin)


@triton.jit
def _tile(X, W, Y, rm, n0, M, N, K, sxm, EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
          BK: tl.constexpr):  # fmt: skip
    """Y[rm, n0:n0 + BN] = X[rm] @ W[n0:n0 + BN]^T, W [N, K] and Y [M, N] contiguous."""
    rn = n0 + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    xp = X + (rm % M)[:, None].to(tl.int64) * sxm + rk[None, :]
    wp = W + (rn % N)[:, None].to(tl.int64) * K + rk[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            x = tl.load(xp)
            w = tl.load(wp)
        else:
            km = (k0 + rk) < K
            x = tl.load(xp, mask=km[None, :], other=0.0)
            w = tl.load(wp, mask=km[None, :], other=0.0)
        if W.dtype.element_ty == tl.float32:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        xp += BK
        wp += BK
    yp = Y + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(yp, acc.to(Y.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit(do_not_specialize=["M"])
def _products(X, W1, W2, W3, Y1, Y2, Y3, M, N1, N2, N3, K, sxm, EVEN_K: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    e1 = tl.cdiv(N1, BN)
    e2 = e1 + tl.cdiv(N2, BN)
    blocks = e2 + tl.cdiv(N3, BN)
    pid = tl.program_id(0)
    if GROUP_M == 1:  # the programs of one row block next to each other
        pm = pid // blocks
        j = pid % blocks
    else:  # GROUP_M row blocks at a time, column by column: each weight tile read once per group from memory
        width = GROUP_M * blocks
        first = (pid // width) * GROUP_M
        size = tl.minimum(tl.cdiv(M, BM) - first, GROUP_M)
        pm = first + (pid % width) % size
        j = (pid % width) // size
    rm = pm * BM + tl.arange(0, BM)
    # one tile loop for whichever weight the block is of (a loop per branch would hold three pipelines' buffers)
    if j < e1:
        w, y, n, n0 = W1, Y1, N1, j * BN
    elif j < e2:
        w, y, n, n0 = W2, Y2, N2, (j - e1) * BN
    else:
        w, y, n, n0 = W3, Y3, N3, (j - e2) * BN
    _tile(X, w, y, rm, n0, M, n, K, sxm, EVEN_K, BM, BN, BK)


def products(x, *weights, tiles=None, cublas_rows=None):
    """[x @ w.T for w in weights] for x [..., K] and one to three weights [N, K] of x's dtype (nn.Linear's layout),
    without autograd; each output [..., N] in x's dtype, as nn.Linear's. tiles: (BM, BN, BK, warps, stages[, GROUP_M])
    instead of the fixed ones (benchmarks/probe_linear.py's sweep).

    cublas_rows: for the wide projections, where cuBLAS is faster on the GPU. When x has more rows than this, blocks
    of exactly this many rows go to cuBLAS (torch.mm into the output's rows), which then chooses a kernel for one
    number of rows only, once per process and shape; the rows left over take the product, or one more block, ending
    at the last row and recomputing rows already done, when they are more than two thirds of a block (the product's
    GPU time at these shapes is up to 1.5x cuBLAS's). Fewer rows: all take the product."""
    if not 1 <= len(weights) <= MAX_WEIGHTS:
        raise ValueError(f"products takes one to {MAX_WEIGHTS} weights, got {len(weights)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights)):
        raise RuntimeError("products has no backward: call it under torch.no_grad() (or use F.linear, which has one)")
    if cublas_rows is not None and cublas_rows < 1:
        raise ValueError(f"cublas_rows must be a positive number of rows or None, got {cublas_rows}")
    K = x.shape[-1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != K or w.dtype != x.dtype or not w.is_contiguous():
            raise ValueError(f"products needs contiguous [N, {K}] weights of {x.dtype} (x [..., {K}]), got "
                             f"{tuple(w.shape)} {w.dtype}")  # fmt: skip
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    outs = [torch.empty(M, w.shape[0], dtype=x.dtype, device=x.device) for w in weights]
    done = 0
    if cublas_rows is not None and M > cublas_rows:
        C = cublas_rows
        ends = list(range(C, M + 1, C))
        if 3 * (M - ends[-1]) > 2 * C:
            ends.append(M)
        for end in ends:
            for w, y in zip(weights, outs):
                torch.mm(x2[end - C : end], w.T, out=y[end - C : end])
        done = ends[-1]
    if done == 0 and M:  # no views to make: a short prefill's launches are paced by the host
        _product(x2, weights, outs, tiles)
    elif done < M:
        _product(x2[done:], weights, [y[done:] for y in outs], tiles)
    return [y.view(*x.shape[:-1], y.shape[1]) for y in outs]


def _product(x2, weights, outs, tiles):
    """outs[i][:] = x2 @ weights[i].T in one launch: x2 [M > 0, K] with unit column stride, outs [M, N_i]
    contiguous."""
    M, K = x2.shape
    pad = MAX_WEIGHTS - len(weights)
    ns = [w.shape[0] for w in weights] + [0] * pad
    bm, bn, bk, warps, stages, *group = tiles or _tiles(x2.device, sum(ns))
    grid = cdiv(M, bm) * sum(cdiv(n, bn) for n in ns)
    args = (x2, *weights, *(weights[0],) * pad, *outs, *(outs[0],) * pad, M, *ns, K, x2.stride(0))
    _launch(grid, args, (K % bk == 0, bm, bn, bk, group[0] if group else GROUP_M), (warps, stages))


# Compiled kernels by everything Triton specializes _products on (each pointer's dtype and 16-byte alignment, each
# integer's value but M's, M's width), the constexprs and the launch options. Triton's own launch binds and
# specializes the 17 arguments again at every call: about 9 us of host time of the 18 a launch takes
# (benchmarks/probe_short_prefill.py, H200), where a prefill of a few thousand tokens is paced by the host. None:
# launches of that key go through Triton, as do all under a launch hook (a profiler's).
_compiled = {}
_I32_MAX = 2**31 - 1
_COMPILED_LAUNCHES = isinstance(_products, triton.runtime.JITFunction)  # not under Triton's interpreter


def _hooked():
    """Whether a launch hook is installed (a profiler's): those launches go through Triton, which calls it."""
    rt = triton.knobs.runtime
    return any(h is not None and getattr(h, "calls", True) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def _launch(grid, args, constexprs, options):
    """_products[grid](*args, EVEN_K, BM, BN, BK, GROUP_M, num_warps, num_stages): the first launch of a specialization
    through Triton, later ones straight to its compiled kernel (not under Triton's interpreter)."""
    key = None
    if _COMPILED_LAUNCHES:
        device = triton.runtime.driver.active.get_current_device()  # where Triton's own launch would run it
        key = (device, args[0].dtype, *(p.data_ptr() % 16 == 0 for p in args[:7]), args[7] > _I32_MAX, *args[8:],
               *constexprs, *options)  # fmt: skip
        kernel = _compiled.get(key)
        if kernel is not None and not _hooked():
            stream = triton.runtime.driver.active.get_current_stream(device)
            try:
                kernel.run(grid, 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *args,
                           *constexprs)  # fmt: skip
                return
            except (TypeError, AttributeError):  # a Triton whose launcher takes other arguments: its own launch
                _compiled[key] = None
    even_k, bm, bn, bk, group_m = constexprs
    warps, stages = options
    kernel = _products[(grid,)](*args, EVEN_K=even_k, BM=bm, BN=bn, BK=bk, GROUP_M=group_m, num_warps=warps,
                                num_stages=stages)  # fmt: skip
    if key is not None and key not in _compiled:
        _compiled[key] = kernel if isinstance(kernel, triton.compiler.CompiledKernel) else None
