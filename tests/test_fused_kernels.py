"""The package's own fused Triton kernels (kernels/norm.py, moe_decode.py, kda_decode.py, mla_decode.py,
mla_prefill.py, conv.py, lora.py, gemm.py) against float64 references built from the model's PyTorch twins, on CPU
through Triton's interpreter (TRITON_INTERPRET=1: the kernels' own code, run by numpy). The same kernels compiled on a
GPU are tested in test_gpu.py, in bfloat16.

Triton 3.6's interpreter needs numpy < 2.4 (it takes int() of one-element arrays); .ci/run installs one beside
Triton in the KIMI_FLA_SITE folder."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

FLA_SITE = os.environ.get("KIMI_FLA_SITE")
pytestmark = pytest.mark.skipif(not FLA_SITE, reason="set KIMI_FLA_SITE to a folder holding triton (.ci/run does)")

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from kimi_linear_kernels import moe_decode, norm
    from kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from kimi_linear.modeling_kimi_linear import (KimiLinearExpert, KimiLinearGatedRMSNorm, KimiLinearMLP,
                                                  KimiLinearRMSNorm, KimiLinearRouter, moe_experts_loop)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    out = {}
    torch.manual_seed(0)
    # (rows, width, residual, gated): one row block, several per program in the backward (1100 rows of 40 values
    # are 18 blocks of 64 rows over 16 programs), and a row wider than a tile's default (2304 values)
    for M, D, res, gated in [(5, 40, False, False), (1100, 40, True, False), (1100, 40, False, True),
                             (3, 2304, True, False)]:
        x, r, g = (torch.randn(M, D, requires_grad=True) for _ in range(3))
        w = (1 + 0.3 * torch.randn(D)).requires_grad_()
        dy, ds = torch.randn(M, D), torch.randn(M, D)
        got = norm.rms_norm(x, w, 1e-5, residual=r if res else None, gate=g if gated else None)
        y, s = got if res else (got, None)
        ((y * dy).sum() + ((s * ds).sum() if res else 0)).backward()
        # float64 reference: the twins' forward, autograd's backward
        xd, rd, gd, wd = (t.detach().double().requires_grad_() for t in (x, r, g, w))
        if gated:
            m = KimiLinearGatedRMSNorm(D, 1e-5).double()
        else:
            m = KimiLinearRMSNorm(D, 1e-5).double()
        m.weight = torch.nn.Parameter(wd)
        want = m(xd, gd) if gated else m(xd, residual=rd) if res else m(xd)
        yd, sd = want if res else (want, None)
        ((yd * dy.double()).sum() + ((sd * ds.double()).sum() if res else 0)).backward()
        case = f"norm {M}x{D}" + (" residual" if res else "") + (" gated" if gated else "")
        out[case + " y"] = rel(y, yd)
        if res:
            out[case + " sum"] = rel(s, sd)
            out[case + " d residual"] = rel(r.grad, rd.grad)
        for name, a, b in [("dx", x, xd), ("dweight", w, m.weight)] + ([("dgate", g, gd)] if gated else []):
            out[f"{case} {name}"] = rel(a.grad, b.grad)

    from kimi_linear_kernels import l2norm  # the PyTorch twin on CPU tensors
    for M, D in [(7, 128), (1100, 40)]:
        x = torch.randn(M, D, requires_grad=True)
        dy = torch.randn(M, D)
        (norm.l2_norm(x) * dy).sum().backward()
        xd = x.detach().double().requires_grad_()
        want = l2norm(xd)
        (want * dy.double()).sum().backward()
        out[f"norm l2 {M}x{D} y"] = rel(norm.l2_norm(x.detach()), want)
        out[f"norm l2 {M}x{D} dx"] = rel(x.grad, xd.grad)

    cfg = json.load(open(sys.argv[2]))
    for variant in ({}, {"moe_router_activation_func": "softmax", "num_experts": 12, "num_experts_per_token": 3},
                    {"moe_router_bias_in_weights": True, "moe_renormalize": False}):
        c = KimiLinearConfig(**{**cfg, **variant})
        router = KimiLinearRouter(c)
        torch.nn.init.normal_(router.weight, std=0.3)
        router.e_score_correction_bias.data.normal_(0, 0.1)
        x = torch.randn(3, c.hidden_size)
        ids, wts = moe_decode.route(x, router.weight, router.e_score_correction_bias, router.top_k, router.scaling,
                                    sigmoid=router.activation == "sigmoid", renormalize=router.renormalize,
                                    bias_in_weights=router.bias_in_weights)
        with torch.no_grad():
            rids, rwts = router.double()(x.double())
        key = "router " + (",".join(variant) or "released")
        out[key + " ids equal"] = float(torch.equal(ids, rids))
        out[key + " weights"] = rel(wts, rwts)
        experts = torch.nn.ModuleList(KimiLinearExpert(c) for _ in range(c.num_experts))
        w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in experts]).detach()
        w2 = torch.stack([e.w2.weight for e in experts]).detach()
        halves = w13.view(c.num_experts, 2, c.moe_intermediate_size, c.hidden_size)
        got = moe_decode.experts(x, halves[:, 0], halves[:, 1], w2, ids=ids, weights=wts)
        with torch.no_grad():
            out[key + " experts"] = rel(got, moe_experts_loop(x.double(), ids, wts.double(), experts.double()))
    mlp = KimiLinearMLP(c, 40)
    add = torch.randn(3, c.hidden_size)
    with torch.no_grad():
        got = moe_decode.experts(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, add=add)
        out["mlp plus add"] = rel(got, mlp.double()(x.double()) + add.double())

    # a KDA layer's decode step: the six input projections in one launch and kda_decode_layer, then o_proj, against
    # the layer's plain path in float64 (output, recurrent state, conv windows)
    import copy
    from kimi_linear_kernels import kda_decode
    from kimi_linear.modeling_kimi_linear import KDALayerState, KimiDeltaAttention

    c = KimiLinearConfig(**cfg)
    layer = KimiDeltaAttention(c, 1)
    with torch.no_grad():
        for p_ in layer.parameters():
            p_.normal_(0, 0.3)
        layer.A_log.uniform_(0, 1)
        layer.o_norm.weight.uniform_(0.5, 1.5)
    B, H, K, D = 3, layer.num_heads, layer.head_dim, layer.num_heads * layer.head_dim
    g = torch.Generator().manual_seed(5)
    conv = [torch.randn(B, D, c.kda_conv_size - 1, generator=g) for _ in range(3)]
    recurrent = torch.randn(B, H, K, K, generator=g)
    ref = KDALayerState()
    ref.conv, ref.recurrent, ref.seen = tuple(t.double() for t in conv), recurrent.double(), 7
    x = torch.randn(B, 1, c.hidden_size)
    with torch.no_grad():
        want = copy.deepcopy(layer).double()(x.double(), state=ref)[:, 0]
        x2 = x[:, 0].contiguous()
        big, small = (layer.q_proj, layer.k_proj, layer.v_proj), (layer.f_a_proj, layer.g_a_proj, layer.b_proj)
        xq, xk, xv, fa, ga, b_raw = kda_decode.projections(x2, *(m.weight for m in big + small))
        out["projections"] = max(rel(y, x2 @ m.weight.T) for y, m in zip((xq, xk, xv, fa, ga, b_raw), big + small))
        o = kda_decode.kda_decode_layer(
            xq, xk, xv, *conv,
            layer.q_conv1d.weight, layer.k_conv1d.weight, layer.v_conv1d.weight, fa, layer.f_b_proj.weight,
            layer.A_log, layer.dt_bias, b_raw, recurrent, ga, layer.g_b_proj.weight, layer.o_norm.weight,
            layer.o_norm.variance_epsilon)
        out["kda layer decode output"] = rel(layer.o_proj(o), want)
        out["kda layer decode state"] = rel(recurrent, ref.recurrent)
        out["kda layer decode windows"] = max(rel(a, b) for a, b in zip(conv, ref.conv))

        # the step kernel alone (kda_decode_fused) against its twin kda_decode_torch in float64
        from kimi_linear.modeling_kimi_linear import kda_decode_torch

        conv = [torch.randn(B, D, c.kda_conv_size - 1, generator=g) for _ in range(3)]
        recurrent = torch.randn(B, H, K, K, generator=g)
        raw = [torch.randn(B, D, generator=g) for _ in range(4)] + [torch.randn(B, H, generator=g)]
        weights = (layer.q_conv1d.weight, layer.k_conv1d.weight, layer.v_conv1d.weight)
        twin_conv, twin_state = [t.double() for t in conv], recurrent.double()
        want = kda_decode_torch(*(t.double() for t in raw[:3]), *twin_conv, *(w.double() for w in weights),
                                raw[3].double(), layer.A_log.double(), layer.dt_bias.double(), raw[4].double(),
                                twin_state)
        got = kda_decode.kda_decode_fused(*raw[:3], *conv, *weights, raw[3], layer.A_log, layer.dt_bias, raw[4],
                                          recurrent)
        out["kda step output"] = rel(got, want)
        out["kda step state"] = rel(recurrent, twin_state)
        out["kda step windows"] = max(rel(a, b) for a, b in zip(conv, twin_conv))

    # MLA decode attention on the latents in one pass, against _attend_one in float64: the tiny shape (576 -> 40
    # values, 4 heads) and the bench model's (576, 32 heads), with and without a mask and a span, several slices per row
    from kimi_linear_kernels import mla_decode
    from kimi_linear.modeling_kimi_linear import KimiMLAAttention

    bench = dict(kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=32, hidden_size=256, head_dim=8,
                 qk_nope_head_dim=128, v_head_dim=128)
    for name, over, S, splits in [("tiny", {}, 300, 3), ("tiny", {}, 77, None), ("bench", bench, 200, 4)]:
        c = KimiLinearConfig(**{**cfg, **over})
        mla = KimiMLAAttention(c, 3)
        D = c.kv_lora_rank + c.qk_rope_head_dim
        q, lat = torch.randn(2, mla.num_heads, D), torch.randn(2, S, D)
        keep = torch.rand(2, S) > 0.3
        for m in (keep, None):
            got = mla_decode.mla_decode(q, lat, m, mla.scaling, c.kv_lora_rank, splits=splits)
            want = mla._attend_one(q.double(), lat.double(), m[:, None, None, :] if m is not None else None)
            out[f"mla decode {name} S={S} splits={splits} mask={m is not None}"] = rel(got, want)
        # the static cache's spans: row b reads slots first[b] ... last only (the slots outside hold NaN, never read;
        # a span starting inside a later slice, and one ending before the buffer does), with and without a mask
        first, last = torch.tensor([3, S // 2 + 7]), torch.tensor([S - 11])
        inside = (torch.arange(S) >= first[:, None]) & (torch.arange(S) <= last)
        junk = lat.masked_fill(~inside[..., None], float("nan"))
        for m in (None, keep):
            allowed = inside if m is None else inside & m
            got = mla_decode.mla_decode(q, junk, m, mla.scaling, c.kv_lora_rank, span=(first, last), splits=splits)
            want = mla._attend_one(q.double(), lat.double(), allowed[:, None, None, :])
            out[f"mla decode {name} S={S} splits={splits} span mask={m is not None}"] = rel(got, want)

    # MLA's causal prefill attention (kimi_linear_kernels.mla_prefill) against the layer's own SDPA path in float64,
    # at the model's head dims (192 = 128 + 64, values 128) and memory layout: a partial last block, an exact block,
    # several key blocks per query block, and 128 x 64 blocks over two query blocks
    from kimi_linear_kernels import mla_prefill

    c = KimiLinearConfig(**{**cfg, **bench, "num_attention_heads": 2, "head_dim": 128})
    mla = KimiMLAAttention(c, 3)
    for B, T, blocks in [(2, 77, (32, 16)), (1, 64, (32, 32)), (1, 45, (16, 16)), (1, 200, (128, 64))]:
        q = torch.randn(B, T, mla.num_heads, mla.q_head_dim).transpose(1, 2)
        lat = torch.randn(B, T, c.kv_lora_rank + c.qk_rope_head_dim)
        want = mla.double()._attend_expanded(q.double(), lat.double(), None)
        mla.float()
        for tma in (False, True):  # loads through pointers, and through TMA descriptors (the layouts fit)
            got = mla_prefill.mla_prefill(q, *mla._expand(lat), mla.scaling, *blocks, tma=tma)
            out[f"mla prefill B={B} T={T} blocks={blocks} tma={tma}"] = rel(got, want)
            out[f"mla prefill B={B} T={T} tma={tma} layout"] = float(got.transpose(1, 2).is_contiguous())

    # KDA's short convolution with SiLU, forward and backward (input, weight, starting window), against the twin
    # short_conv in float64 with autograd: fewer tokens than the window, one token block, several blocks; channels
    # not a multiple of the channel block; with and without a starting window
    from kimi_linear_kernels import conv as conv_kernels
    from kimi_linear.modeling_kimi_linear import short_conv as conv_twin

    for T in (1, 2, 5, 70):
        for with_state in (False, True):
            x = torch.randn(2, T, 40, requires_grad=True)
            w = torch.randn(40, 1, 4, requires_grad=True)
            st = torch.randn(2, 40, 3, requires_grad=True) if with_state else None
            dy = torch.randn(2, T, 40)
            y = conv_kernels.short_conv(x, w, st)
            (y * dy).sum().backward()
            xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            sd = st.detach().double().requires_grad_() if with_state else None
            yd, _ = conv_twin(xd, wd, sd)
            (yd * dy.double()).sum().backward()
            case = f"conv T={T} state={with_state}"
            out[case + " y"] = rel(y, yd)
            out[case + " dx"] = rel(x.grad, xd.grad)
            out[case + " dw"] = rel(w.grad, wd.grad)
            if with_state:
                out[case + " dstate"] = rel(st.grad, sd.grad)

    # packed sequences (short_conv_varlen): each sequence as if alone behind its own starting window, against the
    # twin per sequence in float64; the new windows the model takes (_final_windows) against the twin's
    from kimi_linear.modeling_kimi_linear import _final_windows

    lengths = [1, 2, 5, 40]
    cu = torch.tensor([0] + lengths).cumsum(0)
    seq_of_token = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    x = torch.randn(cu[-1].item(), 40, requires_grad=True)
    w = torch.randn(40, 1, 4, requires_grad=True)
    windows = torch.randn(len(lengths), 40, 3)
    dy = torch.randn(cu[-1].item(), 40)
    y = conv_kernels.short_conv_varlen(x, w, windows, cu, seq_of_token)
    (y * dy).sum().backward()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    parts, ends = [], []
    for i in range(len(lengths)):
        a, b = cu[i].item(), cu[i + 1].item()
        yi, end = conv_twin(xd[None, a:b], wd, windows[i : i + 1].double())
        parts.append(yi[0])
        ends.append(end)
    yd = torch.cat(parts)
    (yd * dy.double()).sum().backward()
    out["conv packed y"] = rel(y, yd)
    out["conv packed dx"] = rel(x.grad, xd.grad)
    out["conv packed dw"] = rel(w.grad, wd.grad)
    out["conv packed windows"] = rel(_final_windows(x.detach().double(), windows.double(), cu, 4), torch.cat(ends))

    # a LoRA-adapted linear layer (kernels/lora.py), forward and backward, against PEFT's arithmetic (the twin) in
    # float64 with autograd: fewer rows than a tile, widths off the tile sizes, a rank padded to the tile (24 of
    # 32), 3-D input, a bias, a frozen input (no dx), several row splits in the weight-gradient sums
    from kimi_linear_kernels import lora as lora_kernels

    for shape, K, N, r, x_grad, bias, scale in [((5,), 40, 24, 4, True, False, 2.0),
                                                ((2, 35), 130, 150, 16, True, True, 0.5),
                                                ((300,), 64, 32, 24, False, False, 1.0)]:
        x = torch.randn(*shape, K, requires_grad=x_grad)
        w, b = torch.randn(N, K) / K**0.5, (torch.randn(N) if bias else None)
        a_ = (torch.randn(r, K) / K**0.5).requires_grad_()
        b_ = torch.randn(N, r).requires_grad_()
        dy = torch.randn(*shape, N)
        y = lora_kernels.lora_linear(x, w, b, a_, b_, scale)
        (y * dy).sum().backward()
        xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a_, b_))
        yd = lora_kernels.lora_linear_torch(xd, w.double(), b.double() if bias else None, ad, bd, scale)
        (yd * dy.double()).sum().backward()
        case = f"lora {tuple(shape)}x{K}->{N} r={r}"
        out[case + " y"] = rel(y, yd)
        out[case + " dA"] = rel(a_.grad, ad.grad)
        out[case + " dB"] = rel(b_.grad, bd.grad)
        if x_grad:
            out[case + " dx"] = rel(x.grad, xd.grad)

    # LoRA on every routed expert (kernels/lora.py, grouped): rows sorted by expert, forward and backward against the
    # twin in float64 with autograd: groups straddling row tiles, an expert with no rows (its adapters' gradients
    # exactly zero), one row, fewer rows than a tile, two adapters side by side (w1 and w3), one adapter on wider rows
    # (the columns past it untouched), ranks 4, 8 and 24 (padded to the tile)
    for E, counts, K, ns, r, extra in [(5, [3, 0, 40, 1, 2], 40, (24, 24), 8, 0),
                                       (4, [70, 1, 0, 90], 130, (50,), 24, 7), (3, [0, 5, 0], 16, (8, 8), 4, 0)]:
        exp = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
        ends = torch.tensor(counts).cumsum(0).to(torch.int32)
        M = len(exp)
        x = torch.randn(M, K, requires_grad=True)
        y0 = torch.randn(M, sum(ns) + extra, requires_grad=True)
        ad = [t.requires_grad_() for n in ns for t in (torch.randn(E, r, K) / K**0.5, torch.randn(E, n, r))]
        dy = torch.randn(M, y0.shape[1])
        y = lora_kernels.grouped_lora_add_(y0.clone(), x, ad, 1.5, exp, ends)
        (y * dy).sum().backward()
        xd, yd0 = (t.detach().double().requires_grad_() for t in (x, y0))
        add = [t.detach().double().requires_grad_() for t in ad]
        yd = lora_kernels.grouped_lora_add_torch(yd0, xd, add, 1.5, exp, ends)
        (yd * dy.double()).sum().backward()
        case = f"lora grouped E={E} rows={M} {K}->{ns} r={r}"
        out[case + " y"] = rel(y, yd)
        out[case + " dy"] = rel(y0.grad, yd0.grad)
        out[case + " dx"] = rel(x.grad, xd.grad)
        empty = torch.tensor(counts) == 0
        for i, (a, b) in enumerate(zip(ad, add)):
            out[f"{case} d{'AB'[i % 2]}{i // 2}"] = rel(a.grad, b.grad)
            out[f"{case} d{'AB'[i % 2]}{i // 2} of experts without rows"] = a.grad[empty].abs().sum().item()

    # rows out of order (a caller's broken promise of sorted experts): the kernels still finish, each tile's visit
    # only moving forward through the experts (a hang here times the whole script out)
    exp, ends = torch.tensor([0, 1, 0, 2]), torch.tensor([1, 2, 4], dtype=torch.int32)  # expert 1 then 0 again
    lora_kernels.grouped_lora_add_(torch.zeros(4, 8), torch.randn(4, 16), [torch.randn(3, 4, 16), torch.randn(3, 8, 4)],
                                   1.0, exp, ends)  # fmt: skip
    out["lora grouped rows out of order finish"] = 0.0

    # the low-rank projections' product (kernels/gemm.py) against float64 in float32: one, two and three weights of
    # one input, fewer rows than a tile and several tiles, widths off the tile sizes (K = 200: the last K step
    # masked), a 3-D input, a view of wider rows (a column slice: the row stride is not K), no rows
    from kimi_linear_kernels import gemm

    for shape, K, ns, view in [((5,), 128, (128, 128, 32), False), ((2, 70), 200, (576,), False),
                               ((300,), 64, (16, 130), True), ((0,), 64, (8,), False)]:  # fmt: skip
        x = torch.randn(*shape, K + 64 if view else K)[..., :K]
        ws = [torch.randn(n, K) / K**0.5 for n in ns]
        for i, (y, w) in enumerate(zip(gemm.products(x, *ws), ws)):
            case = f"gemm {tuple(shape)}x{K}->{ns} #{i}" + (" view" if view else "")
            assert y.shape == (*shape, w.shape[0]) and y.dtype == x.dtype, (case, y.shape, y.dtype)
            out[case] = rel(y, x.double() @ w.double().T) if y.numel() else 0.0
    # cublas_rows: blocks of exactly that many rows through torch.mm, the rest through the product (its one launch's
    # rows recorded), or one more block ending at the last row where more than two thirds of a block are left
    launches, launch = [], gemm._launch
    gemm._launch = lambda grid, args, *rest: launches.append(args[7]) or launch(grid, args, *rest)
    x = torch.randn(2, 150, 72)[..., :64]
    ws = [torch.randn(n, 64) / 8 for n in (16, 130, 40)]
    for rows, left in [(100, []), (128, [44]), (70, [20]), (110, []), (300, [300]), (1000, [300])]:
        launches.clear()
        for i, (y, w) in enumerate(zip(gemm.products(x, *ws, cublas_rows=rows), ws)):
            assert y.shape == (2, 150, w.shape[0]), y.shape
            out[f"gemm cublas_rows={rows} #{i}"] = rel(y, x.double() @ w.double().T)
        out[f"gemm cublas_rows={rows} rows left to the product"] = float(launches != left)
    gemm._launch = launch
    # programs ordered in groups of row blocks (tiles' sixth entry): 19 row blocks in groups of 4 (the last of 3), 5 in
    # one group of 8, and the WIDE tiles' 2 in one group of 8
    for tiles in [(16, 16, 32, 4, 1, 4), (64, 32, 64, 4, 1, 8), gemm.WIDE]:
        for i, (y, w) in enumerate(zip(gemm.products(x, *ws, tiles=tiles), ws)):
            out[f"gemm tiles={tiles} #{i}"] = rel(y, x.double() @ w.double().T)
    # the tile rule: WIDE from WIDE_COLUMNS output columns on (KDA's q/k/v in one call, 12288; not MLA's q_proj, 6144),
    # the fixed tiles with 2 stages where shared memory holds about 100 KiB
    fixed = gemm.FIXED
    hopper, small = 228 * 1024, 99 * 1024
    rule = [gemm.tiles_for(3 * 4096, hopper) == gemm.WIDE, gemm.tiles_for(6144, hopper) == fixed,
            gemm.tiles_for(2 * 9216, small) == (*fixed[:4], 2, fixed[5]), gemm.WIDE != fixed and len(gemm.WIDE) == 6]
    out["gemm tile rule"] = 0.0 if all(rule) else 1.0
    try:
        gemm.products(x, *ws, cublas_rows=0)
        out["gemm cublas_rows=0 refused"] = 1.0
    except ValueError as err:
        out["gemm cublas_rows=0 refused"] = 0.0 if "cublas_rows" in str(err) else 1.0
    try:  # no backward: a call that autograd would need refuses instead of returning detached outputs
        gemm.products(torch.randn(3, 8, requires_grad=True), torch.randn(4, 8))
        out["gemm under autograd refused"] = 1.0
    except RuntimeError as err:
        out["gemm under autograd refused"] = 0.0 if "no_grad" in str(err) else 1.0
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def errors():
    cfg = os.path.join(os.path.dirname(__file__), "..", "conversion", "configs", "tiny.json")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, FLA_SITE, cfg], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_norm_kernels_forward_and_backward_match_float64(errors):
    norms = {k: v for k, v in errors.items() if k.startswith("norm")}
    assert len(norms) == 21, sorted(norms)
    bad = {k: v for k, v in norms.items() if not v < 1e-6}  # float32 kernels against float64: rounding only
    assert not bad, bad


def test_router_kernel_picks_the_same_experts_with_the_same_weights(errors):
    for key in ("released", "moe_router_activation_func,num_experts,num_experts_per_token",
                "moe_router_bias_in_weights,moe_renormalize"):  # fmt: skip
        assert errors[f"router {key} ids equal"] == 1.0, key
        assert errors[f"router {key} weights"] < 1e-6, key


def test_expert_kernels_match_the_per_expert_loop(errors):
    experts = {k: v for k, v in errors.items() if k.endswith("experts") or k.startswith("mlp")}
    assert len(experts) == 4
    bad = {k: v for k, v in experts.items() if not v < 1e-6}
    assert not bad, bad


def test_kda_layer_decode_kernels_match_the_layers_plain_step(errors):
    keys = ("projections", "kda layer decode output", "kda layer decode state", "kda layer decode windows",
            "kda step output", "kda step state", "kda step windows")  # fmt: skip
    bad = {k: errors[k] for k in keys if not errors[k] < 1e-6}
    assert not bad, bad


def test_mla_decode_kernel_matches_the_two_product_path(errors):
    mla = {k: v for k, v in errors.items() if k.startswith("mla decode")}
    assert len(mla) == 12, sorted(mla)
    bad = {k: v for k, v in mla.items() if not v < 1e-6}
    assert not bad, bad


def test_mla_prefill_kernel_matches_the_layers_sdpa_path(errors):
    prefill = {k: v for k, v in errors.items() if k.startswith("mla prefill") and not k.endswith("layout")}
    assert len(prefill) == 8, sorted(prefill)
    bad = {k: v for k, v in prefill.items() if not v < 1e-6}
    assert not bad, bad
    # the output is laid out as [B, T, heads, dim], so that o_proj's input is a view
    assert all(v == 1.0 for k, v in errors.items() if k.startswith("mla prefill") and k.endswith("layout"))


def test_short_conv_kernels_forward_and_backward_match_float64(errors):
    # dense rows with and without a starting window, and packed sequences, each alone behind its own window
    conv = {k: v for k, v in errors.items() if k.startswith("conv")}
    assert len(conv) == 4 * (3 + 4) + 4, sorted(conv)
    bad = {k: v for k, v in conv.items() if not v < 1e-6}
    assert not bad, bad


def test_lora_kernels_forward_and_backward_match_float64(errors):
    # dense, and grouped by routed expert: float32 kernels against float64 (rounding only); the gradients of experts
    # without rows exactly zero
    lora = {k: v for k, v in errors.items() if k.startswith("lora")}
    assert len(lora) == 4 + 4 + 3 + 2 * (3 + 4 * 2) + (3 + 2 * 2) + 1, sorted(lora)
    bad = {k: v for k, v in lora.items() if not v < 1e-6}
    assert not bad, bad


def test_product_kernel_matches_float64(errors):
    # one to three weights of one input, widths off the tiles, a masked last K step, a view of wider rows, no rows;
    # cuBLAS blocks (cublas_rows) with the rows left over in the product, none left, one more block recomputing rows,
    # too few rows for a block (1.0 in a "rows left" entry: the product's launch took other rows than expected);
    # programs in groups of row blocks, the last group partial, and the WIDE tiles; the tile rule (1.0: it picked
    # other tiles than expected); a call under autograd and a block of no rows refused (0.0: refused with the fix named)
    gemm = {k: v for k, v in errors.items() if k.startswith("gemm")}
    assert len(gemm) == 3 + 1 + 2 + 1 + 6 * 4 + 3 * 3 + 1 + 1 + 1, sorted(gemm)
    bad = {k: v for k, v in gemm.items() if not v < 1e-6}
    assert not bad, bad


def test_host_grid_helpers_equal_tritons():
    # kernels/host.py's cdiv and next_power_of_2 (plain ints, for launch grids and tile sizes) against Triton's own
    check = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        import triton
        from kimi_linear_kernels.host import cdiv, next_power_of_2
        bad = [(a, b) for a in range(0, 700) for b in range(1, 80) if cdiv(a, b) != triton.cdiv(a, b)]
        bad += [n for n in range(1, 70000) if next_power_of_2(n) != triton.next_power_of_2(n)]
        print(len(bad), bad[:5])
    """)
    run = subprocess.run([sys.executable, "-c", check, FLA_SITE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split()[0] == "0", (run.stdout, run.stderr[-2000:])
