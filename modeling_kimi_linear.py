"""Kimi Linear: a hybrid of Kimi Delta Attention (KDA) and NoPE Multi-head Latent Attention (MLA) with a
sigmoid-routed mixture of experts.

Departures from a vanilla decoder-only transformer, in forward order:
- Layer kinds come from `config.layer_types` (3 KDA : 1 MLA in the released model) and `config.mlp_types`
  (layer 0 dense, the rest MoE); both are derived once by the config.
- KDA (linear attention): q/k/v pass a causal depthwise conv (kernel 4) and SiLU; q/k are L2-normalised;
  a per-channel forget gate g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias) (unbounded, as trained) and a
  per-head beta = sigmoid(b_proj(x)) drive the delta rule
      S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T,   o_t = K^-0.5 S_t^T q_t
  then a per-head RMSNorm gated by sigmoid(g_b(g_a(x))). Prefill and training run it chunkwise (64 tokens);
  decode runs the one-step recurrence. State per layer: three conv windows and [H, K, V] in float32.
- MLA with no positional encoding: one shared 576-value latent per token (c_kv 512 after its RMSNorm, k_pe 64)
  is all that is cached; decode attends on the latents directly (kv_b_proj absorbed into query and output).
- MoE: sigmoid router in float32; the correction bias only picks experts (grouped top-k), the weights come
  from the unbiased scores, renormalised and scaled; plus a shared expert. The routed experts keep the released
  per-expert modules but run as grouped matrix products over weights stacked once (no per-expert loop, no host
  sync); adapter-wrapped experts run one by one.
- Padding and packing: a batch with padding, or with several documents packed into a row (position_ids that
  restart at 0, or flash-attention style cu_seq_lens_q), runs KDA on its real tokens only, one variable-length
  sequence per document (state and conv windows start afresh at each document), and MLA attends within the
  document: packed rows compute exactly what separate rows would.
- Decode without per-token overhead: KimiLinearStaticCache preallocates every state (MLA latents up to a maximum
  length) so that a decode step has fixed shapes and no host sync (the cached length lives on the device, MLA masks
  the slots not yet written); on CUDA that step is captured once in a CUDA graph and replayed for every token.
  generate() takes it by default on a model on one CUDA device (cache_implementation="static" anywhere,
  "dynamic" for the growing KimiLinearCache).
- Short prompts without per-layer host work: capture_prefill_graphs() captures a fresh prefill in CUDA graphs at a
  few dozen padded lengths (the padding an identity step for KDA, hidden by MLA's causal attention); a prompt they
  hold replays the smallest, and nothing is chosen, built or launched per layer at a new length.
- The fast GPU kernels live in the separately installed `kimi_linear_kernels` package; without it (or on a
  CPU tensor) the plain PyTorch code in this file runs.
"""

import contextlib
import contextvars
import functools
import itertools
import math
import operator
import shutil
import threading
import time
import weakref
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias, causal_lower_right
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_kimi_linear import KDA, KimiLinearConfig

try:  # optional: the repo's kernels package (fla-backed GPU paths), installed as `kimi_linear_kernels`
    import kimi_linear_kernels as _kernels
except ImportError:
    _kernels = None

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache field of model outputs (and the forward kwarg) to `cache`.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


# ---------------------------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------------------------
class KimiLinearRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x, residual=None):
        """RMSNorm of x; with residual, of s = x + residual, returning (normed, s). One fused launch on CUDA
        (kimi_linear_kernels.rms_norm), else the plain code below (its twin)."""
        fast = _triton_kernels(x)
        if fast is not None and fast.rms_norm_serves(x, self.weight, residual):
            return fast.rms_norm(x, self.weight, self.variance_epsilon, residual=residual)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class KimiLinearGatedRMSNorm(nn.Module):
    """Per-head RMSNorm times sigmoid(gate), all in float32."""

    def __init__(self, head_dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.variance_epsilon = eps

    def forward(self, x, gate):
        fast = _triton_kernels(x)
        if fast is not None and fast.rms_norm_serves(x, self.weight, gate):
            return fast.rms_norm(x, self.weight, self.variance_epsilon, gate=gate)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.float() * x * torch.sigmoid(gate.float())).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Short convolution
# ---------------------------------------------------------------------------------------------------------------
def short_conv(x, weight, state=None, window=True):
    """Causal depthwise conv then SiLU. x [B, T, D], weight [D, 1, W], state [B, D, W-1] holds the previous W-1
    inputs (None: zeros). Returns y [B, T, D] and the new state [B, D, W-1] (with window=False, None where the Triton
    kernels serve: nothing keeps it, as in training without a cache). Where the kernels package's Triton kernels
    serve, its short_conv computes y (forward and backward)."""
    width = weight.shape[-1]
    _check_loaded(weight, x)
    fast = _triton_kernels(x)
    if fast is not None and x.stride(-1) == 1:
        return fast.short_conv(x, weight, state), _new_window(x, state, width) if window else None
    xt = x.transpose(1, 2)  # [B, D, T]
    if state is None:
        state = xt.new_zeros(xt.shape[0], xt.shape[1], width - 1)
    xt = torch.cat([state.to(xt.dtype), xt], dim=-1)  # [B, D, W-1+T]
    return F.silu(_depthwise_conv(xt, weight)).transpose(1, 2), xt[..., xt.shape[-1] - (width - 1) :]


def _check_loaded(weight, x):
    """Refuse a weight left on the meta device beside real inputs: PyTorch's CPU convolution reads such a weight
    without an error and returns arbitrary numbers."""
    if weight.is_meta and not x.is_meta:
        raise RuntimeError(
            "Kimi Linear: a short-conv weight is on the meta device (not loaded, or offloaded by a hook on its own "
            "module, which the layer does not call). Load the weights, or offload through from_pretrained(device_map="
            "...) or accelerate's cpu_offload and call the whole model: its forward loads each offloaded layer whole."
        )


def _depthwise_conv(xt, weight):
    """The depthwise conv of xt [B, D, L] by weight [D, 1, W], without padding: [B, D, L-W+1] in xt's dtype. On the
    CPU a single output per channel (a decode step) is a product and a sum, and half types convolve in float32: the
    same float32 sums rounded once as their own conv1d, which made bfloat16 decode steps 3-6x slower there
    (benchmarks/cpu_decode.py)."""
    if xt.device.type != "cpu":
        return F.conv1d(xt, weight.to(xt.dtype), groups=xt.shape[1])
    wide = xt if xt.dtype in (torch.float32, torch.float64) else xt.float()
    if xt.shape[-1] == weight.shape[-1]:
        return (wide * weight[:, 0].to(wide.dtype)).sum(-1, keepdim=True).to(xt.dtype)
    return F.conv1d(wide, weight.to(wide.dtype), groups=xt.shape[1]).to(xt.dtype)


# ---------------------------------------------------------------------------------------------------------------
# KDA math in plain PyTorch (the specification the GPU kernels are tested against)
# ---------------------------------------------------------------------------------------------------------------
def _f32(x):
    """x in float32 for the math, or left in float64 (the precision of references)."""
    return x if x.dtype == torch.float64 else x.float()


def l2norm(x, eps=1e-6):
    x = _f32(x)
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def kda_gate(g, A_log, dt_bias):
    """Per-channel log-decay, <= 0. g [..., H, K] (f_b(f_a(x))), A_log [1, 1, H, 1] or [H], dt_bias [H*K]."""
    H, K = g.shape[-2:]
    g = _f32(g) + _f32(dt_bias).view(H, K)
    return -torch.exp(_f32(A_log).view(H, 1)) * F.softplus(g)


def kda_chunk_torch(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=True, chunk_size=64):
    """Chunkwise-parallel KDA.

    q, k: [B, T, H, K] (L2-normalised), v: [B, T, H, V], g: [B, T, H, K] log-decay (<= 0), beta: [B, T, H],
    initial_state: [B, H, K, V] or None. Returns o [B, T, H, V] (v's dtype) and the final state [B, H, K, V]
    in float32 (None unless output_final_state). Computes in float32, or in float64 when q is float64.

    Inside a chunk the delta-rule updates are folded with a unit-lower-triangular solve (the UT transform) and
    decays are cumulative sums G of g. Pairwise decays exp(G_t - G_i), i <= t, are only ever formed with a
    non-positive exponent: across 16-token blocks they factor through a reference point between i and t
    (the first token of t's block); inside a block they are formed pairwise, masked before the exp.
    Chunks then pass the state along in a short loop of small matrix products.
    """
    B, T, H, K = q.shape
    V, out_dtype = v.shape[-1], v.dtype
    scale = K**-0.5 if scale is None else scale
    C = chunk_size
    c = min(16, C)  # block size inside a chunk
    P = C // c
    pad = -T % C
    N = (T + pad) // C

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # float64 only for references

    def chunked(x):  # [B, T, H, D] -> [B, H, N, C, D] in acc, zero-padded (padding is an identity step)
        x = F.pad(x.to(acc), (0, 0, 0, 0, 0, pad))
        return x.view(B, N, C, H, -1).permute(0, 3, 1, 2, 4)

    q, k, v, g, beta = (chunked(x) for x in (q, k, v, g, beta.unsqueeze(-1)))
    G = g.cumsum(3)  # [B, H, N, C, K], non-increasing along C

    # Across blocks: reference r_p = first token of block p; keys i < r_p carry exp(G_{r_p} - G_i) <= 1,
    # queries/keys t in block p carry exp(G_t - G_{r_p}) <= 1.
    Gb = G.view(B, H, N, P, c, K)
    ref = Gb[..., :1, :]  # [B, H, N, P, 1, K]
    to_ref = torch.exp(Gb - ref)  # [B, H, N, P, c, K]
    earlier = torch.arange(C, device=q.device)[None, :] < (torch.arange(P, device=q.device) * c)[:, None]  # [P, C]
    from_ref = torch.exp((ref - G.unsqueeze(3)).masked_fill(~earlier[:, :, None], float("-inf")))  # [B,H,N,P,C,K]
    k_ref = (k.unsqueeze(3) * from_ref).transpose(-1, -2)  # [B, H, N, P, K, C]
    a_qk = (q.view(B, H, N, P, c, K) * to_ref) @ k_ref  # [B, H, N, P, c, C]
    a_kk = (k.view(B, H, N, P, c, K) * to_ref) @ k_ref

    # Inside blocks: pairwise decays, masked before the exp.
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    pair = (Gb.unsqueeze(-2) - Gb.unsqueeze(-3)).masked_fill_(~causal[:, :, None], float("-inf")).exp_()
    qb, kb = q.view(B, H, N, P, c, K), k.view(B, H, N, P, c, K)
    decayed_k = pair * kb.unsqueeze(-3)  # [B, H, N, P, c(t), c(i), K]: k_i exp(G_t - G_i)
    d = (decayed_k @ torch.stack([qb, kb], dim=-1)).transpose(-1, -2)  # [B, H, N, P, c, 2, c]: q_t, k_t rows
    d_qk, d_kk = d[..., 0, :], d[..., 1, :].tril(-1)  # [B, H, N, P, c, c]: i <= t, and i < t
    eye_p = torch.eye(P, device=q.device)

    def assemble(off, diag):  # [B,H,N,P,c,C] + block-diagonal [B,H,N,P,c,c] -> [B,H,N,C,C]
        full = off.view(B, H, N, P, c, P, c) + torch.einsum("bhnpti,pq->bhnptqi", diag, eye_p)
        return full.reshape(B, H, N, C, C)

    a_qk = assemble(a_qk, d_qk)
    a_kk = assemble(a_kk, d_kk) * beta  # row t scaled by beta_t; strictly lower

    # UT transform: (I + A) [U_v | W] = [beta v | beta k exp(G)]; the solve treats the diagonal as ones.
    rhs = torch.cat([v * beta, k * torch.exp(G) * beta], dim=-1)
    x = torch.linalg.solve_triangular(a_kk, rhs, upper=False, unitriangular=True)
    u_v, w = x[..., :V], x[..., V:]  # [B, H, N, C, V], [B, H, N, C, K]
    q_g = q * torch.exp(G)
    k_end = (k * torch.exp(G[..., -1:, :] - G)).transpose(-1, -2)  # [B, H, N, K, C]
    decay_end = torch.exp(G[..., -1, :]).unsqueeze(-1)  # [B, H, N, K, 1]

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    out = []
    for n in range(N):
        u = u_v[:, :, n] - w[:, :, n] @ S  # [B, H, C, V]
        out.append(q_g[:, :, n] @ S + a_qk[:, :, n] @ u)
        S = decay_end[:, :, n] * S + k_end[:, :, n] @ u
    o = torch.stack(out, dim=2).mul(scale)  # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2).to(out_dtype)
    return o, (S if output_final_state else None)


def kda_step_torch(q, k, v, g, beta, state, scale=None):
    """One decode step. q, k [B, H, K] (L2-normalised), v [B, H, V], g [B, H, K], beta [B, H],
    state [B, H, K, V] float32 (float64 for references). Returns o [B, H, V] and the new state, in the state's
    precision."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(state.dtype) for x in (q, k, v, g, beta))
    S = state * torch.exp(g).unsqueeze(-1)  # decay first
    u = beta.unsqueeze(-1) * (v - torch.einsum("bhk,bhkv->bhv", k, S))
    S = S + k.unsqueeze(-1) * u.unsqueeze(-2)  # then the delta update
    return scale * torch.einsum("bhk,bhkv->bhv", q, S), S


def kda_decode_torch(xq, xk, xv, conv_q, conv_k, conv_v, wq, wk, wv, g_raw, A_log, dt_bias, b_raw, state, scale=None):
    """One decode step for B tokens, updating the conv windows and the recurrent state in place.

    xq, xk [B, H*K], xv [B, H*V]: projections before the conv; conv_*: [B, D, W-1] windows; w*: conv weights
    [D, 1, W]; g_raw [B, H*K] = f_b(f_a(x)); b_raw [B, H] = b_proj(x); state [B, H, K, V] float32.
    Returns o [B, H, V] float32. The twin of kimi_linear_kernels.kda_decode_fused (one Triton launch)."""
    B, H = b_raw.shape
    heads = []
    for x_, window, w in ((xq, conv_q, wq), (xk, conv_k, wk), (xv, conv_v, wv)):
        y, new_window = short_conv(x_[:, None], w, window)
        window.copy_(new_window)
        heads.append(y[:, 0].view(B, H, -1))
    q, k, v = heads
    g = kda_gate(g_raw.view(B, H, -1), A_log, dt_bias)
    o, new_state = kda_step_torch(l2norm(q), l2norm(k), v, g, torch.sigmoid(b_raw.float()), state, scale)
    state.copy_(new_state)
    return o


def short_conv_varlen(x, weight, windows, segs, window=True):
    """short_conv over variable-length sequences packed in one row. x [N, D] (the real tokens, sequence after
    sequence), windows [S, D, W-1] each sequence's starting window (zeros: a fresh start). Returns y [N, D] and
    each sequence's final window [S, D, W-1] (None with window=False and the kernels serving: nothing keeps it). Each
    sequence is laid out behind its own window, so no tap ever reads another sequence."""
    W = weight.shape[-1]
    _check_loaded(weight, x)
    fast = _triton_kernels(x)
    if fast is not None and x.stride(-1) == 1 and not (windows.requires_grad and torch.is_grad_enabled()):
        y = fast.short_conv_varlen(x, weight, windows, segs.cu_seqlens, segs.seq_of_token)
        return y, _final_windows(x, windows, segs.cu_seqlens, W) if window else None
    S, N = windows.shape[0], x.shape[0]
    ext = x.new_empty(x.shape[1], N + S * (W - 1))  # [D, N + S*(W-1)]
    ext[:, segs.token_slot(W)] = x.t()
    ext[:, segs.window_slots(W)] = windows.to(x.dtype).permute(1, 0, 2).reshape(x.shape[1], -1)
    y = F.silu(_depthwise_conv(ext[None], weight)[0])  # [D, N + (S-1)*(W-1)]
    y = y[:, segs.token_slot(W) - (W - 1)].t()
    final = ext[:, segs.final_window_slots(W)].view(x.shape[1], S, W - 1).permute(1, 0, 2)
    return y, final


def _new_window(x, state, W):
    """The window short_conv leaves behind: the last W-1 inputs [B, D, W-1] of x [B, T, D], the end of the starting
    window state (None: zeros) first where T < W-1."""
    B, T, D = x.shape
    if T >= W - 1:  # all from x: a view (KDALayerState.update copies it out), three operations instead of a dozen
        return x[:, T - (W - 1) :].transpose(1, 2)
    windows = state if state is not None else x.new_zeros(B, D, W - 1)
    return _final_windows(x.reshape(B * T, D), windows, torch.arange(B + 1, device=x.device) * T, W)


def _final_windows(x, windows, cu_seqlens, W):
    """Each packed sequence's last W-1 inputs [S, D, W-1] (x [N, D]), the end of its starting window first where
    the sequence is shorter than that."""
    starts, ends = cu_seqlens[:-1, None], cu_seqlens[1:, None]
    pos = ends - (W - 1) + torch.arange(W - 1, device=x.device)  # [S, W-1] positions in x
    from_x = x[pos.clamp(min=0)].permute(0, 2, 1)
    slot = (pos - starts + (W - 1)).clamp(0, W - 2)[:, None, :].expand(-1, x.shape[1], -1)
    return torch.where((pos >= starts)[:, None, :], from_x, windows.to(x.dtype).gather(2, slot))


def kda_prefill_torch(
    q, k, v, g, beta, A_log, dt_bias, initial_state=None, output_final_state=True, cu_seqlens=None, cu_seqlens_cpu=None
):
    """One KDA layer's prefill from the raw projections: q, k [B, T, H, K] after the conv (not yet normalised),
    v [B, T, H, V], g = f_b(f_a(x)) [B, T, H, K] before the gate, beta = b_proj(x) [B, T, H] before the sigmoid.
    cu_seqlens [S+1] (with B == 1): S variable-length sequences, each starting from its own initial_state row.
    cu_seqlens_cpu: the same offsets on the host, if the caller has them (saves a copy). Returns o [B, T, H, V] and
    the final states (float32). The twin of kimi_linear_kernels.kda_prefill."""
    g = kda_gate(g, A_log, dt_bias)
    q, k, beta = l2norm(q), l2norm(k), torch.sigmoid(_f32(beta))
    if cu_seqlens is None:
        return kda_chunk_torch(q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state)
    bounds = (cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens).tolist()
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = initial_state[i : i + 1] if initial_state is not None else None
        o, h = kda_chunk_torch(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], initial_state=h0)
        outs.append(o)
        finals.append(h)
    return torch.cat(outs, dim=1), (torch.cat(finals) if output_final_state else None)


class Segments:
    """The real tokens of a [B, T] batch as variable-length sequences: padding dropped, packed documents split.

    idx [N]: flat positions (row * T + column) of the real tokens, in order; cu_seqlens [S+1] (and cu_seqlens_cpu, its
    copy on the host); row [S]: the batch
    row of each sequence; first / last [S]: the sequence opens / closes its row (only a row's first sequence
    continues a cached state, only its last one leaves a state behind); packed: some row holds several documents."""

    def __init__(self, real, starts=None):
        B, T = real.shape
        device = real.device
        self.shape = (B, T)
        self.idx = real.flatten().nonzero().squeeze(1)
        rows = self.idx // T
        new = torch.ones_like(rows, dtype=torch.bool)
        new[1:] = rows[1:] != rows[:-1]
        if starts is not None:
            new |= starts.flatten()[self.idx]
        begin = new.nonzero().squeeze(1)
        self.cu_seqlens = torch.cat([begin, begin.new_tensor([len(self.idx)])]).to(device)
        self.cu_seqlens_cpu = self.cu_seqlens.cpu()  # once per forward, not once per layer (each copy is a sync)
        self.num_seqs = len(begin)
        self.seq_of_token = new.long().cumsum(0) - 1
        self.row = rows[begin]
        self.first = torch.ones_like(self.row, dtype=torch.bool)
        self.first[1:] = self.row[1:] != self.row[:-1]
        self.last = torch.ones_like(self.first)
        self.last[:-1] = self.row[1:] != self.row[:-1]
        self.packed = self.num_seqs > int(self.first.sum())  # some row holds more than one document

    def to(self, device, non_blocking=False):
        """These segments with their tensors on `device` (cu_seqlens_cpu stays on the host), made once per device:
        accelerate's hooks call it for a layer on another device (a model split over GPUs by a device_map)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.idx.device:
            return self
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            moved = object.__new__(Segments)
            for name, value in self.__dict__.items():
                if name != "_copies":
                    movable = torch.is_tensor(value) and name != "cu_seqlens_cpu"
                    moved.__dict__[name] = value.to(device, non_blocking=non_blocking) if movable else value
            copies[device] = moved
        return copies[device]

    def gather(self, x):  # [B, T, ...] -> [N, ...]
        return x.reshape(-1, *x.shape[2:])[self.idx]

    def scatter(self, y):  # [N, ...] -> [B, T, ...], zeros at padding
        out = y.new_zeros(self.shape[0] * self.shape[1], *y.shape[1:])
        out[self.idx] = y
        return out.view(*self.shape, *y.shape[1:])

    # short_conv_varlen's layout: sequence s sits behind its own (W-1)-slot window
    def token_slot(self, W):
        return torch.arange(len(self.idx), device=self.idx.device) + (self.seq_of_token + 1) * (W - 1)

    def window_slots(self, W):
        starts = self.cu_seqlens[:-1] + torch.arange(self.num_seqs, device=self.idx.device) * (W - 1)
        return (starts[:, None] + torch.arange(W - 1, device=self.idx.device)).flatten()

    def final_window_slots(self, W):
        ends = self.cu_seqlens[1:] + (torch.arange(self.num_seqs, device=self.idx.device) + 1) * (W - 1)
        return (ends[:, None] - (W - 1) + torch.arange(W - 1, device=self.idx.device)).flatten()

    def per_sequence(self, row_tensor, fresh):
        """Starting values for each sequence: the row's cached tensor for a row's first sequence, else zeros.
        row_tensor [B, ...] or None; fresh: a zero tensor [...] of one row's shape."""
        if row_tensor is None:
            return fresh.expand(self.num_seqs, *fresh.shape).clone()
        picked = row_tensor[self.row]
        return torch.where(self.first.view(-1, *[1] * fresh.dim()), picked, torch.zeros_like(picked))

    def per_row(self, seq_tensor, row_tensor, fresh):
        """What each row keeps after the step: its last sequence's value; rows without real tokens keep theirs."""
        out = fresh.expand(self.shape[0], *fresh.shape).clone() if row_tensor is None else row_tensor.clone()
        out[self.row[self.last]] = seq_tensor[self.last].to(out.dtype)
        return out


def _triton_kernels(x):
    """The kernels package when its own Triton kernels serve this tensor (CUDA, Triton installed), else None."""
    return _kernels if _kernels is not None and _kernels.triton_serves(x) else None


def _no_autograd(*tensors):
    """Whether no autograd graph runs through these tensors (the inference-only kernels may serve)."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


# Decode steps of at most this many rows take their input projections as one Triton launch of matrix-vector products
# (kimi_linear_kernels.projections); larger batches read each weight once through cuBLAS instead.
FUSED_PROJECTION_ROWS = 2


def _plain_linears(x, *modules):
    """Whether these are plain bias-free nn.Linear layers with contiguous weights in x's dtype, outside autograd (no
    adapters, no hooks: accelerate's offloading hooks, for one, bring the weight in around forward): weights the
    kernels may read directly."""
    plain = all(
        type(m) is nn.Linear
        and m.bias is None
        and m.weight.dtype == x.dtype
        and m.weight.is_contiguous()
        and not (m._forward_pre_hooks or m._forward_hooks or "forward" in m.__dict__)
        for m in modules
    )
    return plain and _no_autograd(x, *(m.weight for m in modules))


# A prefill of at most this many tokens runs its wide projections through the Triton product as well (KDA's q, k, v
# and o_proj, MLA's q_proj, kv_b_proj and o_proj, the MLPs). There the host sets the pace (the bench model's warm
# prefill took 42 ms of host time at 2k-9k tokens on an H200 host, its GPU 12-30 ms), so the product's longer GPU
# time at these shapes (1.2-1.6x cuBLAS's) costs nothing, while cuBLAS's choice of kernel for a new number of rows
# cost 12-13 ms of host time at each prompt of a new length (benchmarks/probe_short_prefill.py). Longer prompts run
# them through cuBLAS in blocks of exactly this many rows (one shape each, chosen for once per process) and the rows
# left over through the product.
CUBLAS_ROWS = 8192


def _products(x, *modules, wide=False):
    """[m(x) for m in modules], for up to three projections of one input. At inference on CUDA in half precision,
    where they are plain layers, a prefill's rows take one Triton launch (kimi_linear_kernels.products,
    kernels/gemm.py), which chooses nothing per number of rows: cuBLAS's choice for a number of rows it has not run
    costs 2-4 ms of host time nearly every time at the low-rank shapes (few outputs or few inputs). A decode step's
    (x [B, 1, ...]: one row count per batch size, chosen for once) and a prefill graph's (chosen for at the capture)
    call the modules. wide: projections cuBLAS runs faster, which beyond CUBLAS_ROWS rows take cuBLAS in blocks of
    that many rows."""
    fast = _triton_kernels(x)
    step = x.dim() == 3 and x.shape[1] == 1
    if (
        fast is not None
        and not step
        and x.dtype in (torch.float16, torch.bfloat16)
        and _PADDED_PREFILL.get() is None
        and _plain_linears(x, *modules)
    ):
        return fast.products(x, *(m.weight for m in modules), cublas_rows=CUBLAS_ROWS if wide else None)
    return [m(x) for m in modules]


def _kda_backend(x):
    """The kernels package when it can serve this tensor (CUDA with fla), else None: plain PyTorch."""
    return _kernels if _kernels is not None and _kernels.kda_backend(x) != "torch" else None


class _PaddedPrefill:
    """A prefill of fresh sequences whose last tokens are padding (what a prefill graph captures: one fixed length,
    the real one on the device). length: [1] int64, the real tokens per row; T: the padded length; W: the conv
    width. KDA makes every padding token an identity step (_NO_OP_LOGIT) and takes its conv windows at the real end;
    MLA's causal attention hides the padding from every real token; the logits are taken at position length - 1."""

    def __init__(self, length, T, W):
        steps = torch.arange(T, device=length.device)
        self.length = length
        self.pad = steps >= length  # [T]
        self.window_at = length - (W - 1) + steps[: W - 1]  # [W-1] positions of the last W-1 real inputs

    def window(self, x):
        """The conv window a fresh sequence leaves behind, [B, D, W-1], from its inputs x [B, T, D]: the last W-1
        real ones, zeros before the start."""
        at = self.window_at
        return x.index_select(1, at.clamp(min=0)).masked_fill((at < 0)[:, None], 0).transpose(1, 2)


# A padding token's beta and gate logits: sigmoid and softplus of it are exactly 0 in float32, so the token writes
# nothing into the KDA state and decays nothing (exp(0) = 1); finite in float16.
_NO_OP_LOGIT = -1e4
_PADDED_PREFILL = contextvars.ContextVar("kimi_linear_padded_prefill", default=None)


# ---------------------------------------------------------------------------------------------------------------
# KDA layer
# ---------------------------------------------------------------------------------------------------------------
class KimiDeltaAttention(nn.Module):
    def __init__(self, config: KimiLinearConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.kda_num_heads, config.kda_head_dim
        hidden, proj, width = config.hidden_size, self.num_heads * self.head_dim, config.kda_conv_size
        self.q_proj = nn.Linear(hidden, proj, bias=False)
        self.k_proj = nn.Linear(hidden, proj, bias=False)
        self.v_proj = nn.Linear(hidden, proj, bias=False)
        self.q_conv1d = nn.Conv1d(proj, proj, width, groups=proj, bias=False)
        self.k_conv1d = nn.Conv1d(proj, proj, width, groups=proj, bias=False)
        self.v_conv1d = nn.Conv1d(proj, proj, width, groups=proj, bias=False)
        self.A_log = nn.Parameter(torch.empty(1, 1, self.num_heads, 1, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(proj, dtype=torch.float32))
        self.f_a_proj = nn.Linear(hidden, self.head_dim, bias=False)
        self.f_b_proj = nn.Linear(self.head_dim, proj, bias=False)
        self.b_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.g_a_proj = nn.Linear(hidden, self.head_dim, bias=False)
        self.g_b_proj = nn.Linear(self.head_dim, proj, bias=False)
        self.o_norm = KimiLinearGatedRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(proj, hidden, bias=False)

    # Inference prefill longer than this runs in pieces through the state (exact: the state carries everything),
    # so activation memory stays bounded at a million tokens.
    prefill_piece = 1 << 17

    def forward(self, x, state=None, segs=None):
        """x [B, T, hidden]; state: this layer's KDALayerState (updated in place) or None; segs: Segments when the
        batch has padding or packed documents, else None."""
        B, T, _ = x.shape
        if segs is not None:
            return segs.scatter(self._varlen(segs.gather(x), state, segs))
        if state is not None and state.recurrent is not None and T == 1:
            fused = self._decode_layer(x[:, 0], state)
            if fused is not None:
                return self.o_proj(fused).unsqueeze(1)
            o, ga = self._decode(x[:, 0], state).unsqueeze(1), None
        elif T > self.prefill_piece and not torch.is_grad_enabled():  # the output gate and norm too: float32 inside
            state = state if state is not None else KDALayerState()
            pieces = [x[:, i : i + self.prefill_piece] for i in range(0, T, self.prefill_piece)]
            return torch.cat([self._output(p, *self._prefill(p, state)) for p in pieces], dim=1)
        else:
            o, ga = self._prefill(x, state)
        return self._output(x, o, ga)

    def _output(self, x, o, ga=None):
        """o_proj of the gated output norm; ga = g_a_proj(x) where _raw made it (a prefill), else None (a decode
        step)."""
        *lead, _ = x.shape
        (gate,) = _products(self.g_a_proj(x) if ga is None else ga, self.g_b_proj)
        normed = self.o_norm(o.to(x.dtype), gate.view(*lead, self.num_heads, self.head_dim)).reshape(*lead, -1)
        return _products(normed, self.o_proj, wide=True)[0]

    def _raw(self, x):
        """The pre-kernel projections: q, k, v before the conv [.., H*D]; g before the gate [.., H, D]; beta logits;
        and g_a(x), the output gate's first half (made here with the other low-rank projections of x)."""
        fa, ga, b_raw = _products(x, self.f_a_proj, self.g_a_proj, self.b_proj)
        (g,) = _products(fa, self.f_b_proj)
        g = g.unflatten(-1, (self.num_heads, self.head_dim))
        return *_products(x, self.q_proj, self.k_proj, self.v_proj, wide=True), g, b_raw, ga

    def _chunk(self, x):
        fast = _kda_backend(x)
        return fast.kda_prefill if fast is not None else kda_prefill_torch

    def _prefill(self, x, state):
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        padded = _PADDED_PREFILL.get()  # a fresh sequence padded at its end (a prefill graph), else None
        cached = state is not None and state.conv is not None and padded is None
        conv = state.conv if cached else (None, None, None)
        xq, xk, xv, g, beta, ga = self._raw(x)
        if padded is not None:  # padding leaves the state alone: beta 0 (writes nothing), gate 0 (decays nothing)
            g = g.masked_fill(padded.pad[:, None, None], _NO_OP_LOGIT)
            beta = beta.masked_fill(padded.pad[:, None], _NO_OP_LOGIT)
        keep = state is not None and padded is None
        q, cq = short_conv(xq, self.q_conv1d.weight, conv[0], window=keep)
        k, ck = short_conv(xk, self.k_conv1d.weight, conv[1], window=keep)
        v, cv = short_conv(xv, self.v_conv1d.weight, conv[2], window=keep)
        if padded is not None and state is not None:
            cq, ck, cv = (padded.window(t) for t in (xq, xk, xv))
        q, k, v = (t.view(B, T, H, D) for t in (q, k, v))
        h0 = state.recurrent if cached else None
        o, h = self._chunk(x)(q, k, v, g, beta, self.A_log, self.dt_bias, initial_state=h0,
                              output_final_state=state is not None)  # fmt: skip
        if state is not None:
            state.update(conv=(cq, ck, cv), recurrent=h, num_tokens=T)
        return o, ga

    def _varlen(self, x, state, segs):
        """x [N, hidden]: the real tokens of the batch, sequence after sequence (Segments)."""
        H, D = self.num_heads, self.head_dim
        width = self.q_conv1d.weight.shape[-1]
        cached = state is not None and state.recurrent is not None
        xq, xk, xv, g, beta, ga = self._raw(x)
        fresh_window = x.new_zeros(H * D, width - 1)
        convs, windows = [], []
        for i, (t, conv) in enumerate(zip((xq, xk, xv), (self.q_conv1d, self.k_conv1d, self.v_conv1d))):
            start = segs.per_sequence(state.conv[i] if cached else None, fresh_window)
            y, end = short_conv_varlen(t, conv.weight, start, segs, window=state is not None)
            convs.append(y.view(1, -1, H, D))
            if state is not None:
                windows.append(segs.per_row(end, state.conv[i] if cached else None, fresh_window))
        fresh_state = x.new_zeros(H, D, D, dtype=torch.float32)
        h0 = segs.per_sequence(state.recurrent if cached else None, fresh_state) if state is not None else None
        o, h = self._chunk(x)(*convs, g[None], beta[None], self.A_log, self.dt_bias, initial_state=h0,
                              output_final_state=state is not None, cu_seqlens=segs.cu_seqlens,
                              cu_seqlens_cpu=segs.cu_seqlens_cpu)  # fmt: skip
        if state is not None:
            recurrent = segs.per_row(h, state.recurrent if cached else None, fresh_state)
            state.update(conv=windows, recurrent=recurrent, num_tokens=segs.shape[1])
        return self._output(x, o[0], ga)

    def _decode_layer(self, x, state):
        """The decode step from the projections to o_proj's input in two Triton launches (the input projections in
        one: q, k, v, f_a, g_a and b_proj for a batch of at most FUSED_PROJECTION_ROWS, else the three small ones;
        then kimi_linear_kernels.kda_decode_layer: f_b, the step, the gated output norm), or None where they do not
        serve (the kernels not installed or not on CUDA, adapters on the small projections, autograd): _decode runs."""
        fast = _kda_backend(x)
        of_x = (self.f_a_proj, self.g_a_proj, self.b_proj)
        if (
            fast is None
            or not _plain_linears(x, *of_x, self.f_b_proj, self.g_b_proj)
            or type(self.o_norm) is not KimiLinearGatedRMSNorm
        ):
            return None
        x = x.contiguous()
        big = (self.q_proj, self.k_proj, self.v_proj)
        if x.shape[0] <= FUSED_PROJECTION_ROWS and _plain_linears(x, *big):
            xq, xk, xv, fa, ga, b_raw = fast.projections(x, *(m.weight for m in big + of_x))
        else:  # adapters on q/k/v run through their modules; larger batches read each weight once through cuBLAS
            fa, ga, b_raw = fast.projections(x, *(m.weight for m in of_x))
            xq, xk, xv = (m(x) for m in big)
        o = fast.kda_decode_layer(
            xq, xk, xv, *state.conv,
            self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight,
            fa, self.f_b_proj.weight, self.A_log, self.dt_bias, b_raw, state.recurrent,
            ga, self.g_b_proj.weight, self.o_norm.weight, self.o_norm.variance_epsilon,
        )  # fmt: skip
        state.seen += 1
        return o

    def _decode(self, x, state):
        """One token per sequence, x [B, hidden]: conv windows and recurrent state are updated in place."""
        fast = _kda_backend(x)
        step = fast.kda_decode_fused if fast is not None else kda_decode_torch
        o = step(
            self.q_proj(x), self.k_proj(x), self.v_proj(x), *state.conv,
            self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight,
            self.f_b_proj(self.f_a_proj(x)), self.A_log, self.dt_bias, self.b_proj(x), state.recurrent,
        )  # fmt: skip
        state.seen += 1
        return o


# ---------------------------------------------------------------------------------------------------------------
# MLA layer (NoPE)
# ---------------------------------------------------------------------------------------------------------------
class _PlanState(threading.local):
    """Per thread (cuDNN's plans are kept per thread): keys, the MLA prefill attention shapes this thread has run
    through SDPA; rent, per shape without a plan, the milliseconds its Triton runs are estimated to have cost over
    cuDNN's kernel."""

    def __init__(self):
        self.keys = set()
        self.rent = {}


_PLANS = _PlanState()


class _PrefillClock:
    """The start events of an inference prefill's layers on CUDA, recorded by KimiLinearModel.forward where an MLA
    layer's attention shape has no cuDNN plan yet; an MLA layer reads from them how much GPU work is queued ahead."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.events = []

    def layer_start(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.events.append(ev)

    def queued_ms(self):
        """Milliseconds of GPU work ahead of the current layer's next launch: the layers from the one the GPU is in
        to this one, at the mean time of those it has finished, less how far it is into its current one (host and
        GPU clocks taken to meet at the first layer's start, where a prefill finds the GPU idle; where it was not,
        this reads less work than there is). 0 once the GPU has reached this layer, and at the second layer (no layer
        timed yet: waiting for one would drain the GPU's queue)."""
        ev = self.events
        i = len(ev) - 1
        if i < 2 or ev[i].query():
            return 0.0
        while not ev[1].query():  # the first layer's time is the first measure; the GPU has it queued meanwhile
            time.sleep(2e-4)
        if ev[i].query():
            return 0.0
        c = next(j for j in range(i - 1, 0, -1) if ev[j].query())  # the layer the GPU is in
        done = ev[0].elapsed_time(ev[c])
        into = (time.perf_counter() - self.t0) * 1e3 - done
        return max(0.0, (i - c) * done / c - max(0.0, into))


_PREFILL_CLOCK = contextvars.ContextVar("kimi_linear_prefill_clock", default=None)


class KimiMLAAttention(nn.Module):
    def __init__(self, config: KimiLinearConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.q_head_dim = self.nope + self.rope
        self.scaling = self.q_head_dim**-0.5
        hidden, h = config.hidden_size, self.num_heads
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, h * self.q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=False)
            self.q_a_layernorm = KimiLinearRMSNorm(config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, h * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = KimiLinearRMSNorm(self.kv_lora_rank)  # eps 1e-6, as released
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, hidden, bias=False)

    def query(self, x):
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _input_projections(self, x):
        """q (heads not yet split) and kv_a_proj_with_mqa(x). A one-token step of at most FUSED_PROJECTION_ROWS rows
        takes both in one Triton launch (kimi_linear_kernels.projections) where they are plain layers; otherwise q_proj
        and kv_a go through _products."""
        B, T, _ = x.shape
        fast = _triton_kernels(x) if T == 1 and B <= FUSED_PROJECTION_ROWS and hasattr(self, "q_proj") else None
        if fast is not None and _plain_linears(x, self.q_proj, self.kv_a_proj_with_mqa):
            q, kv_a = fast.projections(x[:, 0], self.q_proj.weight, self.kv_a_proj_with_mqa.weight)
            return q[:, None], kv_a[:, None]
        q = _products(x, self.q_proj, wide=True)[0] if hasattr(self, "q_proj") else self.query(x)
        return q, *_products(x, self.kv_a_proj_with_mqa)

    def forward(self, x, state=None, mask=None):
        """x [B, T, hidden]; state: this layer's MLALayerState or None; mask: boolean [B, 1, T, cached + T]
        (True = attend; attention_mask()) or None for plain causal attention."""
        B, T, _ = x.shape
        h = self.num_heads
        q, kv_a = self._input_projections(x)
        q = q.view(B, T, h, self.q_head_dim).transpose(1, 2)  # [B, h, T, 192]
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(c_kv), k_pe], dim=-1)  # [B, T, 576]
        span = None
        if state is not None:
            latent = state.append(latent)  # [B, past_len + T, 576]
            span = state.span
        S = latent.shape[1]
        # Decode (and a short continuation of a long cache) attends on the latents directly (kv_b_proj absorbed);
        # prefill expands per head, where flash attention takes the 192/128 head dims (the latent path's 576 would
        # leave SDPA a kernel that materialises [T, S] scores). Absorption reads kv_b_proj.weight, so it is
        # skipped when an adapter wraps kv_b_proj.
        if type(self.kv_b_proj) is nn.Linear and T <= 64 and T * 8 <= S:
            out = self._attend_latent(q, latent, mask, span)
        else:
            out = self._attend_expanded(q, latent, mask)
        out = out.transpose(1, 2).reshape(B, T, h * self.v_dim)
        return _products(out, self.o_proj, wide=True)[0]

    # Inference past this many keys attends block by block (key_block keys per call, queries in pieces of as many),
    # merged by log-sum-exp: one call over a 512k-token cache of 32 heads indexes past 2^31 elements (an illegal
    # memory access in the attention kernel on an H100) and expands every cached token at once.
    key_block = 1 << 17

    def _expand(self, latent):
        """Per-head keys [B, h, S, 192] and values [B, h, S, 128] from latents [B, S, 576]; kv_b_proj as a prefill's
        wide projection (_products; a decode step comes here only with fewer than 8 latents cached)."""
        B, S, _ = latent.shape
        h = self.num_heads
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope], dim=-1)
        (kv,) = _products(c_kv, self.kv_b_proj, wide=True)
        kv = kv.view(B, S, h, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        return torch.cat([k_nope, k_pe[:, None].expand(B, h, S, self.rope)], dim=-1), v

    # An inference prefill on CUDA attends over its length rounded up to a multiple of this many tokens: zero
    # latents at the end, which causal attention hides from every real query, and rows that are dropped. cuDNN's
    # attention builds a plan per shape (50-70 ms of host time on an H100, a stall where less GPU work is queued:
    # 25-50% of a 32k-token prompt of a new length); rounded, one plan serves 1024 lengths. At most 1023 extra rows:
    # under 1% of the attention's time at 32k tokens. 1 turns it off.
    prefill_granule = 1024

    # A prefill whose rounded shape has no cuDNN plan yet (on this thread: PyTorch keeps them per thread) runs the
    # Triton kernel (kimi_linear_kernels.mla_prefill_attention: nothing built per length, 1.16-1.37x cuDNN's time
    # on an H200) at each layer where the model's _PrefillClock finds less GPU work queued ahead than a build takes,
    # and lets cuDNN build its plan at the first layer where more is queued, hidden behind that work (at 32k tokens
    # the bench model's 4th layer has 29-50 ms ahead of it, its 8th 78-86 ms). From then on that shape runs cuDNN's
    # kernel. A build took 50-70 ms of host time on one lent H100 host, 150-180 ms on an H200 host: plan_build_ms
    # starts above both and becomes the longest build this process has timed (_note_build).
    plan_build_ms = 200.0
    _builds_timed = False
    # (rounded length, host ms) of every SDPA call that could build a plan, in order (one per shape and thread): what
    # a first call paid for its plans (benchmarks/cold_start.py lists them per call)
    builds = []

    # A shape that keeps coming back without a plan (its builds never hidden: shorter prompts, a slow host) does not
    # stay on the Triton kernel for good: each of its Triton runs is charged the time it is estimated to cost over
    # cuDNN's (rent_fraction of the attention's FLOPs at attention_tflops), and once that rent reaches the stall a
    # build would cost at a layer (plan_build_ms less the work queued ahead) the plan is built there. The stall is
    # then at most what the Triton runs have cost that shape, and the shape's total extra time stays within twice
    # the cheaper of never building and building at once (the rule of renting skis until the rent reaches the price).
    # The first prompt of a shape never stalls.
    rent_fraction = 0.25  # the Triton kernel's time over cuDNN's, less one (kernels/mla_prefill.py)
    attention_tflops = 600.0  # cuDNN's rate at this shape on an H200: 590-660 TFLOP/s

    def _rent_triton(self, q, key, queued_ms):
        """Whether this layer runs the Triton kernel (True, its estimated extra time charged to the shape) or builds
        the plan (False: the stall it costs, plan_build_ms - queued_ms, is at most the shape's rent so far)."""
        rent = _PLANS.rent
        if self.plan_build_ms - queued_ms <= rent.get(key, 0.0):
            rent.pop(key, None)
            return False
        B, h, T, d = q.shape
        flops = B * h * T * T * (d + self.v_dim)  # causal: half of 2 T^2 (d + d_v) per head
        rent[key] = rent.get(key, 0.0) + self.rent_fraction * flops / (self.attention_tflops * 1e9)
        return True

    @classmethod
    def _note_build(cls, ms, rows):
        """A plan build of ms milliseconds of host time for a rounded length of rows: the first timed replaces
        plan_build_ms, later ones raise it."""
        cls.builds.append((rows, ms))
        if ms >= 10:  # shorter: SDPA found a plan of its own (or is not cuDNN's), nothing was built
            cls.plan_build_ms = max(cls.plan_build_ms, ms) if cls._builds_timed else ms
            cls._builds_timed = True

    def _plan_key(self, device, dtype, B, T):
        return (device, dtype, B, T + (-T % self.prefill_granule), self.num_heads, self.q_head_dim, self.v_dim)

    def _attend_expanded(self, q, latent, mask):
        T, S = q.shape[2], latent.shape[1]
        causal_only = mask is None or isinstance(mask, CausalBias)  # no padding: causal, aligned bottom right
        if S > self.key_block and causal_only and not torch.is_grad_enabled():
            return self._attend_blocked(q, latent)
        padded = mask is None and S == T > 1 and q.is_cuda and not torch.is_grad_enabled()  # causal: pads stay hidden
        if padded and _PADDED_PREFILL.get() is not None:  # a prefill graph: the Triton kernel, no plan per shape
            fast = _triton_kernels(q)
            if fast is not None and fast.mla_prefill_serves(q, self.v_dim):
                return fast.mla_prefill_attention(q, *self._expand(latent), self.scaling)
        building = False
        if padded:
            key = self._plan_key(q.device, q.dtype, q.shape[0], T)
            plans = _PLANS.keys
            if key not in plans:
                clock, fast = _PREFILL_CLOCK.get(), _triton_kernels(q)
                if (
                    clock is not None
                    and fast is not None
                    and fast.mla_prefill_serves(q, self.v_dim)
                    and self._rent_triton(q, key, clock.queued_ms())
                ):
                    return fast.mla_prefill_attention(q, *self._expand(latent), self.scaling)
                plans.add(key)
                building = True
        pad = -T % self.prefill_granule if padded else 0
        if pad:  # in [B, T, heads, dim] memory, as the unpadded q
            q = F.pad(q.transpose(1, 2), (0, 0, 0, 0, 0, pad)).transpose(1, 2)
            latent = F.pad(latent, (0, 0, 0, pad))
        k, v = self._expand(latent)
        is_causal = mask is None and T > 1
        start = time.perf_counter() if building else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scaling)
        if building:
            self._note_build((time.perf_counter() - start) * 1e3, q.shape[2])
        return out[:, :, :T] if pad else out

    def _attend_blocked(self, q, latent):
        """Causal attention of the last T positions of S (no padding) in blocks of at most key_block keys: each piece
        of queries attends to every earlier key block in full and to itself causally; the blocks' outputs are merged
        by their log-sum-exp."""
        T, S, step = q.shape[2], latent.shape[1], self.key_block
        out = []
        for t0 in range(0, T, step):
            qp = q[:, :, t0 : t0 + step]
            start = S - T + t0  # the piece's first position
            blocks = [(s, min(s + step, start), False) for s in range(0, start, step)]
            blocks.append((start, start + qp.shape[2], True))  # the piece itself, causally
            o = lse = None
            for s0, s1, causal in blocks:
                k, v = self._expand(latent[:, s0:s1])
                ob, lb = _attention_lse(qp, k, v, causal, self.scaling)
                if o is None:
                    o, lse = ob.float(), lb
                    continue
                new = torch.logaddexp(lse, lb)
                o = o * (lse - new).exp()[..., None] + ob.float() * (lb - new).exp()[..., None]
                lse = new
            out.append(o.to(q.dtype))
        return torch.cat(out, dim=2)

    def _attend_latent(self, q, latent, mask, span=None):
        h = self.num_heads
        w = self.kv_b_proj.weight.view(h, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [h, 128, 512], [h, 128, 512]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_lat = torch.cat([torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk), q_pe], dim=-1)  # [B, h, T, 576]
        if q.shape[2] == 1:
            o_lat = self._attend_one(q_lat[:, :, 0], latent, mask, span)  # [B, h, 512]
            return torch.einsum("bhr,hvr->bhv", o_lat, w_uv)[:, :, None]
        key = latent[:, None]  # [B, 1, S, 576], shared by all heads
        value = latent[:, None, :, : self.kv_lora_rank]
        is_causal = mask is None and q.shape[2] > 1
        o_lat = F.scaled_dot_product_attention(
            q_lat,
            key.expand(-1, h, -1, -1),
            value.expand(-1, h, -1, -1),
            attn_mask=mask,
            is_causal=is_causal,
            scale=self.scaling,
        )  # [B, h, T, 512]
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)

    # Decode attention through kimi_linear_kernels.mla_decode_attention (one pass over the latents, split over the
    # cache, all heads at once) where the kernels serve, instead of the two batched products below (on the H100
    # 1.9x faster at 128k tokens, 2.8x at 512k, even at 8k). False on the class or a layer keeps the products.
    decode_kernel = True

    def _attend_one(self, q_lat, latent, mask, span=None):
        """One query per row: q_lat [B, h, 576] against the shared latents [B, S, 576]; mask [B, 1, 1, S] (True =
        attend) or None; span: the cache's (first, last) slots, the same slots as the mask (see
        MLALayerState.bounds), for the one-pass kernel, which reads only those. Returns [B, h, 512]. Two batched
        products read the latents once for all heads (SDPA would take them once per head); scores and softmax in
        float32."""
        fast = _triton_kernels(latent) if self.decode_kernel else None
        if fast is not None and _no_autograd(q_lat, latent):
            if span is not None:
                return fast.mla_decode_attention(q_lat, latent, None, self.scaling, self.kv_lora_rank, span=span)
            keep = mask[:, 0, 0] if mask is not None else None
            return fast.mla_decode_attention(q_lat, latent, keep, self.scaling, self.kv_lora_rank)
        scores = _bmm_float32(q_lat, latent.transpose(1, 2)) * self.scaling  # [B, h, S]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        return torch.bmm(scores.softmax(-1).to(latent.dtype), latent[..., : self.kv_lora_rank])


_CUDNN_LSE = [None]  # cuDNN attention's log-sum-exp: None until checked against the memory-efficient kernel's


def _lse_cudnn(q, k, v, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
    return out, lse.reshape(*q.shape[:2], -1)[..., : q.shape[2]].float()


def _lse_efficient(q, k, v, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., : q.shape[2]]


def _attention_lse(q, k, v, causal, scale):
    """Attention output [B, h, T, Dv] and its log-sum-exp [B, h, T] (float32) for one key block; causal: top-left
    aligned (the block holds the queries' own positions). CUDA half types use cuDNN's attention kernel (what SDPA
    picks for MLA's 192/128 head dims on an H100, about 600 TFLOP/s there) once its log-sum-exp has matched the
    memory-efficient kernel's (about 130 TFLOP/s) on a small slice, else that one; elsewhere float32 math."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        if _CUDNN_LSE[0] is None:
            small = (q[:1, :, :64], k[:1, :, :64], v[:1, :, :64], causal, scale)
            try:
                agree = torch.allclose(_lse_cudnn(*small)[1], _lse_efficient(*small)[1], atol=1e-2, rtol=1e-3)
                why = "its log-sum-exp disagrees with the memory-efficient kernel's"
            except RuntimeError as err:
                agree, why = False, str(err)
            _CUDNN_LSE[0] = agree
            if not agree:
                logger.warning_once(f"Kimi Linear: long-context attention blocks use the memory-efficient kernel, not "
                                    f"cuDNN ({why}); slower, same result")  # fmt: skip
        if _CUDNN_LSE[0]:
            try:
                return _lse_cudnn(q, k, v, causal, scale)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:  # a shape cuDNN does not take: the memory-efficient kernel from now on
                _CUDNN_LSE[0] = False
                logger.warning_once(f"Kimi Linear: long-context attention blocks leave cuDNN ({err})")
        return _lse_efficient(q, k, v, causal, scale)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.matmul((scores - lse[..., None]).exp(), v.float()), lse


_BMM_OUT_DTYPE = [True]  # torch.bmm(..., out_dtype=float32) on CUDA half types, until it fails once


def _bmm_float32(a, b):
    """a @ b (batched) with float32 output. Half-precision CUDA inputs keep their dtype (no float32 copy of b, which
    can be every cached latent) where torch.bmm takes out_dtype; elsewhere half inputs are upcast on the CPU, and on
    a CUDA torch without out_dtype the product is rounded to the inputs' dtype."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.bmm(a, b)
    if not a.is_cuda:
        return torch.bmm(a.float(), b.float())
    if _BMM_OUT_DTYPE[0]:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError) as err:
            _BMM_OUT_DTYPE[0] = False
            why = f"torch.bmm has no float32 output for {a.dtype} here ({err})"
            logger.warning_once(f"Kimi Linear: {why}; MLA decode scores are rounded to {a.dtype} before the softmax.")
    return torch.bmm(a, b).float()


def build_attention_mask(key_mask, T, S, device, segs=None):
    """Boolean [B, 1, T, S] mask (True = attend) for T queries at the end of S keys, None when a plain causal mask
    (or none, for T == 1) says it all, or torch's lower-right causal bias when only a cached prefix precedes the
    queries. key_mask [B, S] marks real tokens (None when none is padded: it is not checked here, which would
    cost a host sync); segs (packed documents, S == T) confines each token to its own
    document. Each query always sees itself, so no row is empty."""
    if segs is None and key_mask is None:
        if T == 1 or T == S:
            return None
        # T new queries after S - T cached keys: causal aligned to the bottom right, never materialised as [T, S]
        # (a chunked prefill of a million tokens would otherwise build terabytes of mask)
        return causal_lower_right(T, S)
    qpos = torch.arange(S - T, S, device=device)[:, None]
    kpos = torch.arange(S, device=device)[None, :]
    allowed = (kpos <= qpos)[None]  # [1, T, S]
    if segs is not None:
        doc = segs.scatter(segs.seq_of_token + 1) - 1  # [B, T]: -1 at padding
        allowed = allowed & (doc[:, :, None] == doc[:, None, :]) & (doc[:, None, :] >= 0)
    elif key_mask is not None:
        allowed = allowed & key_mask[:, None, :].bool()
    return (allowed | (kpos == qpos))[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Feed-forward: dense MLP, router, MoE
# ---------------------------------------------------------------------------------------------------------------
class KimiLinearMLP(nn.Module):
    def __init__(self, config: KimiLinearConfig, intermediate_size=None):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    # Up to this many tokens (a decode step), on CUDA and outside autograd, the MLP runs as two fused
    # matrix-vector launches (kimi_linear_kernels.moe_experts); more tokens take the matrix products below.
    few_tokens = 4

    def forward(self, x, add=None):
        """The MLP of x [..., hidden]; plus `add` (same shape) when given."""
        fast = _triton_kernels(x)
        mods = (self.gate_proj, self.up_proj, self.down_proj)
        if fast is not None and x.numel() <= self.few_tokens * x.shape[-1] and _plain_linears(x, *mods):
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            extra = add.reshape(flat.shape).contiguous() if add is not None else None
            out = fast.moe_experts(flat, *(m.weight for m in mods), add=extra)
            return out.view(x.shape)
        gate, up = _products(x, self.gate_proj, self.up_proj, wide=True)
        out = _products(F.silu(gate) * up, self.down_proj, wide=True)[0]
        return out if add is None else add + out


class KimiLinearExpert(nn.Module):
    """One routed expert, in the released names: w1 gate, w3 up, w2 down."""

    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)
        self.w2 = nn.Linear(config.moe_intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class KimiLinearRouter(nn.Module):
    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        self.top_k = config.num_experts_per_token
        self.num_experts = config.num_experts
        self.groups = config.num_expert_group if config.use_grouped_topk else 1
        self.topk_group = config.topk_group if config.use_grouped_topk else 1
        self.activation = config.moe_router_activation_func
        self.renormalize = config.moe_renormalize
        self.scaling = config.routed_scaling_factor
        self.bias_in_weights = config.moe_router_bias_in_weights
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.num_experts), requires_grad=False)

    def forward(self, x):
        """x [N, hidden] -> expert ids [N, k] and weights [N, k] (float32)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.activation == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias.float()  # picks experts only
        if self.groups > 1:
            grouped = choice.view(-1, self.groups, self.num_experts // self.groups)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, groups]
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, self.num_experts)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = (choice if self.bias_in_weights else scores).gather(1, ids)
        if self.renormalize and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


# torch._grouped_mm multiplies each expert's rows by that expert's weight in one call. It takes float32, bfloat16 and
# float16 with 16-byte-aligned rows; on CUDA only bfloat16 on sm90/sm100 runs a fused kernel with the offsets read
# on the device, other CUDA dtypes take torch's per-group fallback, which reads them on the host.
_grouped_mm = getattr(torch, "_grouped_mm", None)


def _grouped_mm_takes(dtype, *widths):
    return dtype in (torch.float32, torch.bfloat16, torch.float16) and all(w * dtype.itemsize % 16 == 0 for w in widths)


@functools.cache
def _cpu_half_products_slow(dtype):
    """Whether this CPU multiplies matrices of this half type without native support (bfloat16 without AVX512-BF16
    or AMX, float16 without AMX-FP16): several times slower than float32 there."""
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        native = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    elif dtype == torch.float16:
        native = ("_is_amx_fp16_supported",)
    else:
        return False
    return not any(getattr(cpu, name, lambda: True)() for name in native)


@functools.cache
def _grouped_mm_runs(device_type, dtype):
    """Whether this torch build runs torch._grouped_mm on this device type and dtype (found once, by trying)."""
    if _grouped_mm is None:
        return False
    try:
        a, b = torch.zeros(2, 8, dtype=dtype, device=device_type), torch.zeros(2, 8, 8, dtype=dtype, device=device_type)
        _grouped_mm(a, b.transpose(1, 2), offs=torch.tensor([1, 2], dtype=torch.int32, device=device_type))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def moe_experts_loop(x, ids, weights, experts):
    """Routed experts one at a time: the reference for moe_experts_grouped, and the path for experts whose
    projections an adapter wraps or whose dtype or widths torch._grouped_mm does not take.

    x [N, hidden], ids [N, k] expert ids, weights [N, k] float32, experts: the KimiLinearExpert modules.
    Returns sum_j weights[:, j] * experts[ids[:, j]](x), [N, hidden] in x's dtype. Reads the token count of every
    expert on the host (a device sync) and launches work for each expert that has tokens."""
    order = ids.flatten().argsort(stable=True)
    token = order // ids.shape[1]
    counts = torch.bincount(ids.flatten(), minlength=len(experts)).tolist()
    out = torch.zeros_like(x)
    ends = list(itertools.accumulate(counts))
    for e, (start, stop) in enumerate(zip([0, *ends], ends)):
        if start == stop:
            continue
        rows = token[start:stop]
        y = experts[e](x[rows]) * weights.flatten()[order[start:stop], None].to(x.dtype)
        out.index_add_(0, rows, y)
    return out


def moe_experts_grouped(x, ids, weights, w13, w2, lora=None):
    """The sum moe_experts_loop computes, as grouped matrix products over the (token, slot) assignments sorted by
    expert: no per-expert loop, no host sync, every shape fixed by N, k and the weights.

    x, ids, weights as in moe_experts_loop; w13 [E, 2I, hidden] holds each expert's w1 rows then its w3 rows,
    w2 [E, hidden, I] (nn.Linear layouts). The group ends come from searchsorted on the sorted ids (bincount would
    read its maximum on the host); the k expert outputs of a token are summed with their weights, in a fixed
    order (no atomic adds). lora: ExpertAdapters (LoRA on every expert's w1, w3 and w2), added as PEFT adds them."""
    N, k = ids.shape
    E, _, H = w13.shape
    expert, order = ids.flatten().sort(stable=True)  # [N*k] assignments grouped by expert
    ends = torch.searchsorted(expert, torch.arange(E, device=ids.device), right=True, out_int32=True)  # [E]
    xs = x.index_select(0, order // k)  # [N*k, hidden]
    h13 = _grouped_mm(xs, w13.transpose(1, 2), offs=ends)  # [N*k, 2I]
    if lora is not None:
        h13 = lora.apply(h13, xs, (0, 1), expert, ends)
    gate, up = h13.chunk(2, dim=-1)  # [N*k, I] each
    h = F.silu(gate) * up
    ys = _grouped_mm(h, w2.transpose(1, 2), offs=ends)  # [N*k, hidden]
    if lora is not None:
        ys = lora.apply(ys, h, (2,), expert, ends)
    ys = torch.empty_like(ys).index_copy_(0, order, ys).view(N, k, H)  # back in (token, slot) order
    # weighted sum over the k slots elementwise: as a batched product of N [1, k] x [k, H] matrices (and its
    # backward) it took a tiny-matrix GEMM kernel about 0.7 ms per layer at 4096 tokens on an H100
    return (ys * weights.to(ys.dtype).unsqueeze(-1)).sum(1)


def moe_experts_gathered(x, ids, weights, w13, w2):
    """The sum moe_experts_grouped computes, for a few tokens: each (token, slot) takes its expert's weights by
    indexing and applies them in a batched product. No host sync on any device or dtype, every shape fixed by N and
    k, at the cost of a copy of N*k experts' weights. Arguments as in moe_experts_grouped."""
    N, k = ids.shape
    chosen = ids.flatten()  # [N*k]
    xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [N*k, hidden, 1], (token, slot) order
    gate, up = torch.bmm(w13[chosen], xs).squeeze(-1).chunk(2, dim=-1)  # [N*k, I] each
    ys = torch.bmm(w2[chosen], (F.silu(gate) * up).unsqueeze(-1)).view(N, k, -1)  # [N, k, hidden]
    return torch.bmm(weights.to(ys.dtype).unsqueeze(1), ys).squeeze(1)


class ExpertAdapters:
    """Vanilla LoRA (PEFT's) on every routed expert's w1, w3 and w2, stacked per projection for grouped products:
    A[j] [E, r, in], B[j] [E, out, r] for j = 0 (w1), 1 (w3), 2 (w2); one scaling and dropout probability for all.
    Stacked again each forward (differentiable: every expert's adapter gets its gradient, zero where no token went).
    A rank whose rows torch._grouped_mm does not take (not a multiple of 16 bytes) is padded with zero rows of A and
    zero columns of B: B A is unchanged, and so are the products (the zeros add exact zeros) and the gradients."""

    def __init__(self, parts, training):
        experts, (r, dtype) = len(parts) // 3, (parts[0][0].shape[0], parts[0][0].dtype)
        pad = -r % (16 // dtype.itemsize)
        self.A = [torch.stack([parts[3 * e + j][0] for e in range(experts)]) for j in range(3)]
        self.B = [torch.stack([parts[3 * e + j][1] for e in range(experts)]) for j in range(3)]
        if pad:
            self.A = [F.pad(a, (0, 0, 0, pad)) for a in self.A]
            self.B = [F.pad(b, (0, pad)) for b in self.B]
        self.scaling, self.p = parts[0][2], parts[0][3]
        self.training = training

    @staticmethod
    def of(modules, training):
        """ExpertAdapters for the projections [w1 0, w3 0, w2 0, w1 1, ...], None when none carries an active
        adapter, False when the grouped path cannot reproduce them (another adapter kind, several active adapters,
        some experts adapted and others not, ranks, scalings or dropouts that differ, a dtype _grouped_mm does not
        take): the loop runs those."""
        parts = [_vanilla_lora(m) for m in modules]
        if all(p is None for p in parts):
            return None
        if any(p is None or p is False for p in parts):
            return False
        first = parts[0]
        dtype, r = first[0].dtype, first[0].shape[0]
        same = all(p[2] == first[2] and p[3] == first[3] and p[0].dtype == dtype and p[0].shape[0] == r for p in parts)
        if not (same and _grouped_mm_takes(dtype) and _grouped_mm_runs(first[0].device.type, dtype)):
            return False
        return ExpertAdapters(parts, training)

    def apply(self, base, x, projections, expert, ends):
        """base [N*k, out] with the adapters of `projections` (0 w1, 1 w3, 2 w2; their outputs side by side in
        base's columns) added for the rows x [N*k, in], sorted by expert (expert: each row's; ends: each expert's end
        row): base + scaling * B_e A_e dropout(x) the way PEFT adds them, the products in the adapters' dtype, one
        rounding to base's. Where the kernels package serves (CUDA, half-precision rows, float32 adapters, no dropout
        while training), its Triton kernels add in place, reading the group bounds on the device only (the float32
        torch._grouped_mm below reads them on the host on CUDA: a sync per product, no CUDA graph)."""
        adapters = [t for j in projections for t in (self.A[j], self.B[j])]
        fast = _triton_kernels(x) if not (self.p and self.training) else None
        if fast is not None and fast.grouped_lora_serves(base, x, adapters, expert, ends):
            return fast.grouped_lora_add_(base, x, adapters, self.scaling, expert, ends)
        delta = torch.cat([self.delta(x, j, ends) for j in projections], dim=-1)
        return (base + delta * self.scaling).to(base.dtype)

    def delta(self, x, j, ends):
        """B_e A_e dropout(x) for each row's expert, in the adapters' dtype (unscaled)."""
        x = F.dropout(x.to(self.A[j].dtype), self.p, self.training) if self.p else x.to(self.A[j].dtype)
        return _grouped_mm(_grouped_mm(x, self.A[j].transpose(1, 2), offs=ends), self.B[j].transpose(1, 2), offs=ends)


def _vanilla_lora(module):
    """For an expert projection: None when it is a plain nn.Linear or its adapters do nothing now (disabled, merged,
    none active); (A weight, B weight, scaling, dropout p) for one active vanilla LoRA adapter on an nn.Linear;
    False for anything else."""
    if type(module) is nn.Linear:
        return None
    base = getattr(module, "base_layer", None)
    if type(base) is not nn.Linear or not hasattr(module, "lora_A"):
        return False
    if module.disable_adapters or module.merged:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return None
    name = active[0]
    A, B, drop = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
    variant = name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False)
    if len(active) > 1 or variant or A.bias is not None or B.bias is not None:
        return False
    p = 0.0 if isinstance(drop, nn.Identity) else drop.p if type(drop) is nn.Dropout else None
    return False if p is None else (A.weight, B.weight, module.scaling[name], p)


@functools.cache
def _grouped_mm_reads_offsets_on_host(device, dtype):
    """Whether torch._grouped_mm takes its per-group fallback (offsets read on the host: a sync, and a step that no
    CUDA graph can capture) for this CUDA device and dtype: everything but bfloat16 on sm90/sm100."""
    return device.type == "cuda" and not (
        dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)
    )


class _StackedExperts(torch.autograd.Function):
    """A stacked weight tensor, as a function of the expert parameters that are views of it: forward returns it
    without a copy, backward hands each parameter its slice of the gradient. Parameters are given in the order
    their blocks appear along the stacked tensor's first two dimensions (w1 0, w3 0, w1 1, ... or w2 0, w2 1, ...)."""

    @staticmethod
    def forward(ctx, stacked, *params):
        return stacked.view_as(stacked)

    @staticmethod
    def backward(ctx, grad):
        parts = grad.reshape(len(ctx.needs_input_grad) - 1, -1, grad.shape[-1]).unbind(0)
        return None, *(g if need else None for g, need in zip(parts, ctx.needs_input_grad[1:]))


def _stacked_weights_gone(module_ref, ptrs):
    module = module_ref()
    if module is not None and module._stacked is not None and module._stacked[2] is ptrs:
        module._stacked = None


class KimiLinearMoE(nn.Module):
    """Router, routed experts and shared expert.

    The routed experts keep the released layout (experts.{e}.w1/w2/w3, one nn.Linear each) and run as grouped
    matrix products (moe_experts_grouped). For that, the first forward copies their weights into two stacked
    tensors and makes every expert parameter a view of them, so no copy is made per step and optimizers,
    load_state_dict and in-place edits write straight into the stacked tensors. Each forward checks that every
    expert projection is still an nn.Linear (or a LoRA wrapper's base nn.Linear) whose weight lives at its place in
    the stacked tensors, and stacks again (one copy) where a parameter was replaced (.to(), loading by assignment,
    merging an adapter). Experts carrying PEFT LoRA adapters run grouped too (ExpertAdapters: the adapters stacked
    per projection, their terms added as PEFT adds them); other adapter kinds, and adapters on some experts only,
    run through moe_experts_loop, which calls each wrapped module. Set `grouped` to False to force
    moe_experts_loop. On CUDA, where torch._grouped_mm would read its group offsets on the host (every dtype but
    bfloat16 on sm90/sm100), up to `gather_max_tokens` tokens run through moe_experts_gathered instead (the loop,
    with adapters), so that a decode step never syncs and can be captured in a CUDA graph; where the kernels
    package's Triton kernels serve, a decode step's routed experts run there instead (_few_token_kernels). With
    `train_every_expert` set (multi-process training does), every trainable routed-expert parameter joins the graph
    through a zero-weighted term on the loop path: an expert no token picked gets a zero gradient instead of none,
    so that every process reduces the same set of gradients (sharded training requires it; on the grouped path
    every stacked adapter gets one anyway)."""

    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        self.gate = KimiLinearRouter(config)
        self.experts = nn.ModuleList(KimiLinearExpert(config) for _ in range(config.num_experts))
        self.shared_experts = (
            KimiLinearMLP(config, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts
            else None
        )
        self.grouped = True
        self.train_every_expert = False
        self.gather_max_tokens = 64  # up to this many tokens, CUDA dtypes without a fused _grouped_mm gather experts
        # (w13, w2, data pointer of every expert weight in _expert_weights' order, finalizer of the first weight)
        self._stacked = None
        # (the experts, each projection's parent dictionary, name and module, each module's parameter dictionary)
        # as the last forward found them, where every projection was a plain nn.Linear; None otherwise
        self._plain = None

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        stacked, lora = self._grouped_weights(flat) if self.grouped else (None, None)
        out = self._few_token_kernels(flat, stacked, lora)
        if out is None:
            out = self._routed(flat, stacked, lora)
        if self.shared_experts is not None:
            return self.shared_experts(x, add=out.view(shape))
        return out.view(shape)

    def _routed(self, flat, stacked, lora):
        """The routed experts' sum for flat [N, hidden]: router, then the grouped products (stacked weights given),
        the gathered experts, or the loop."""
        ids, weights = self.gate(flat)  # [N, k]
        few = flat.shape[0] <= self.gather_max_tokens
        gather = stacked is not None and few and _grouped_mm_reads_offsets_on_host(flat.device, stacked[0].dtype)
        if gather and lora is not None:
            stacked = None  # the gathered few-token path takes no adapters: the loop
        if stacked is None:
            out = moe_experts_loop(flat, ids, weights, self.experts)
            if self.train_every_expert and torch.is_grad_enabled():
                trainable = [p.sum() for p in self.experts.parameters() if p.requires_grad]
                if trainable:
                    out = out + 0.0 * torch.stack(trainable).sum().to(out.dtype)
        else:
            w13, w2 = stacked
            # decode steps (a few tokens) never sync: where _grouped_mm would, the chosen experts are gathered
            x_in = flat.to(w13.dtype)
            if gather:  # (never with adapters: those took the loop above)
                out = moe_experts_gathered(x_in, ids, weights, w13, w2).to(flat.dtype)
            else:
                out = moe_experts_grouped(x_in, ids, weights, w13, w2, lora=lora).to(flat.dtype)
        return out

    def _few_token_kernels(self, flat, stacked, lora):
        """The routed experts of a decode step in Triton (kimi_linear_kernels.route and moe_experts: router and
        chosen experts in three launches; the shared expert's MLP takes its own kernels for a few tokens), or None
        where those kernels do not serve: not CUDA, more (token, expert) pairs than experts (the grouped products
        read each expert once), autograd, no stacked weights (`grouped` off, experts the loop must run), adapters,
        grouped top-k. stacked, lora: _grouped_weights' answer."""
        gate = self.gate
        if stacked is None or lora is not None or flat.shape[0] * gate.top_k > gate.num_experts or gate.groups > 1:
            return None
        fast = _triton_kernels(flat)
        if fast is None or not _no_autograd(flat, gate.weight) or stacked[0].requires_grad:
            return None
        w13, w2 = stacked
        E, I2, H = w13.shape
        halves = w13.view(E, 2, I2 // 2, H)
        flat = flat.contiguous()
        ids, weights = fast.route(flat, gate.weight, gate.e_score_correction_bias, gate.top_k, gate.scaling,
                                  sigmoid=gate.activation == "sigmoid", renormalize=gate.renormalize,
                                  bias_in_weights=gate.bias_in_weights)  # fmt: skip
        return fast.moe_experts(flat, halves[:, 0], halves[:, 1], w2, ids=ids, weights=weights)

    def _expert_projections(self):
        """Every routed expert's projection module, [w1 0, w3 0, w2 0, w1 1, ...]. Runs in every forward that
        _plain_weights does not answer: reads the module dictionaries directly."""
        return [ex._modules[name] for ex in self.experts._modules.values() for name in ("w1", "w3", "w2")]

    def _expert_weights(self, modules=None):
        """Every routed expert's weight in _expert_projections' order (a LoRA wrapper's base layer's), or None when
        some projection is neither an nn.Linear nor an adapter on one."""
        modules = modules or self._expert_projections()
        bases = [m if type(m) is nn.Linear else m._modules.get("base_layer") for m in modules]
        if any(type(b) is not nn.Linear for b in bases):
            return None
        return [b._parameters["weight"] for b in bases]

    def _is_stacked(self, weights):
        return self._stacked is not None and list(map(torch.Tensor.data_ptr, weights)) == self._stacked[2]

    def _plain_weights(self):
        """Every routed expert's weight in _expert_projections' order where the experts and their projections are
        the plain nn.Linear modules the last forward found (no adapter added since), else None. Runs every forward:
        the released model has 768 projections per layer, so its passes run in C (map over cached dictionaries),
        with the pointer check 41-45% of the full check's time (benchmarks/moe_layer.py --baseline)."""
        if self._plain is None:
            return None
        experts, parents, names, modules, params = self._plain
        if list(self.experts._modules.values()) != experts:  # (modules compare by identity)
            return None
        if not all(map(operator.is_, map(dict.get, parents, names), modules)):
            return None
        return list(map(dict.get, params, itertools.repeat("weight")))

    def _grouped_weights(self, x):
        """((w13, w2), adapters) for moe_experts_grouped: the stacked weights, differentiable with respect to the
        expert parameters when autograd needs them and cast like nn.Linear's weights under autocast, and the experts'
        LoRA adapters (ExpertAdapters) or None; (None, None) where moe_experts_loop must run instead."""
        weights, lora = self._plain_weights(), None
        if weights is None or not self._is_stacked(weights):
            modules = self._expert_projections()
            lora = ExpertAdapters.of(modules, self.training)
            weights = self._expert_weights(modules) if lora is not False else None
            if weights is None:
                self._plain = None
                return None, None
            self._plain = self._remember_plain(modules) if lora is None else None
            if not self._is_stacked(weights):
                self._stack(weights)
                if self._stacked is None:
                    return None, None
        w13, w2 = self._stacked[:2]
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            w13 = _StackedExperts.apply(w13, *(w for i, w in enumerate(weights) if i % 3 != 2))
            w2 = _StackedExperts.apply(w2, *weights[2::3])
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            if not (_grouped_mm_takes(dtype, *w2.shape[1:]) and _grouped_mm_runs(x.device.type, dtype)):
                return None, None
            w13, w2 = w13.to(dtype), w2.to(dtype)
        return (w13, w2), lora

    def _remember_plain(self, modules):
        """_plain for these projections (_expert_projections' order), None where some is not a plain nn.Linear."""
        if any(type(m) is not nn.Linear for m in modules):
            return None
        experts = list(self.experts._modules.values())
        parents = [ex._modules for ex in experts for _ in range(3)]
        return experts, parents, ("w1", "w3", "w2") * len(experts), modules, [m._parameters for m in modules]

    def _stack(self, weights):
        """Copy the expert weights into stacked tensors and make each parameter a view of its block (one copy; the
        parameter objects stay, so optimizers and adapters keep them). Each view is exported through DLPack, so it
        owns a storage object of its own: savers that look for tensors sharing a storage (transformers',
        accelerate's, safetensors) see independent tensors, as before. Leaves `_stacked` None where the weights
        cannot be stacked for torch._grouped_mm (a device other than CPU or CUDA, mixed dtypes or devices, a dtype
        or widths it does not take, a torch without it)."""
        self._drop_stacked()
        first, E = weights[0], len(weights) // 3
        I, H = first.shape
        if (
            first.device.type not in ("cpu", "cuda")
            or any(w.dtype != first.dtype or w.device != first.device for w in weights)
            or not _grouped_mm_takes(first.dtype, H, I)
            or not _grouped_mm_runs(first.device.type, first.dtype)
        ):
            return
        # outside inference_mode: stacked tensors made under it could never be used for training; DLPack exports
        # from the current CUDA device only (a layer on another GPU of a split model)
        device = torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext()
        with torch.inference_mode(False), torch.no_grad(), device:
            w13 = torch.empty(E, 2, I, H, dtype=first.dtype, device=first.device)  # [expert, w1 | w3, I, hidden]
            w2 = torch.empty(E, H, I, dtype=first.dtype, device=first.device)
            for i, w in enumerate(weights):
                view = w13[i // 3, i % 3] if i % 3 != 2 else w2[i // 3]
                view.copy_(w)
                w.data = torch.from_dlpack(view)
        ptrs = [w.data_ptr() for w in weights]
        # The stacked tensors are let go when the first expert weight is: hooks that swap parameters in and out
        # around every forward (accelerate's offloading) must not leave a copy of every layer's experts behind.
        gone = weakref.finalize(weights[0], _stacked_weights_gone, weakref.ref(self), ptrs)
        gone.atexit = False
        self._stacked = (w13.view(E, 2 * I, H), w2, ptrs, gone)

    def _drop_stacked(self):
        if self._stacked is not None:
            self._stacked[3].detach()
            self._stacked = None

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() convert parameters one by one: let go of stacked tensors they no longer live in
        # now, not at the next forward (they hold the whole layer's experts).
        super()._apply(fn, recurse)
        weights = self._expert_weights()
        if weights is None or not self._is_stacked(weights):
            self._drop_stacked()
        return self

    def __getstate__(self):  # copies and pickles carry the parameters, not the stacked tensors
        return {**self.__dict__, "_stacked": None, "_plain": None}


# ---------------------------------------------------------------------------------------------------------------
# Decoder layer
# ---------------------------------------------------------------------------------------------------------------
class KimiLinearDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: KimiLinearConfig, layer_idx: int):
        super().__init__()
        self.kind = config.layer_types[layer_idx]
        attn = KimiDeltaAttention if self.kind == KDA else KimiMLAAttention
        self.self_attn = attn(config, layer_idx)
        if config.mlp_types[layer_idx] == "moe":
            self.block_sparse_moe = KimiLinearMoE(config)
        else:
            self.mlp = KimiLinearMLP(config)
        self.input_layernorm = KimiLinearRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = KimiLinearRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, state=None, segs=None, mask=None):
        h = self.input_layernorm(x)
        if self.kind == KDA:
            h = self.self_attn(h, state=state, segs=segs)
        else:
            h = self.self_attn(h, state=state, mask=mask)
        h, x = self.post_attention_layernorm(h, residual=x)  # norm(x + h), x + h
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return x + ffn(h)


def _hooks_of(module):
    """The accelerate hooks on a module (a SequentialHook's parts), [] without."""
    hook = module.__dict__.get("_hf_hook")
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))


def _load_whole_layers(layers, inputs):
    """Make accelerate's offloading load each offloaded decoder layer whole for its forward.

    Offloading (device_map entries "cpu" or "disk" beside a GPU, "disk" on a CPU, accelerate's cpu_offload) hooks every
    module that holds tensors, so that its weights are on the device only during its own forward. A Kimi Linear layer
    reads some weights without calling their module (the short convs' taps, MLA's absorbed kv_b_proj, the fused
    projections and decode steps, the stacked experts), which would see meta tensors there. Each layer offloaded that
    way gets one hook instead, loading all of its tensors before its forward and dropping them after (what accelerate
    does for a class named in `preload_module_classes`; other accelerate hooks inside that layer go with it). Refused,
    naming the layer: weights on the meta device with no hook to load them (unless the inputs are on the meta device
    too: a shape-only run), and a device_map that offloads part of a layer and keeps the rest. A layer without hooks
    costs two dictionary lookups per forward; a hooked one is examined once per hook it carries."""
    if inputs.is_meta:
        return
    for i, layer in enumerate(layers):
        hook = layer.__dict__.get("_hf_hook")
        hooked = hook is not None or "_hf_hook" in layer.input_layernorm.__dict__
        if not hooked and not layer.input_layernorm.weight.is_meta:
            continue  # resident, no hooks
        if hooked and layer.__dict__.get("_kimi_examined", False) is hook:
            continue  # examined with the hook it carries now
        _place_layer(i, layer)
        layer.__dict__["_kimi_examined"] = layer.__dict__.get("_hf_hook")


def _place_layer(i, layer):
    """_load_whole_layers for one layer whose placement is not known yet."""
    if any(getattr(h, "offload", False) and getattr(h, "place_submodules", False) for h in _hooks_of(layer)):
        return  # already loaded whole
    params = list(layer.parameters())
    meta = sum(p.is_meta for p in params)
    if meta == 0:
        return  # resident (a layer on one GPU of several has hooks that only move its inputs)
    leaves = [(name, h) for name, m in layer.named_modules() for h in _hooks_of(m)
              if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None]  # fmt: skip
    if not leaves:
        raise RuntimeError(
            f"Kimi Linear: layer {i}'s weights are on the meta device and no offloading hook loads them. Load the "
            "model with from_pretrained (device_map= and offload_folder= to offload), or fill the weights first "
            "(load_state_dict(..., assign=True), or accelerate's load_checkpoint_and_dispatch)."
        )
    if meta < len(params):
        raise RuntimeError(
            f"Kimi Linear: the device_map offloads part of layer {i} and keeps the rest on a device; the layer reads "
            f"weights across its modules, so it is offloaded or placed whole. Map `model.layers.{i}` as one entry "
            "(device_map='auto' does)."
        )
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
    from accelerate.utils import PrefixedDataset

    name, hook = leaves[0]
    prefix = hook.weights_map.prefix  # the module's full name and a dot
    prefix = prefix[: len(prefix) - len(name) - 1] if name else prefix
    for m in layer.modules():
        remove_hook_from_module(m)
        bound = m.__dict__.get("forward")
        if getattr(bound, "__func__", None) is type(m).forward:
            del m.forward  # the class's forward again (the fused paths check for wrapped modules)
    add_hook_to_module(layer, AlignDevicesHook(
        execution_device=hook.execution_device, offload=True,
        weights_map=PrefixedDataset(hook.weights_map.dataset, prefix), offload_buffers=hook.offload_buffers,
        place_submodules=True, skip_keys=hook.skip_keys, tied_params_map=hook.tied_params_map,
    ))  # fmt: skip
    logger.info(f"Kimi Linear: layer {i} is offloaded; it now loads whole for its forward")


# ---------------------------------------------------------------------------------------------------------------
# Cache: KDA states and MLA latents
# ---------------------------------------------------------------------------------------------------------------
class KDALayerState:
    """One KDA layer: the three conv windows [B, D, W-1] and the recurrent state [B, H, K, V] in float32."""

    is_sliding = False
    is_compileable = False

    def __init__(self):
        self.conv, self.recurrent, self.seen = None, None, 0

    @property
    def is_initialized(self):
        return self.recurrent is not None

    def update(self, conv, recurrent, num_tokens):
        # contiguous copies: decode updates these in place
        self.conv = tuple(c.contiguous() for c in conv)
        self.recurrent = recurrent.float().contiguous()
        self.seen += num_tokens

    def get_seq_length(self):
        return self.seen

    def tensors(self):
        return [*self.conv, self.recurrent] if self.recurrent is not None else []

    def apply(self, fn):  # fn: tensor -> tensor along the batch dimension
        if self.recurrent is not None:
            self.conv = tuple(fn(c) for c in self.conv)
            self.recurrent = fn(self.recurrent)


class MLALayerState:
    """One MLA layer: the compressed latents [B, S, kv_lora_rank + qk_rope_head_dim] (c_kv after its norm, then
    k_pe), in a buffer that grows by doubling so appends are amortised O(1)."""

    is_sliding = False
    is_compileable = False
    bounds = None  # set by the cache: (first [B], last [1]) slots of a decode step's token, or None (the mask rules)
    span = None  # after a decode step's append: the bounds, which the one-pass attention kernel reads

    def __init__(self):
        self.buffer, self.seen = None, 0

    @property
    def is_initialized(self):
        return self.buffer is not None

    def _step(self, T, device):
        """Whether appending T tokens is a decode step (one token after a prefill); sets `span` for it, on `device`
        (the latents': layers split over devices get the bounds from the first)."""
        step = T == 1 and self.seen > 0
        self.span = tuple(t.to(device) for t in self.bounds) if step and self.bounds is not None else None
        return step

    def append(self, latent):
        B, T, width = latent.shape
        self._step(T, latent.device)
        if self.buffer is None or self.buffer.shape[1] < self.seen + T:
            grown = latent.new_empty(B, max(2 * self.seen, self.seen + T, 16), width)
            if self.buffer is not None:
                grown[:, : self.seen] = self.buffer[:, : self.seen]
            self.buffer = grown
        self.buffer[:, self.seen : self.seen + T] = latent
        self.seen += T
        return self.buffer[:, : self.seen]

    def get_seq_length(self):
        return self.seen

    def tensors(self):
        return [self.buffer[:, : self.seen]] if self.buffer is not None else []

    def apply(self, fn):
        if self.buffer is not None:
            self.buffer = fn(self.buffer[:, : self.seen])


class KimiLinearCache(Cache):
    """Decode state of a Kimi Linear model: per KDA layer the conv windows and the float32 recurrent state, per
    MLA layer only the 576-value latents of each token (never per-head keys and values).

    A recurrent state cannot be rewound, so `crop` (assisted generation) raises.
    """

    is_compileable = False

    def __init__(self, config: KimiLinearConfig, *args, **kwargs):
        super().__init__(layers=[self._make_layer(kind) for kind in config.layer_types])
        self.layer_types = list(config.layer_types)

    def _make_layer(self, kind):
        return KDALayerState() if kind == KDA else MLALayerState()

    def __len__(self):
        return len(self.layers)

    def get_seq_length(self, layer_idx=0, *args, **kwargs):
        return self.layers[layer_idx or 0].seen

    def get_mask_sizes(self, *args, **kwargs):
        # (kv_length, kv_offset) for transformers' mask helpers; our layers build their own masks.
        query = args[0] if args else kwargs.get("cache_position", kwargs.get("query_length"))
        q_len = query if isinstance(query, int) else query.shape[0]
        return self.get_seq_length() + q_len, 0

    def get_max_cache_shape(self, *args, **kwargs):
        return -1

    @property
    def max_batch_size(self):
        return next((t.shape[0] for layer in self.layers for t in layer.tensors()), None)

    @property
    def max_cache_len(self):
        return None

    @property
    def is_sliding(self):
        return [False] * len(self.layers)

    @property
    def is_linear(self):
        # transformers >= 5.24 trusts get_seq_length() to slice a pre-filled prompt only when some layer is not
        # "linear"; every layer here counts its tokens exactly, so none is reported as linear.
        return [False] * len(self.layers)

    @property
    def has_previous_state(self):
        return self.get_seq_length() > 0

    def set_bounds(self, bounds):
        """The slots the next decode step's token attends to in every MLA layer: (first [B], last [1]) integer tensors
        on the latents' device when each row's padding is a prefix of it (row b: first[b] ... last), else None."""
        for layer in self.layers:
            if isinstance(layer, MLALayerState):
                layer.bounds = bounds

    def reorder_cache(self, beam_idx):
        for layer in self.layers:
            layer.apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices):
        for layer in self.layers:
            layer.apply(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices])

    def batch_repeat_interleave(self, repeats):
        for layer in self.layers:
            layer.apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length):
        raise ValueError(
            "KimiLinearCache cannot be cropped: KDA layers keep a recurrent state that cannot be rewound "
            "(assisted/speculative generation is not supported for this model)."
        )

    def reset(self):
        for i, kind in enumerate(self.layer_types):
            self.layers[i] = self._make_layer(kind)

    def nbytes(self):
        """Bytes held, by kind: {'kda_conv': ..., 'kda_recurrent': ..., 'mla_latent': ..., 'total': ...}."""
        sizes = {"kda_conv": 0, "kda_recurrent": 0, "mla_latent": 0}
        for layer in self.layers:
            if isinstance(layer, KDALayerState) and layer.recurrent is not None:
                sizes["kda_conv"] += sum(c.numel() * c.element_size() for c in layer.conv)
                sizes["kda_recurrent"] += layer.recurrent.numel() * layer.recurrent.element_size()
            elif isinstance(layer, MLALayerState):
                sizes["mla_latent"] += sum(t.numel() * t.element_size() for t in layer.tensors())
        sizes["total"] = sum(sizes.values())
        return sizes


class KDAStaticLayerState(KDALayerState):
    """A KDA layer's conv windows and recurrent state in tensors allocated once (by the first prefill, or up front):
    prefill copies into them, decode updates them in place, so their addresses never change."""

    def allocate(self, batch_size, channels, width, heads, head_dim, dtype, device):
        self.conv = tuple(torch.zeros(batch_size, channels, width - 1, dtype=dtype, device=device) for _ in range(3))
        self.recurrent = torch.zeros(batch_size, heads, head_dim, head_dim, dtype=torch.float32, device=device)

    def update(self, conv, recurrent, num_tokens):
        if self.recurrent is None:
            self.conv = tuple(c.clone(memory_format=torch.contiguous_format) for c in conv)
            self.recurrent = recurrent.float().clone(memory_format=torch.contiguous_format)
        else:
            for window, new in zip(self.conv, conv):
                window.copy_(new)
            self.recurrent.copy_(recurrent)
        self.seen += num_tokens

    def zero_(self):
        for t in self.tensors():
            t.zero_()

    def apply(self, fn):  # in place: the batch size is fixed
        for t in self.tensors():
            t.copy_(fn(t))


class MLAStaticLayerState(MLALayerState):
    """An MLA layer's latents in a buffer of max_length tokens allocated once. Prefill writes at the cached length
    (a Python int); a decode step (one token, after a prefill) writes at `position`, the cache's length as a device
    tensor, and hands back the whole buffer: the cache's decode mask hides the slots not written yet, so the step's
    shapes never change and nothing is read on the host. After a decode step's append, `span` is (first [B],
    position [1]): the slots each row attends to, first[b] ... position inclusive, which the one-pass attention
    kernel reads instead of a per-slot mask; None after a prefill, or when the cache's padding is not a prefix of
    each row (the mask alone then says which slots count)."""

    def __init__(self, max_length):
        super().__init__()
        self.max_length = max_length
        self.position = None  # set by the cache: the device-side length, shared by every layer

    def allocate(self, batch_size, width, dtype, device):
        self.buffer = torch.zeros(batch_size, self.max_length, width, dtype=dtype, device=device)

    def append(self, latent):
        B, T, width = latent.shape
        if self.buffer is None:
            self.allocate(B, width, latent.dtype, latent.device)
        if latent.dtype != self.buffer.dtype:
            raise ValueError(
                f"KimiLinearStaticCache was allocated for {self.buffer.dtype} activations, the model runs in "
                f"{latent.dtype}: build the cache with the model's dtype (or let its first forward allocate it)."
            )
        if self._step(T, latent.device):
            self.buffer.index_copy_(1, self.position.to(self.buffer.device), latent)
            return self.buffer
        self.buffer[:, self.seen : self.seen + T] = latent
        self.seen += T
        return self.buffer[:, : self.seen]

    def zero_(self):
        if self.buffer is not None:
            self.buffer.zero_()

    def apply(self, fn):  # in place, over the written slots
        if self.buffer is not None:
            held = self.buffer[:, : self.seen]
            held.copy_(fn(held))


class KimiLinearStaticCache(KimiLinearCache):
    """A KimiLinearCache of fixed size, for decoding without per-token overhead: KDA conv windows and float32
    recurrent states, and MLA latents for up to `max_length` tokens, in tensors allocated once and updated in place.
    A decode step (one token per row, after a prefill) has fixed shapes and no host sync: MLA attends over the whole
    latent buffer under a mask built on the device from the cached length. On CUDA that step is captured once in a
    CUDA graph and replayed for every later token (`cuda_graph=False` keeps it eager); on other devices it runs
    eagerly. Prefill runs eagerly, unless the model's prefill graphs hold it (capture_prefill_graphs).

        cache = KimiLinearStaticCache(model.config, max_length=prompt_len + max_new_tokens)
        model.generate(ids, cache=cache, max_new_tokens=max_new_tokens)
        model.generate(ids, cache_implementation="static", max_new_tokens=...)   # the same, sized by generate()

    Tensors are allocated by the first forward (batch size, dtype and device from it) or up front when `device` is
    given. `reset()` empties the cache and keeps its tensors and graph, so the next prompt replays the same graph.
    The batch size is fixed: beam search works (beams are reordered in place), batch_select_indices and
    batch_repeat_interleave raise. A captured graph replays the weights it was captured with: after a prefill the
    cache checks that the model's parameters are still the same tensors and captures again if not.
    Each decode step treats its new token as a real token of every row (as generate() feeds them); padding is taken
    from the attention mask of the prefill.
    """

    def __init__(self, config: KimiLinearConfig, max_length, batch_size=None, dtype=None, device=None,
                 cuda_graph=True):  # fmt: skip
        if int(max_length) < 1:
            raise ValueError(f"max_length must be a positive number of tokens, got {max_length}.")
        self.max_length, self._rows, self.cuda_graph = int(max_length), batch_size, cuda_graph
        self._dims = (config.kda_num_heads, config.kda_head_dim, config.kda_conv_size,
                      config.kv_lora_rank + config.qk_rope_head_dim)  # fmt: skip
        super().__init__(config)
        self.position = None  # [1] int64 on the model's device: tokens cached, read by the decode step
        self.key_mask = None  # [B, max_length] bool: False at padded prompt tokens
        self.first = None  # [B] int64: each row's first real slot, while its padding is a prefix (_holes False)
        self._holes = False  # a row's padding is not a prefix of it (a real token before a padded one)
        self._keys = None  # [max_length] int64: slot numbers
        self._seen = 0
        self._graph = None  # _DecodeGraph once captured; False after a capture failed (eager from then on)
        self._failure = None  # why the capture failed
        self._recheck = True  # a prefill ran since the last replay: check the graph still fits the model
        self.decode_mode = None  # "cuda_graph" or "eager (reason)": how the last decode step ran
        self.made_by_generate = False  # generate() built it: a later generate() continuing it may grow it
        if device is not None:
            if batch_size is None:
                raise ValueError("Allocating up front (device given) needs batch_size.")
            self.allocate(torch.device(device), dtype or torch.get_default_dtype())

    def _make_layer(self, kind):
        return KDAStaticLayerState() if kind == KDA else MLAStaticLayerState(self.max_length)

    def __getstate__(self):  # a copy (copy.deepcopy, pickle) has tensors of its own: it captures its own decode graph
        state = self.__dict__.copy()
        if state["_graph"]:
            state.update(_graph=None, _recheck=True)
        return state

    def allocate(self, device, dtype):
        """Every tensor of the cache, zeroed, for batch_size rows (activations in dtype, KDA states in float32)."""
        H, K, W, width = self._dims
        for layer in self.layers:
            if isinstance(layer, KDAStaticLayerState):
                layer.allocate(self._rows, H * K, W, H, K, dtype, device)
            else:
                layer.allocate(self._rows, width, dtype, device)
        self._counters(self._rows, device)

    def _counters(self, batch_size, device):
        if self.position is None:
            self.position = torch.zeros(1, dtype=torch.long, device=device)
            self.key_mask = torch.ones(batch_size, self.max_length, dtype=torch.bool, device=device)
            self.first = torch.zeros(batch_size, dtype=torch.long, device=device)
            self._keys = torch.arange(self.max_length, device=device)
            for layer in self.layers:
                if isinstance(layer, MLAStaticLayerState):
                    layer.position = self.position
            self._set_bounds()

    def _set_bounds(self):
        self.set_bounds(None if self._holes else (self.first, self.position))

    def get_seq_length(self, layer_idx=0, *args, **kwargs):
        return self._seen

    def grow(self, max_length):
        """Room for max_length tokens (no-op if there is already): the latents move to larger buffers, the tokens
        cached kept; the decode graph, which points at the old ones, is dropped and captured again at the next decode
        step. Not during a decode step's capture or replay: between generations."""
        max_length = int(max_length)
        if max_length <= self.max_length:
            return
        for layer in self.layers:
            if isinstance(layer, MLAStaticLayerState):
                layer.max_length = max_length
                if layer.buffer is not None:
                    old = layer.buffer
                    layer.buffer = old.new_zeros(old.shape[0], max_length, old.shape[2])
                    layer.buffer[:, : self.max_length] = old
        if self.position is not None:
            more = self.key_mask.new_ones(self.key_mask.shape[0], max_length - self.max_length)
            self.key_mask = torch.cat([self.key_mask, more], 1)
            self._keys = torch.arange(max_length, device=self._keys.device)
        self.max_length = max_length
        if self._graph:
            self._graph = None

    def get_max_cache_shape(self, *args, **kwargs):
        return self.max_length

    @property
    def max_cache_len(self):
        return self.max_length

    @property
    def batch_size(self):
        return self._rows if self._rows is not None else -1

    @property
    def max_batch_size(self):
        return self._rows

    def check(self, batch_size, num_tokens):
        """Raise unless `num_tokens` more tokens of `batch_size` rows fit."""
        if self._rows is not None and batch_size != self._rows:
            raise ValueError(
                f"KimiLinearStaticCache was built for batch_size={self._rows}, got a batch of {batch_size}. "
                "Build one per batch size (or use KimiLinearCache, which grows)."
            )
        if self._seen + num_tokens > self.max_length:
            raise ValueError(
                f"KimiLinearStaticCache holds at most max_length={self.max_length} tokens: {self._seen} are cached "
                f"and {num_tokens} more were given. Build it with a larger max_length (at least the prompt length "
                "plus max_new_tokens), or generate fewer tokens."
            )

    def begin(self, batch_size, num_tokens, device):
        """Checks before a forward over num_tokens new tokens; allocates the device-side counters on first use."""
        self.check(batch_size, num_tokens)
        self._rows = batch_size
        self._counters(batch_size, device)

    def decode_mask(self):
        """[B, 1, 1, max_length] bool (True = attend) for the token at `position`: earlier slots that are not padding,
        and the token itself."""
        return (self.key_mask & (self._keys <= self.position))[:, None, None, :]

    def record_prefill(self, num_tokens, key_mask=None):
        """After an eager forward over num_tokens tokens: padding into the key mask (and each row's first real slot,
        while the padding is a prefix of every row: one host sync, in a prefill that had one already to see the
        padding), lengths forward."""
        if key_mask is not None:
            self.key_mask[:, self._seen : self._seen + num_tokens] = key_mask[:, -num_tokens:]
            first, prefix = _padding_prefix(self.key_mask[:, : self._seen + num_tokens])
            self._holes = not bool(prefix)
            if not self._holes:
                self.first.copy_(first)
            self._set_bounds()
        self.position.add_(num_tokens)
        self.advance(num_tokens)
        self._recheck = True

    def advance(self, num_tokens):
        """Count num_tokens more cached tokens on the host (the device-side position is the caller's business)."""
        self._seen += num_tokens
        for layer in self.layers:
            layer.seen = self._seen

    def reset(self):
        """Empty the cache; its tensors (and the captured graph that points at them) stay."""
        for layer in self.layers:
            layer.zero_()
        if self.position is not None:
            self.position.zero_()
            self.key_mask.fill_(True)
            self.first.zero_()
            self._holes = False
            self._set_bounds()
        self._seen = 0
        for layer in self.layers:
            layer.seen = 0
        self._recheck = True

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)  # in place, see the layers' apply
        if self.key_mask is not None:
            held = self.key_mask[:, : self._seen]
            held.copy_(held.index_select(0, beam_idx.to(held.device)))
            self.first.copy_(self.first.index_select(0, beam_idx.to(self.first.device)))

    def batch_select_indices(self, indices):
        raise ValueError(
            "KimiLinearStaticCache has a fixed batch size (a captured CUDA graph points at its tensors): rows cannot "
            "be selected; use KimiLinearCache (generate(cache_implementation='dynamic')) for this."
        )

    def batch_repeat_interleave(self, repeats):
        raise ValueError(
            "KimiLinearStaticCache has a fixed batch size (a captured CUDA graph points at its tensors): rows cannot "
            "be repeated; build it for the expanded batch, or use KimiLinearCache (cache_implementation='dynamic')."
        )

    @property
    def graph_replays(self):
        """Decode steps replayed from the CUDA graph so far (0 without a graph)."""
        return self._graph.replays if self._graph else 0

    def _kda_tensors(self):
        return [t for layer in self.layers if isinstance(layer, KDAStaticLayerState) for t in layer.tensors()]

    def graph_decode(self, model, input_ids):
        """Logits [B, 1, vocab] of one decode step replayed from the CUDA graph (captured on first use), or None when
        the step has to run eagerly (the reason is logged once and kept in `decode_mode`)."""
        reason = self._graph_obstacle(input_ids)
        # (re)capture when there is no graph, when it read spans and the padding now has holes or the other way
        # round, or when the model changed
        if reason is None and (
            self._graph is None or self._graph.holes != self._holes or (self._recheck and not self._graph.fits(model))
        ):
            try:
                with torch.cuda.device(input_ids.device):
                    self._graph = _DecodeGraph(model, self, input_ids)
            except Exception as err:  # noqa: BLE001 - any capture failure: decode eagerly, say why
                self._graph = False
                self._failure = reason = f"the decode step could not be captured ({type(err).__name__}: {err})"
        if reason is not None:
            if reason != "cuda_graph=False" and self.decode_mode != f"eager ({reason})":
                logger.warning_once(f"Kimi Linear: no CUDA graph for decoding: {reason}; decoding eagerly.")
            self.decode_mode = f"eager ({reason})"
            return None
        self._recheck = False
        self.decode_mode = "cuda_graph"
        logits = self._graph.replay(input_ids)
        self.advance(1)
        return logits

    def _graph_obstacle(self, input_ids):
        if not self.cuda_graph:
            return "cuda_graph=False"
        if self._graph is False:
            return self._failure
        if not input_ids.is_cuda:
            return f"CUDA graphs need a CUDA device, the model runs on {input_ids.device.type}"
        if torch.is_grad_enabled():
            return "autograd is on (decode under torch.no_grad(), as generate() does)"
        if torch.cuda.is_current_stream_capturing():
            return "the stream is already being captured"
        return None


_CHILDREN, _TENSORS = operator.attrgetter("_modules"), operator.attrgetter("_parameters", "_buffers")
# what a PEFT adapter layer's forward reads beside its tensors: adapters off and the active ones; those merged into the
# base weight; LoRA's scales
_SWITCHES, _MERGED, _SCALING = (operator.attrgetter("_disable_adapters", "_active_adapter"),
                                operator.attrgetter("merged_adapters"), operator.attrgetter("scaling"))  # fmt: skip


class _ModelState:
    """What a CUDA graph captured on a model depends on beside the values of its tensors: the module tree (every
    module's children), every parameter and buffer (the same tensor at the same storage) and the switches of PEFT's
    adapter layers (disabled, active, merged, scales). matches(model) checks it all in passes that run in C over lists
    made at the capture: for the released model's 27k modules and 20k tensors 24 ms on a 2-core VM, where walking
    model.parameters() for their storage alone took 119 ms (benchmarks/graph_checks.py)."""

    def __init__(self, model):
        self.model = weakref.ref(model)
        self.modules = list(model.modules())
        self.children = list(map(dict, map(_CHILDREN, self.modules)))
        self.fields = [field for fields in map(_TENSORS, self.modules) for field in fields]
        self.sizes = list(map(len, self.fields))
        self.holders, self.names = [], []
        for field in self.fields:
            for name, tensor in field.items():
                if tensor is not None:
                    self.holders.append(field)
                    self.names.append(name)
        self.tensors = list(map(dict.get, self.holders, self.names))
        self.storage = list(map(torch.Tensor.data_ptr, self.tensors))
        self.adapters = [m for m in self.modules if hasattr(m, "_disable_adapters") and hasattr(m, "merged_adapters")]
        self.scaled = [m for m in self.adapters if isinstance(getattr(m, "scaling", None), dict)]
        self.switches = self._switches()

    def _switches(self):  # copies of the lists and dicts, which change in place
        a = self.adapters
        return list(map(_SWITCHES, a)), list(map(tuple, map(_MERGED, a))), list(map(dict, map(_SCALING, self.scaled)))

    def matches(self, model):
        return (
            self.model() is model
            and list(map(_CHILDREN, self.modules)) == self.children  # a module compares equal to itself only
            and list(map(len, self.fields)) == self.sizes
            and all(map(operator.is_, map(dict.get, self.holders, self.names), self.tensors))
            and list(map(torch.Tensor.data_ptr, self.tensors)) == self.storage
            and self._switches() == self.switches
        )


class _DecodeGraph:
    """One decode step of `model` on `cache`, captured in a CUDA graph: input ids are copied into a static buffer,
    the graph replays embedding, every layer (in place on the cache) and lm_head, and the logits are copied out."""

    def __init__(self, model, cache, input_ids):
        devices = {p.device for p in model.parameters()}
        if len(devices) != 1:
            raise RuntimeError(f"the model's parameters are on several devices ({sorted(map(str, devices))})")
        self.replays = 0
        self.ids = input_ids.clone(memory_format=torch.contiguous_format)
        # Warm up on a side stream (Triton compiles, cuBLAS and the allocator settle), restoring what the step writes
        # (KDA states, the position; the latent slot it writes is written again by the replay), then capture.
        written = [*cache._kda_tensors(), cache.position]
        saved = [t.clone() for t in written]
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()  # the caller made the model's device current
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(2):
                try:
                    model._decode_logits(self.ids, cache)
                finally:
                    for t, s in zip(written, saved):
                        t.copy_(s)
        main.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = model._decode_logits(self.ids, cache)
        self.state = _ModelState(model)
        self.holes = cache._holes  # captured with the mask alone (True) or with each row's span of slots (False)

    def fits(self, model):
        return self.state.matches(model)

    def replay(self, input_ids):
        self.ids.copy_(input_ids)
        self.graph.replay()
        self.replays += 1
        return self.logits.clone()


def prefill_buckets(max_tokens):
    """The padded lengths prefill graphs are captured at, up to the first that holds max_tokens: every multiple of
    64 up to 1024, then 8 per doubling (a prompt is padded by less than 1/8 of its length)."""
    buckets = [64]
    while buckets[-1] < max_tokens:
        T = buckets[-1] + 1
        step = max(64, 1 << max(0, (T - 1).bit_length() - 4))
        buckets.append(-(-T // step) * step)
    return buckets


class _PrefillGraphs:
    """CUDA graphs of an inference prefill of fresh sequences, one per padded length (prefill_buckets), for one
    batch size: a prompt's tokens are copied into a static buffer and its length into a device scalar, and the graph
    of the smallest length that holds it replays the embedding, every layer (the padding an identity step for KDA:
    _PaddedPrefill) and the logits of the last real token. The layers' states land in a staging
    KimiLinearStaticCache that every graph writes, and are copied into the caller's cache after the replay. The
    graphs share one memory pool (they never run at once); captured largest first, so the pool grows once."""

    def __init__(self, model, batch_size, max_tokens, progress=True):
        device, dtype = model.lm_head.weight.device, model.model.embed_tokens.weight.dtype
        self.batch_size, self.buckets = batch_size, prefill_buckets(max_tokens)
        top = self.buckets[-1]
        self.staging = KimiLinearStaticCache(model.config, max_length=top, batch_size=batch_size, dtype=dtype,
                                             device=device, cuda_graph=False)  # fmt: skip
        self.ids = torch.zeros(batch_size, top, dtype=torch.long, device=device)
        self.length = torch.ones(1, dtype=torch.long, device=device)
        self.graphs, self.logits = {}, {}
        # one prefill at a time: the graphs share their buffers, so a replay waits for the last one's copies out,
        # whichever thread and stream made them
        self.lock, self.done = threading.Lock(), None
        pool = torch.cuda.graph_pool_handle()
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        start = time.perf_counter()
        bar = logging.tqdm(reversed(self.buckets), total=len(self.buckets), desc="Capturing prefill graphs",
                           unit="graph", disable=not progress)  # fmt: skip
        for T in bar:
            ids = self.ids[:, :T]
            # warm up on a side stream (Triton compiles, autotuned kernels choose, the allocator settles), then capture
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self.staging.reset()
                model._padded_prefill_logits(ids, self.length, self.staging)
            main.wait_stream(side)
            self.staging.reset()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.logits[T] = model._padded_prefill_logits(ids, self.length, self.staging)
            graph.replay()  # a graph's first launch uploads it to the GPU (about 1 ms): not in a prompt's time
            self.graphs[T] = graph
        self.staging.reset()
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - start
        self.state = _ModelState(model)  # after the warm-ups: a first forward stacks the experts' weights

    def obstacle(self, model, input_ids, attention_mask, position_ids, logits_to_keep, cu_seq_lens):
        """Why this fresh prefill cannot replay a graph, or None."""
        B, T = input_ids.shape
        if torch.is_grad_enabled():
            return "autograd is on"
        if model.training:
            return "the model is in training mode (model.eval() for inference)"
        if T == 0:
            return "an empty prompt"
        if not isinstance(logits_to_keep, int) or logits_to_keep != 1:
            return f"logits_to_keep={logits_to_keep!r} (a graph makes the last token's logits only: pass 1)"
        if B != self.batch_size:
            return f"a batch of {B} rows (the graphs were captured for {self.batch_size})"
        if T > self.buckets[-1]:
            return f"{T} tokens (the graphs were captured for up to {self.buckets[-1]})"
        if input_ids.device != self.ids.device:
            return f"input on {input_ids.device} (the graphs run on {self.ids.device})"
        if attention_mask is not None and not bool(attention_mask.all()):
            return "padding in the batch"
        if _segments(None, position_ids, cu_seq_lens, B, T, 0, input_ids.device) is not None:
            return "packed documents"
        if torch.cuda.is_current_stream_capturing():
            return "the stream is being captured"
        if not self.state.matches(model):
            logger.warning_once(
                "Kimi Linear: the model changed since capture_prefill_graphs() (parameters moved, cast or loaded by "
                "assignment, modules replaced, adapters added, switched or merged): prefills run eagerly until it is "
                "called again."
            )
            return "the model changed since the capture"
        return None

    def run(self, input_ids, cache):
        """Logits [B, 1, vocab] of the last token of input_ids [B, T], replayed from the graph of the smallest padded
        length that holds T; the states go into cache (a fresh KimiLinearCache or KimiLinearStaticCache) or
        nowhere (None)."""
        B, T = input_ids.shape
        if isinstance(cache, KimiLinearStaticCache):
            cache.check(B, T)  # the eager prefill's checks (rows, room), before anything is written
        padded = next(b for b in self.buckets if b >= T)
        with self.lock:
            if self.done is not None:
                torch.cuda.current_stream().wait_event(self.done)
            self.ids[:, :T].copy_(input_ids)  # the rest keeps earlier tokens: padding, whatever it holds
            self.length.fill_(T)
            self.graphs[padded].replay()
            logits = self.logits[padded].clone()
            if cache is not None:
                _take_prefill(self.staging, cache, B, T, input_ids.device)
            self.done = torch.cuda.Event()
            self.done.record()
        return logits, padded


def _take_prefill(staging, cache, B, T, device):
    """Copy the states a padded prefill of T real tokens left in staging (a KimiLinearStaticCache) into cache, a fresh
    KimiLinearCache or KimiLinearStaticCache, as an eager prefill of those T tokens would have left them."""
    static = isinstance(cache, KimiLinearStaticCache)
    if static:
        cache.begin(B, T, device)
    for src, dst in zip(staging.layers, cache.layers):
        if isinstance(src, KDALayerState):
            dst.update(conv=[c.clone() for c in src.conv], recurrent=src.recurrent.clone(), num_tokens=T)
        else:
            dst.append(src.buffer[:, :T])
    if static:
        cache.record_prefill(T)


# ---------------------------------------------------------------------------------------------------------------
# Pretrained base, model, causal LM
# ---------------------------------------------------------------------------------------------------------------
# What save_pretrained writes into config.json, so that trust_remote_code loads these files.
AUTO_MAP = {
    "AutoConfig": "configuration_kimi_linear.KimiLinearConfig",
    "AutoModel": "modeling_kimi_linear.KimiLinearModel",
    "AutoModelForCausalLM": "modeling_kimi_linear.KimiLinearForCausalLM",
}
CODE_FILES = ("configuration_kimi_linear.py", "modeling_kimi_linear.py")


def _guarded(tensor, fill):
    """Initialise a tensor unless transformers marked it as loaded from a checkpoint."""
    if not getattr(tensor, "_is_hf_initialized", False):
        with torch.no_grad():
            fill(tensor)


class KimiLinearPreTrainedModel(PreTrainedModel):
    config_class = KimiLinearConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["KimiLinearDecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True  # a recurrent state cannot be cropped: no assisted generation
    _keep_in_fp32_modules_strict = ["A_log", "dt_bias", "e_score_correction_bias"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, KimiDeltaAttention):
            # A in [1, 16]; dt in [1e-3, 1e-1] stored as its inverse softplus
            _guarded(module.A_log, lambda t: t.copy_(torch.empty_like(t).uniform_(1, 16).log()))
            dt = torch.empty_like(module.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp_min(1e-4)
            _guarded(module.dt_bias, lambda t: t.copy_(dt + torch.log(-torch.expm1(-dt))))
        elif isinstance(module, KimiLinearRouter):
            _guarded(module.weight, lambda t: t.normal_(0.0, std))
            _guarded(module.e_score_correction_bias, lambda t: t.zero_())
        elif isinstance(module, (KimiLinearRMSNorm, KimiLinearGatedRMSNorm)):
            _guarded(module.weight, lambda t: t.fill_(1.0))
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
            _guarded(module.weight, lambda t: t.normal_(0.0, std))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Weights, config.json with auto_map, generation config, and this model's code files."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        here = Path(__file__).resolve().parent
        for name in CODE_FILES:
            target = Path(save_directory) / name
            if not target.exists() or not target.samefile(here / name):
                shutil.copyfile(here / name, target)

    @classmethod
    def from_pretrained(cls, *args, strict=True, **kwargs):
        """As transformers' from_pretrained, but a checkpoint with a missing, unexpected or misshaped tensor raises
        a ValueError naming it (transformers would only warn and initialise it at random). strict=False restores
        the lenient behaviour."""
        want_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        problems = []
        if info.get("missing_keys"):
            problems.append(f"missing from the checkpoint: {sorted(info['missing_keys'])}")
        if info.get("unexpected_keys"):
            problems.append(f"not used by {cls.__name__}: {sorted(info['unexpected_keys'])}")
        if info.get("mismatched_keys") and not ignore_mismatched:
            shapes = [f"{name} {list(ckpt)} vs {list(ours)}" for name, ckpt, ours in sorted(info["mismatched_keys"])]
            problems.append(f"wrong shape (checkpoint vs model): {', '.join(shapes)}")
        if problems and strict:
            raise ValueError(
                f"Checkpoint does not match the Kimi Linear layout ({'; '.join(problems)}). "
                "Convert it with conversion/ or pass strict=False to load anyway."
            )
        return (model, info) if want_info else model

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # generate() must not build a DynamicCache; we supply KimiLinearCache

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode=None, batch_size=None, max_cache_length=None, *args,
        **kwargs,
    ):  # fmt: skip
        """generate()'s cache: with `cache_implementation="static"` a KimiLinearStaticCache sized for this call
        (batch x beams rows, prompt + max_new_tokens - 1 tokens) whose decode steps replay a CUDA graph on CUDA; with
        "dynamic" a KimiLinearCache; with none given, the static cache where its graph can serve (_auto_cache), else
        the growing one. A static cache that generate() made grows when a later call continues it past its length."""
        implementation = generation_config.cache_implementation
        user_cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if user_cache is not None:
            if not isinstance(user_cache, KimiLinearCache):
                raise TypeError(
                    "Kimi Linear needs a KimiLinearCache (KDA states and MLA latents), "
                    f"got {type(user_cache).__name__}. "
                    "Pass `cache=KimiLinearCache(model.config)` or no cache at all."
                )
            if implementation is not None:
                raise ValueError(f"Pass either cache_implementation={implementation!r} or a cache object, not both.")
            if isinstance(user_cache, KimiLinearStaticCache) and max_cache_length is not None:
                if max_cache_length > user_cache.max_length and user_cache.made_by_generate:
                    user_cache.grow(max_cache_length)  # a continuation of a generation (its graph is captured again)
                elif max_cache_length > user_cache.max_length:
                    raise ValueError(
                        f"This generation needs room for {max_cache_length} tokens (prompt + max_new_tokens - 1) but "
                        f"the KimiLinearStaticCache has max_length={user_cache.max_length}. Build it with a larger "
                        "max_length (or call cache.grow(n)), or lower max_new_tokens."
                    )
            return
        if generation_config.use_cache is False:
            return
        beams = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        rows = batch_size * beams if batch_size is not None else None  # None: from the first forward
        length = max(
            max_cache_length or generation_config.max_length, getattr(generation_config, "max_cache_len", 0) or 0
        )
        if implementation is None:
            new_tokens = generation_config.max_new_tokens
            mask = model_kwargs.get("attention_mask")
            if new_tokens is None and mask is not None and generation_config.max_length is not None:
                new_tokens = generation_config.max_length - mask.shape[-1]  # max_length alone: less the prompt
            implementation, why = self._auto_cache(generation_mode, rows, length, new_tokens)
            logger.info(f"Kimi Linear: generate() decodes with the {implementation} cache ({why}).")
        if implementation == "dynamic":
            model_kwargs[_CACHE_FIELD] = KimiLinearCache(self.config)
        elif implementation == "static":
            cache = KimiLinearStaticCache(self.config, max_length=length, batch_size=rows)
            cache.made_by_generate = True
            model_kwargs[_CACHE_FIELD] = cache
        else:
            raise ValueError(
                f"Kimi Linear supports cache_implementation None / 'dynamic' (KimiLinearCache) or 'static' "
                f"(KimiLinearStaticCache, CUDA-graph decoding), got {implementation!r}."
            )

    # generate() without a cache_implementation takes the static cache (decode steps replayed from a CUDA graph) only
    # while its latents, allocated up front for the whole generation, take at most this share of the device's free
    # memory; the growing cache allocates as the tokens come.
    static_cache_memory_share = 0.25
    # ... and for at least this many new tokens: each generate() call captures its decode graph afresh (two warm-up
    # steps and the capture), which costs more than the steps it replays in very short generations (on an H200 with
    # the bench model: 2 new tokens 40 -> 68 ms a call, 8 new tokens 94 -> 72 ms, benchmarks/generate_gpu.py)
    static_cache_min_new_tokens = 8
    _GRAPH_MODES = ("greedy_search", "sample", "beam_search", "beam_sample")  # generate() modes a static cache serves

    def _auto_cache(self, generation_mode, rows, length, new_tokens=None):
        """("static" or "dynamic", why) for generate() without a cache_implementation: the static cache where a CUDA
        graph will replay its decode steps and repay its capture (one CUDA device, a greedy, sampling or beam-search
        mode, at least static_cache_min_new_tokens new tokens (max_new_tokens, or max_length less the prompt), its
        latents within static_cache_memory_share of the free memory), else the growing cache."""
        devices = {p.device for p in self.parameters()}
        device = next(iter(devices))
        if len(devices) != 1 or device.type != "cuda":
            where = device.type if len(devices) == 1 else f"{len(devices)} devices"
            return "dynamic", f"the model is on {where}: CUDA graphs need one CUDA device"
        mode = getattr(generation_mode, "value", generation_mode)
        if mode is not None and mode not in self._GRAPH_MODES:
            return "dynamic", f"{mode} generation"
        if new_tokens is not None and new_tokens < self.static_cache_min_new_tokens:
            return "dynamic", f"{new_tokens} new tokens: a graph's capture would cost more than its replays save"
        if rows is None:
            return "dynamic", "the batch size is not known up front"
        c = self.config
        mla = sum(kind != KDA for kind in c.layer_types)
        need = rows * length * (c.kv_lora_rank + c.qk_rope_head_dim) * mla * self.dtype.itemsize
        free = torch.cuda.mem_get_info(device)[0]
        if need > self.static_cache_memory_share * free:
            return "dynamic", (
                f"the static cache's latents, {need / 2**30:.2f} GiB for {rows} rows of {length} tokens, would take "
                f"more than {self.static_cache_memory_share:.0%} of the {free / 2**30:.1f} GiB free"
            )
        return "static", f"{rows} rows of up to {length} tokens, decode steps replayed from a CUDA graph"


class KimiLinearModel(KimiLinearPreTrainedModel):
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # a causal-LM checkpoint loads into the base model

    def __init__(self, config: KimiLinearConfig):
        super().__init__(config)
        pad = (
            config.pad_token_id if config.pad_token_id is not None and config.pad_token_id < config.vocab_size else None
        )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, pad)
        self.layers = nn.ModuleList(KimiLinearDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = KimiLinearRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values  # transformers >= 5.24 says `cache`
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if T > 1 and x.device.type == "cpu" and _cpu_half_products_slow(x.dtype):
            logger.warning_once(
                f"Kimi Linear: this CPU has no native {x.dtype} matrix products (AVX512-BF16 / AMX), so the model's "
                "products of many rows run several times slower than in float32 (benchmarks/cpu_decode.py): for CPU "
                "inference, load the model with dtype=torch.float32."
            )
        cache, use_cache = _resolve_cache(self, cache, use_cache)
        past = cache.get_seq_length() if cache is not None else 0
        _check_attention_mask(attention_mask, B, T, past)
        static = isinstance(cache, KimiLinearStaticCache)
        if static:
            cache.begin(B, T, x.device)
            if T == 1 and past > 0:  # a decode step: fixed shapes, no host sync (what a CUDA graph captures)
                x = self._static_step(x, cache)
                cache.advance(1)
                return BaseModelOutputWithPast(last_hidden_state=x, **{_CACHE_FIELD: cache})

        key_mask, first = _padding(attention_mask, step=T == 1 and past > 0)
        if cache is not None and not static:  # spans for a decode step (the static cache keeps its own)
            cache.set_bounds((first, first.new_full((1,), past)) if first is not None else None)
        # a decode step whose padding is a prefix of every row has a real new token in each: nothing to drop
        segs = None if first is not None else _segments(key_mask, position_ids, kwargs.get("cu_seq_lens_q"), B, T,
                                                        past, x.device)  # fmt: skip
        packed = segs is not None and segs.packed
        mask = build_attention_mask(key_mask, T, past + T, x.device, segs if packed else None)

        _load_whole_layers(self.layers, input_ids if input_ids is not None else x)
        states = cache.layers if cache is not None else [None] * len(self.layers)
        clock = self._prefill_clock(x, past, mask)
        token = _PREFILL_CLOCK.set(clock)
        try:
            for layer, state in zip(self.layers, states):
                if clock is not None:
                    clock.layer_start()
                x = layer(x, state=state, segs=segs, mask=mask)
        finally:
            _PREFILL_CLOCK.reset(token)
        x = self.norm(x)
        if static:
            cache.record_prefill(T, key_mask)
        return BaseModelOutputWithPast(last_hidden_state=x, **{_CACHE_FIELD: cache if use_cache else None})

    def _prefill_clock(self, x, past, mask):
        """A _PrefillClock for an inference prefill on CUDA (no cache before it, no padding) whose MLA attention shape
        has no cuDNN plan on this thread yet, else None."""
        B, T = x.shape[:2]
        if past or mask is not None or T < 2 or not x.is_cuda or torch.is_grad_enabled():
            return None
        mla = next((layer.self_attn for layer in self.layers if layer.kind != KDA), None)
        if mla is None or mla._plan_key(x.device, x.dtype, B, T) in _PLANS.keys:
            return None
        return _PrefillClock()

    def _static_step(self, x, cache):
        """One token per row, x [B, 1, hidden], through every layer on a KimiLinearStaticCache: every shape fixed,
        every cache tensor updated in place, the cached length read and advanced on the device only."""
        mask = cache.decode_mask()
        for layer, state in zip(self.layers, cache.layers):
            x = layer(x, state=state, mask=mask)
        cache.position.add_(1)
        return self.norm(x)


def _resolve_cache(model, cache, use_cache):
    """(cache, use_cache) for a forward: use_cache defaults to the config's at inference, a fresh KimiLinearCache
    where one is wanted and none was given; any other cache type is refused."""
    if use_cache is None:
        use_cache = model.config.use_cache and not model.training
    if use_cache and cache is None:
        cache = KimiLinearCache(model.config)
    if cache is not None and not isinstance(cache, KimiLinearCache):
        raise TypeError(f"Kimi Linear needs a KimiLinearCache, got {type(cache).__name__}.")
    return cache, use_cache


def _padding_prefix(keep):
    """For keep [B, S] bool (True = a real slot): each row's count of padded slots [B], its first real slot while its
    padding is a prefix of it, and whether every row's padding is such a prefix (no real slot before a padded one) as
    a bool tensor, read on the host by the caller."""
    return (~keep).sum(1), ~(keep[:, :-1] & ~keep[:, 1:]).any()


def _padding(attention_mask, step):
    """(key_mask, first) for a forward's attention_mask [B, S] (1 = real token) or None: key_mask [B, S] bool, None
    when nothing is padded; first [B] int64, each row's first real slot, when `step` (a decode step on a cache) and the
    padding is a prefix of every row (the one-pass MLA attention then reads each row's span of slots instead of a
    per-slot mask), else None. One host sync."""
    if attention_mask is None:
        return None, None
    keep = attention_mask.bool()
    if not step:
        return (None if bool(keep.all()) else keep), None
    first, prefix = _padding_prefix(keep)
    # the new token real in every row too: each row real from its first real slot to the end
    unpadded, prefixed = torch.stack([keep.all(), prefix & keep[:, -1].all()]).tolist()
    if unpadded:
        return None, None
    return keep, first if prefixed else None


def _check_attention_mask(attention_mask, B, T, past):
    if attention_mask is not None and (
        attention_mask.dim() != 2
        or attention_mask.shape[0] != B
        or attention_mask.shape[1] not in (past + T, T)
        or (attention_mask.shape[1] == T and past and T != past + T)
    ):
        raise ValueError(
            "attention_mask must be a 2D 0/1 tensor [batch, cached + new tokens] "
            f"(expected [{B}, {past + T}], got {list(attention_mask.shape)})."
        )


def _segments(key_mask, position_ids, cu_seq_lens, B, T, past, device):
    """Segments for a batch with padding among its new tokens or with packed documents, else None.
    Documents start where position_ids restart at 0 (transformers' DataCollatorWithFlattening, and any packing
    that numbers positions per document) or at cu_seq_lens (flash-attention style, one row)."""
    real = key_mask[:, -T:] if key_mask is not None else None
    if real is not None and bool(real.all()):
        real = None  # padding only among cached tokens (decode after a padded prompt): nothing to drop now
    starts = None
    if cu_seq_lens is not None:
        if B != 1:
            raise ValueError(f"cu_seq_lens_q describes one packed row; got a batch of {B} rows.")
        starts = torch.zeros(1, T, dtype=torch.bool, device=device)
        starts[0, cu_seq_lens[:-1].to(device).clamp_max(T - 1)] = True
    elif position_ids is not None and T > 1:
        position_ids = position_ids.view(-1, T).expand(B, T)
        starts = (position_ids == 0).to(device)
    if starts is not None and not bool(starts[:, 1:].any()):
        starts = None
    if real is None and starts is None:
        return None
    segs = Segments(real if real is not None else torch.ones(B, T, dtype=torch.bool, device=device), starts)
    if segs.packed and past:
        raise ValueError(
            "Packed documents (position_ids restarting at 0, or cu_seq_lens_q) cannot continue a cache: "
            "pass each document as its own row, or run packed batches without a cache (use_cache=False)."
        )
    return segs


class KimiLinearForCausalLM(KimiLinearPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: KimiLinearConfig):
        super().__init__(config)
        self.model = KimiLinearModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        if (
            isinstance(cache if cache is not None else past_key_values, KimiLinearStaticCache)
            and input_ids is not None
            and input_ids.shape[1] == 1
            and inputs_embeds is None
            and labels is None
        ):
            static = cache if cache is not None else past_key_values
            past = static.get_seq_length()
            if past > 0:  # a decode step: replayed from the CUDA graph when it can be
                _check_attention_mask(attention_mask, input_ids.shape[0], 1, past)
                static.begin(input_ids.shape[0], 1, input_ids.device)
                logits = static.graph_decode(self, input_ids)
                if logits is not None:
                    return CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: static})
        graphs = self.__dict__.get("_prefill_graphs")
        if graphs is not None and input_ids is not None and inputs_embeds is None and labels is None:
            given = cache if cache is not None else past_key_values
            if given is None or given.get_seq_length() == 0:  # a fresh prefill
                out = self._graph_prefill(graphs, input_ids, attention_mask, position_ids, given, use_cache,
                                          logits_to_keep, kwargs.get("cu_seq_lens_q"))  # fmt: skip
                if out is not None:
                    return out
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})

    def capture_prefill_graphs(self, max_tokens=8192, batch_size=1, progress=True):
        """Capture CUDA graphs of an inference prefill for prompts of up to max_tokens tokens in batches of
        batch_size rows, one graph per padded length (prefill_buckets: multiples of 64 up to 1024, then 8 per
        doubling; 40 graphs up to 8192). From then on, a fresh prefill (no tokens cached, no padding or packing,
        autograd off, eval mode, logits_to_keep=1, as generate() calls it) of a length they hold replays the graph of
        the smallest padded length that holds it: nothing is launched per layer from the host, and nothing is chosen
        or built per prompt length. Everything else runs eagerly; `prefill_mode` says how the last prefill ran.
        The padding is an identity step for KDA and hidden by MLA's causal attention, so the logits and cached
        states are those of the prompt alone.
        A graph replays the modules and tensors it was captured with: after the model changes (parameters moved,
        cast or replaced, modules replaced, PEFT adapters added, disabled, switched, merged or rescaled: _ModelState),
        prefills run eagerly (a warning says so) until this is called again. In-place updates of the same tensors
        are seen. Returns the padded lengths captured. release_prefill_graphs() frees them."""
        if not isinstance(max_tokens, int) or max_tokens < 1 or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"max_tokens and batch_size must be positive ints, got {max_tokens!r}, {batch_size!r}.")
        device = self.lm_head.weight.device
        if device.type != "cuda":
            raise RuntimeError(f"Prefill graphs are CUDA graphs; the model is on {device}. Move it to a GPU first.")
        for moe in self.modules():
            if isinstance(moe, KimiLinearMoE):
                dtype = moe.experts[0].w1.weight.dtype
                if _grouped_mm_reads_offsets_on_host(device, dtype):
                    raise ValueError(
                        f"Prefill graphs need the routed experts' grouped product to keep its group offsets on the "
                        f"GPU, which torch._grouped_mm does for bfloat16 on sm90/sm100 only (this model: {dtype} on "
                        f"sm{''.join(map(str, torch.cuda.get_device_capability(device)))}). Cast the model to "
                        "bfloat16 (model.bfloat16()) on such a GPU, or prefill eagerly."
                    )
                break
        self.release_prefill_graphs()
        training = self.training
        try:
            with torch.no_grad(), torch.cuda.device(device):
                self.eval()  # what a graph replays: inference
                graphs = _PrefillGraphs(self, batch_size, max_tokens, progress)
        except Exception as err:
            torch.cuda.synchronize(device)
            raise RuntimeError(
                f"Kimi Linear: the prefill could not be captured in a CUDA graph ({type(err).__name__}: {err}); "
                "prefills run eagerly."
            ) from err
        finally:
            self.train(training)
        self.__dict__["_prefill_graphs"] = graphs
        logger.info(f"Kimi Linear: {len(graphs.buckets)} prefill graphs captured in {graphs.capture_s:.1f} s")
        return list(graphs.buckets)

    def __getstate__(self):  # copies and pickles carry the weights; the graphs replay this model's, they stay here
        state = super().__getstate__()
        state.pop("_prefill_graphs", None)
        state.pop("prefill_mode", None)
        return state

    def release_prefill_graphs(self):
        """Free the prefill graphs (capture_prefill_graphs) and their memory; prefills run eagerly."""
        if self.__dict__.pop("_prefill_graphs", None) is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.prefill_mode = None

    # How the last fresh prefill ran while prefill graphs were captured: "cuda_graph (T tokens as P)" or
    # "eager (reason)"; None without graphs.
    prefill_mode = None

    def _graph_prefill(self, graphs, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep,
                       cu_seq_lens):  # fmt: skip
        """A fresh prefill replayed from the prefill graphs, or None (eager: prefill_mode says why)."""
        reason = graphs.obstacle(self, input_ids, attention_mask, position_ids, logits_to_keep, cu_seq_lens)
        if reason is not None:
            self.prefill_mode = f"eager ({reason})"
            return None
        cache, use_cache = _resolve_cache(self, cache, use_cache)
        logits, padded = graphs.run(input_ids, cache if use_cache else None)
        self.prefill_mode = f"cuda_graph ({input_ids.shape[1]} tokens as {padded})"
        return CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: cache if use_cache else None})

    def _padded_prefill_logits(self, ids, length, cache):
        """Logits [B, 1, vocab] at position length - 1 of a fresh prefill of ids [B, T] whose tokens from `length`
        ([1] int64 on the device) on are padding, the layers' states written into cache (what a prefill graph
        captures; _PaddedPrefill)."""
        m = self.model
        x = m.embed_tokens(ids)
        token = _PADDED_PREFILL.set(_PaddedPrefill(length, ids.shape[1], self.config.kda_conv_size))
        try:
            for layer, state in zip(m.layers, cache.layers):
                x = layer(x, state=state)
        finally:
            _PADDED_PREFILL.reset(token)
        return self.lm_head(m.norm(x.index_select(1, length - 1)))

    def _decode_logits(self, input_ids, cache):
        """Logits [B, 1, vocab] of one decode step on a KimiLinearStaticCache (what its CUDA graph captures)."""
        return self.lm_head(self.model._static_step(self.model.embed_tokens(input_ids), cache))


__all__ = [
    "KimiLinearCache",
    "KimiLinearStaticCache",
    "KimiLinearForCausalLM",
    "KimiLinearModel",
    "KimiLinearPreTrainedModel",
]
