"""MLA decode attention on the latents in one pass (Triton, split-K "flash decoding"): one query per row and head,
already absorbed into the latent space (q_lat = [q_nope W_uk, q_pe], 576 values), against the cached latents
[c_kv, k_pe] shared by all heads; the values are the latents' first kv_lora_rank columns.

PyTorch twin: `KimiMLAAttention._attend_one` in modeling_kimi_linear.py (two batched products, float32 scores and
softmax in between). That reads the cache twice (scores, then values) and makes several float32 passes over the
[B, heads, S] scores; here each program streams one slice of the cache once, all heads together, with an online
softmax (each tile of latents loaded once for the scores and the values), and a second small launch merges the
slices by their log-sum-exp. Scores and sums are float32; the probabilities meet the values in the latents' dtype
(as the twin's softmax output does).

Launch settings from a sweep on the H100 (benchmarks/probe_mla_decode.py, results/mla_decode_probe.log; 32 heads,
576 / 512): 32-token tiles, 4 warps, 2 pipeline stages, slices of at least 128 tokens. Against the twin: 18.9 vs
19.6 us at 8k tokens, 90.8 vs 170.5 at 128k, 268 vs 741 at 512k (batch 1); 83 vs 149 us at batch 16 x 8k.
The cache length and the slicing derived from it are not specialized on (do_not_specialize): the first step after
a prompt of a new length compiles nothing.

The static cache's decode step (a fixed-size buffer, replayed from a CUDA graph) passes each row's span of slots
(first real slot, last slot written) as device tensors instead of a per-slot mask: a mask loaded in each tile makes
the latents' loads wait on it and halved the kernel's speed; a span is two loads before the loop, the slots
outside it are never read, and the slices follow the span (as many as its length calls for, up to the launch's), so
a buffer larger than the tokens cached costs little (benchmarks/mla_decode_span.py).
"""

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2


@triton.jit
def _span_slices(FIRST, LAST, b, S, splits, MINC: tl.constexpr, BS: tl.constexpr):
    """Row b's span of slots [lo, hi) (FIRST[b] ... LAST[0] inclusive) and its slicing: the first `used` of the
    launch's `splits` programs take `chunk` slots each (a multiple of BS, about MINC at least) from lo on, so the
    work follows the span, not the buffer it lies in."""
    lo = tl.load(FIRST + b).to(tl.int32)
    hi = tl.minimum(tl.load(LAST).to(tl.int32) + 1, S)
    n = tl.maximum(hi - lo, 1)
    used = tl.minimum(tl.cdiv(n, MINC), splits)
    return lo, hi, used, tl.cdiv(tl.cdiv(n, used), BS) * BS


@triton.jit(do_not_specialize=["S", "chunk", "iters", "stride_mb", "splits"])
def _split_kernel(Q, L, MASK, FIRST, LAST, M_OUT, L_OUT, ACC, S, chunk, iters, scale, NH, DV, DPE,
                  stride_qb, stride_qh, stride_lb, stride_ls, stride_mb, splits,
                  HAS_MASK: tl.constexpr, HAS_SPAN: tl.constexpr, MINC: tl.constexpr, HP: tl.constexpr,
                  DVP: tl.constexpr, DPEP: tl.constexpr, BS: tl.constexpr):  # fmt: skip
    """Program (b, sp): tokens sp * chunk ... of row b, every head; writes the slice's running max, sum and
    unnormalised output. Each tile of latents is loaded once: its first DV columns serve the scores and the values,
    the last DPE (the positional part) the scores only. HAS_SPAN: only slots FIRST[b] ... LAST[0] (inclusive) are
    read, sliced by _span_slices (programs past the slices it uses write nothing); bounds from two loads before the
    loop keep the latents' loads independent of any load in it (a per-slot MASK, loaded first in each tile, makes
    them wait on it: about half the speed)."""
    b = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    heads = tl.arange(0, HP)
    dv = tl.arange(0, DVP)
    dp = tl.arange(0, DPEP)
    hm, dvm, dpm = heads < NH, dv < DV, dp < DPE
    q_row = Q + b * stride_qb + heads[:, None] * stride_qh
    q_kv = tl.load(q_row + dv[None, :], mask=hm[:, None] & dvm[None, :], other=0.0)
    q_pe = tl.load(q_row + DV + dp[None, :], mask=hm[:, None] & dpm[None, :], other=0.0)
    m = tl.full([HP], float("-inf"), dtype=tl.float32)
    total = tl.zeros([HP], dtype=tl.float32)
    acc = tl.zeros([HP, DVP], dtype=tl.float32)
    row = L + b * stride_lb
    begin, hi, tiles = sp * chunk, S, iters
    if HAS_SPAN:
        lo, hi, used, span_chunk = _span_slices(FIRST, LAST, b, S, splits, MINC, BS)
        begin = lo + sp * span_chunk
        tiles = tl.where(sp < used, tl.cdiv(tl.maximum(tl.minimum(hi, begin + span_chunk) - begin, 0), BS), 0)
        hm = hm & (sp < used)  # the stores below
    for it in range(0, tiles):
        toks = begin + it * BS + tl.arange(0, BS)
        valid = toks < hi
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * stride_mb + toks, mask=valid, other=0) != 0)
        at = row + toks[:, None].to(tl.int64) * stride_ls
        kv = tl.load(at + dv[None, :], mask=valid[:, None] & dvm[None, :], other=0.0)
        pe = tl.load(at + DV + dp[None, :], mask=valid[:, None] & dpm[None, :], other=0.0)
        scores = tl.dot(q_kv, tl.trans(kv)) + tl.dot(q_pe, tl.trans(pe))
        scores = tl.where(valid[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing to attend yet
        alpha = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)
        m = m_new
    out = (b * splits + sp) * NH + heads
    tl.store(M_OUT + out, m, mask=hm)
    tl.store(L_OUT + out, total, mask=hm)
    tl.store(ACC + out[:, None] * DV + dv[None, :], acc, mask=hm[:, None] & dvm[None, :])


@triton.jit(do_not_specialize=["S", "splits"])
def _merge_kernel(M_IN, L_IN, ACC, OUT, FIRST, LAST, S, NH, DV, splits, HAS_SPAN: tl.constexpr, MINC: tl.constexpr,
                  BS: tl.constexpr, SP: tl.constexpr, BDV: tl.constexpr, BSP: tl.constexpr):  # fmt: skip
    """Program (b, h, j): columns j * BDV ... of the output; the slices' outputs weighted by exp(m - max m), over the
    weighted sum of their sums. HAS_SPAN: the slices _span_slices used for row b."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    dv = tl.program_id(2) * BDV + tl.arange(0, BDV)
    if HAS_SPAN:
        _, _, splits_used, _ = _span_slices(FIRST, LAST, b, S, splits, MINC, BS)
    else:
        splits_used = splits
    s = tl.arange(0, SP)
    ms = tl.load(M_IN + (b * splits + s) * NH + h, mask=s < splits_used, other=float("-inf"))
    top = tl.max(ms, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    out = tl.zeros([BDV], dtype=tl.float32)
    denom = 0.0
    for s0 in range(0, splits_used, BSP):
        ss = s0 + tl.arange(0, BSP)
        m = tl.load(M_IN + (b * splits + ss) * NH + h, mask=ss < splits_used, other=float("-inf"))
        w = tl.exp(m - top)
        denom += tl.sum(w * tl.load(L_IN + (b * splits + ss) * NH + h, mask=ss < splits_used, other=0.0), axis=0)
        part = tl.load(ACC + ((b * splits + ss) * NH + h)[:, None] * DV + dv[None, :],
                       mask=(ss < splits_used)[:, None] & (dv < DV)[None, :], other=0.0)  # fmt: skip
        out += tl.sum(part * w[:, None], axis=0)
    tl.store(OUT + (b * NH + h) * DV + dv, (out / denom).to(OUT.dtype.element_ty), mask=dv < DV)


# Each slice writes heads x kv_rank float32 partial outputs (64 KiB at the bench shape, as much as 57 cached tokens):
# a slice covers at least this many tokens, so those stay small beside the latents it reads.
MIN_CHUNK = 128


def mla_decode(q_lat, latent, mask, scale, kv_rank, span=None, splits=None, block_s=32, num_warps=4,
               num_stages=2):  # fmt: skip
    """softmax(scale * q_lat latent^T) latent[..., :kv_rank] for q_lat [B, heads, D] and latents [B, S, D] (last
    dimension contiguous); mask [B, S] bool (True = attend) or None; span: (first [B], last [1]) integer tensors on
    the latents' device, or None: row b attends to slots first[b] ... last[0] only (inclusive; the rest are never
    read, so they may hold anything), the bounds read on the device (no host sync, fit for a CUDA graph). With a
    span, the mask (if any) only hides slots inside it. Returns [B, heads, kv_rank] in the latents' dtype. splits:
    how many slices of the cache each row is read in side by side (default: about two programs per multiprocessor
    over the batch, each slice at least MIN_CHUNK tokens)."""
    B, NH, D = q_lat.shape
    S = latent.shape[1]
    if latent.stride(-1) != 1 or q_lat.stride(-1) != 1:
        raise ValueError("mla_decode needs the last dimension of q_lat and the latents contiguous")
    if span is not None:
        first, last = span
        if first.shape != (B,) or last.numel() != 1 or first.is_floating_point() or last.is_floating_point():
            raise ValueError(
                f"mla_decode's span is (first [B], last [1]) integer tensors, got {tuple(first.shape)} "
                f"{first.dtype} and {tuple(last.shape)} {last.dtype} for B={B}."
            )
    if splits is None:
        sms = torch.cuda.get_device_properties(latent.device).multi_processor_count if latent.is_cuda else 4
        splits = max(1, min(cdiv(S, MIN_CHUNK), 2 * sms // B))
    chunk = cdiv(cdiv(S, splits), block_s) * block_s
    splits = cdiv(S, chunk)
    dev = latent.device
    m = torch.empty(B, splits, NH, dtype=torch.float32, device=dev)
    total = torch.empty_like(m)
    acc = torch.empty(B, splits, NH, kv_rank, dtype=torch.float32, device=dev)
    if mask is not None:
        mask = (mask.to(torch.uint8) if mask.dtype == torch.bool else mask).contiguous()
    _split_kernel[(B, splits)](
        q_lat, latent, mask if mask is not None else latent, *(span if span is not None else (latent, latent)), m,
        total, acc, S, chunk, chunk // block_s, float(scale), NH, kv_rank, D - kv_rank, q_lat.stride(0),
        q_lat.stride(1), latent.stride(0), latent.stride(1), mask.stride(0) if mask is not None else 0, splits,
        HAS_MASK=mask is not None, HAS_SPAN=span is not None, MINC=MIN_CHUNK, HP=max(16, next_power_of_2(NH)),
        DVP=max(16, next_power_of_2(kv_rank)), DPEP=max(16, next_power_of_2(D - kv_rank)), BS=block_s,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    out = torch.empty(B, NH, kv_rank, dtype=latent.dtype, device=dev)
    bdv = min(128, next_power_of_2(kv_rank))
    _merge_kernel[(B, NH, cdiv(kv_rank, bdv))](
        m, total, acc, out, *(span if span is not None else (m, m)), S, NH, kv_rank, splits,
        HAS_SPAN=span is not None, MINC=MIN_CHUNK, BS=block_s, SP=next_power_of_2(splits), BDV=bdv, BSP=16,
        num_warps=4,
    )  # fmt: skip
    return out
