"""The MoE of a decode step (a few tokens) in Triton: the router in two launches, and the experts as matrix-vector
products that read only the chosen experts' weights, two launches for the routed experts and two for the shared
one (whose second adds the routed sum), with no sort, gather or scatter around them.

PyTorch twins: `KimiLinearRouter.forward` (sigmoid or softmax scores, the correction bias picking the experts,
weights from the unbiased scores, renormalised, scaled; one expert group) and `moe_experts_grouped` /
`KimiLinearMLP` in modeling_kimi_linear.py. Products and sums are float32; the intermediate activation is rounded
once to the weights' dtype (the twins round each product's output too).

Each (token, chosen expert) pair is a program row: it re-reads its expert's weights, so this serves a step with
few pairs (about as many as there are experts); larger batches run the grouped products. Fixed launch
configuration, nothing tuned at run time.
"""

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2


@triton.jit
def _router_logits(X, W, PART, H, E, C, EP: tl.constexpr, BH: tl.constexpr):
    """PART[n, c, :] = W[:, chunk c of hidden] x[n, chunk c]: every expert's logit over one slice of the hidden
    size (the slices side by side rather than one program walking them)."""
    n = tl.program_id(0)
    c = tl.program_id(1)
    e = tl.arange(0, EP)
    h = c * BH + tl.arange(0, BH)
    x = tl.load(X + n * H + h, mask=h < H, other=0.0).to(tl.float32)
    w = tl.load(W + e[:, None] * H + h[None, :], mask=(e < E)[:, None] & (h < H)[None, :], other=0.0)
    tl.store(PART + (n * C + c) * EP + e, tl.sum(w.to(tl.float32) * x[None, :], axis=1))


@triton.jit
def _router_pick(PART, BIAS, IDS, WTS, E, C, scaling,
                 K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr, CP: tl.constexpr,
                 SIGMOID: tl.constexpr, RENORM: tl.constexpr, BIAS_IN_WEIGHTS: tl.constexpr):  # fmt: skip
    """Sum the C slices' logits, then scores, top-k by the biased scores, weights from the unbiased ones."""
    n = tl.program_id(0)
    e = tl.arange(0, EP)
    c = tl.arange(0, CP)
    valid = e < E
    logits = tl.sum(tl.load(PART + (n * C + c[:, None]) * EP + e[None, :], mask=(c < C)[:, None], other=0.0), axis=0)
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        p = tl.where(valid, tl.exp(logits - tl.max(tl.where(valid, logits, float("-inf")), axis=0)), 0.0)
        scores = p / tl.sum(p, axis=0)
    choice = tl.where(valid, scores + tl.load(BIAS + e, mask=valid, other=0.0).to(tl.float32), float("-inf"))
    picked = choice if BIAS_IN_WEIGHTS else scores
    slot = tl.arange(0, KP)
    ids = tl.zeros([KP], dtype=tl.int64)
    wts = tl.zeros([KP], dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.argmax(choice, axis=0)
        ids = tl.where(slot == j, best.to(tl.int64), ids)
        wts = tl.where(slot == j, tl.sum(tl.where(e == best, picked, 0.0), axis=0), wts)
        choice = tl.where(e == best, float("-inf"), choice)
    if RENORM:
        wts = wts / (tl.sum(wts, axis=0) + 1e-20)
    tl.store(IDS + n * K + slot, ids, mask=slot < K)
    tl.store(WTS + n * K + slot, wts * scaling, mask=slot < K)


@triton.jit
def _up(X, W1, W3, IDS, HID, H, I, expert_stride, K: tl.constexpr, ROUTED: tl.constexpr, BI: tl.constexpr,
        BH: tl.constexpr):  # fmt: skip
    """HID[a] = silu(W1_e x) * (W3_e x) for pair a = (token a // K, its expert ids[a]); rows block program_id(1)."""
    a = tl.program_id(0)
    rows = tl.program_id(1) * BI + tl.arange(0, BI)
    w1 = W1 + rows[:, None].to(tl.int64) * H
    w3 = W3 + rows[:, None].to(tl.int64) * H
    if ROUTED:
        e = tl.load(IDS + a).to(tl.int64)
        w1 += e * expert_stride
        w3 += e * expert_stride
    gate = tl.zeros([BI, BH], dtype=tl.float32)  # products summed along the hidden size once, at the end
    up = tl.zeros([BI, BH], dtype=tl.float32)
    for h0 in range(0, H, BH):
        h = h0 + tl.arange(0, BH)
        mask = (rows < I)[:, None] & (h < H)[None, :]
        x = tl.load(X + (a // K) * H + h, mask=h < H, other=0.0).to(tl.float32)[None, :]
        gate += tl.load(w1 + h[None, :], mask=mask, other=0.0).to(tl.float32) * x
        up += tl.load(w3 + h[None, :], mask=mask, other=0.0).to(tl.float32) * x
    gate = tl.sum(gate, axis=1)
    up = tl.sum(up, axis=1)
    act = gate * tl.sigmoid(gate) * up
    tl.store(HID + a * I + rows, act.to(HID.dtype.element_ty), mask=rows < I)


@triton.jit
def _down(HID, W2, IDS, WTS, ADD, OUT, H, I, expert_stride, K: tl.constexpr, ROUTED: tl.constexpr,
          HAS_ADD: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):  # fmt: skip
    """OUT[n] = sum_j wts[n, j] * W2_e(j) HID[n K + j] (+ ADD[n]) for the output rows of block program_id(1)."""
    n = tl.program_id(0)
    rows = tl.program_id(1) * BO + tl.arange(0, BO)
    acc = tl.zeros([BO, BI], dtype=tl.float32)  # weighted products of every expert, summed once at the end
    for j in tl.static_range(K):
        w2 = W2 + rows[:, None].to(tl.int64) * I
        if ROUTED:
            w2 += tl.load(IDS + n * K + j).to(tl.int64) * expert_stride
            weight = tl.load(WTS + n * K + j)
        else:
            weight = 1.0
        for i0 in range(0, I, BI):
            i = i0 + tl.arange(0, BI)
            act = tl.load(HID + (n * K + j) * I + i, mask=i < I, other=0.0).to(tl.float32)[None, :]
            w = tl.load(w2 + i[None, :], mask=(rows < H)[:, None] & (i < I)[None, :], other=0.0)
            acc += w.to(tl.float32) * (act * weight)
    out = tl.sum(acc, axis=1)
    if HAS_ADD:
        out += tl.load(ADD + n * H + rows, mask=rows < H, other=0.0).to(tl.float32)
    tl.store(OUT + n * H + rows, out.to(OUT.dtype.element_ty), mask=rows < H)


def route(x, weight, bias, top_k, scaling, sigmoid=True, renormalize=True, bias_in_weights=False):
    """Expert ids [N, k] (int64) and weights [N, k] (float32) for x [N, hidden], router weight [E, hidden], correction
    bias [E]: one launch (one expert group)."""
    N, H = x.shape
    E = weight.shape[0]
    ids = torch.empty(N, top_k, dtype=torch.int64, device=x.device)
    wts = torch.empty(N, top_k, dtype=torch.float32, device=x.device)
    EP = next_power_of_2(E)
    BH = max(16, min(256, 8192 // EP))
    C = cdiv(H, BH)
    part = torch.empty(N, C, EP, dtype=torch.float32, device=x.device)
    _router_logits[(N, C)](x, weight, part, H, E, C, EP=EP, BH=BH, num_warps=4)
    _router_pick[(N,)](
        part, bias, ids, wts, E, C, float(scaling),
        K=top_k, KP=next_power_of_2(top_k), EP=EP, CP=next_power_of_2(C),
        SIGMOID=sigmoid, RENORM=renormalize and top_k > 1, BIAS_IN_WEIGHTS=bias_in_weights, num_warps=4,
    )  # fmt: skip
    return ids, wts


def _check(*tensors):
    for t in tensors:
        if t is not None and not t.is_contiguous():
            raise ValueError("moe_decode needs contiguous tensors (weights as nn.Linear keeps them, x in rows)")


# Fixed launch configurations (rows x columns of a program's tile, warps): the best of benchmarks/moe_decode.py's
# sweep over the four bench-model cases together on an H100: 2 rows a program (many programs, each streaming long
# rows). One token's routed experts: 26.7 us, against 59.9 us with the 16 x 128 tiles first used and a floor of 19.6.
UP = dict(block_i=2, block_h=512, num_warps=4)
DOWN = dict(block_o=2, block_r=1024, num_warps=4)


def experts(x, w1, w3, w2, ids=None, weights=None, add=None):
    """sum_j weights[:, j] * W2_e (silu(W1_e x) * W3_e x) over each token's experts e = ids[:, j] (+ add), x [N, H].

    Routed: w1, w3 [E, I, H] views into the stacked [E, 2I, H] (any stride between experts), w2 [E, H, I]. Without
    ids: one MLP (w1, w3 [I, H], w2 [H, I]; weight 1). Output [N, H] in x's dtype."""
    _check(x, w2, ids, weights, add)
    if w1.stride(-1) != 1 or w1.stride(-2) != x.shape[1] or w3.stride() != w1.stride() or w2.stride(-1) != 1:
        raise ValueError("moe_decode: expert weights must be row-major [.., rows, in] blocks")
    return down(up(x, w1, w3, ids), w2, ids, weights, add)


def up(x, w1, w3, ids=None, block_i=None, block_h=None, num_warps=None):
    """The activations silu(W1_e x) * W3_e x [N*k, I] of every (token, expert) pair (experts' first half). Launch
    configuration: UP, or the arguments given."""
    N, H = x.shape
    I = w1.shape[-2]
    K = ids.shape[1] if ids is not None else 1
    block_i, block_h = block_i or UP["block_i"], block_h or UP["block_h"]
    hid = torch.empty(N * K, I, dtype=x.dtype, device=x.device)
    _up[(N * K, cdiv(I, block_i))](
        x, w1, w3, ids if ids is not None else x, hid, H, I, w1.stride(0) if ids is not None else 0,
        K=K, ROUTED=ids is not None, BI=block_i, BH=block_h, num_warps=num_warps or UP["num_warps"],
    )  # fmt: skip
    return hid


def down(hid, w2, ids=None, weights=None, add=None, block_o=None, block_r=None, num_warps=None):
    """sum_j weights[:, j] * W2_e(j) hid[n k + j] (+ add) [N, H] (experts' second half). Launch configuration: DOWN, or
    the arguments given."""
    H, I = w2.shape[-2:]
    K = ids.shape[1] if ids is not None else 1
    N = hid.shape[0] // K
    block_o, block_r = block_o or DOWN["block_o"], block_r or DOWN["block_r"]
    out = torch.empty(N, H, dtype=hid.dtype, device=hid.device)
    routed = ids is not None
    _down[(N, cdiv(H, block_o))](
        hid, w2, ids if routed else hid, weights if routed else hid, add if add is not None else out, out, H, I,
        w2.stride(0) if routed else 0, K=K, ROUTED=routed, HAS_ADD=add is not None, BO=block_o, BI=block_r,
        num_warps=num_warps or DOWN["num_warps"],
    )  # fmt: skip
    return out
