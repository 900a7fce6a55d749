"""Packed documents and padded batches run as variable-length sequences: a packed row computes exactly what the
documents compute as separate rows (KDA state and conv windows restart at each document, MLA stays inside it), for
logits, loss and every gradient. The reference is the plain dense path on one document per row."""

import pytest
import torch
from transformers import DataCollatorWithFlattening

from conftest import build_model, rel_err
from kimi_linear.modeling_kimi_linear import (
    KimiLinearCache,
    Segments,
    kda_prefill_torch,
    short_conv,
    short_conv_varlen,
)

LENGTHS = (37, 1, 70, 64, 5)  # odd lengths straddle the 64-token chunks; a one-token document


def documents(seed=0, lengths=LENGTHS, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def separate_loss_sum(model, docs):
    """Sum of next-token cross-entropies of each document run alone (its own row, dense path)."""
    total = 0.0
    for d in docs:
        if len(d) > 1:
            logits = model(d[None], use_cache=False).logits[0, :-1]
            total = total + torch.nn.functional.cross_entropy(logits.float(), d[1:], reduction="sum")
    return total


def packed_loss_sum(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    labels = batch["labels"]
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_row_trains_exactly_like_separate_rows(flash_kwargs):
    model = build_model().train()  # dropout-free: train mode only matters for the MoE and checkpointing paths
    docs = documents()
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": d.tolist()} for d in docs])
    if flash_kwargs:  # the flash-attention style description alone, without position_ids
        batch.pop("position_ids")
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "cu_seq_lens_q")}

    packed = packed_loss_sum(model, batch)
    packed.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone = separate_loss_sum(model, docs)
    alone.backward()
    assert rel_err(packed.detach(), alone.detach()) < 1e-5
    assert packed_grads, "no gradients"
    for name, p in model.named_parameters():
        if p.grad is None:
            assert name not in packed_grads
            continue
        assert rel_err(packed_grads[name], p.grad) < 1e-4, name


@torch.no_grad()
def test_packed_logits_equal_separate_logits_without_any_cross_document_leak():
    model = build_model()
    docs = documents(seed=1)
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    packed = model(ids, position_ids=position_ids, use_cache=False).logits[0]
    start = 0
    for d in docs:
        alone = model(d[None], use_cache=False).logits[0]
        assert rel_err(packed[start : start + len(d)], alone) < 1e-5
        start += len(d)
    # and the packing really matters: numbering positions straight through lets documents see each other
    straight = model(ids, use_cache=False).logits[0]
    assert rel_err(straight[len(docs[0]) :], packed[len(docs[0]) :]) > 1e-2


@torch.no_grad()
def test_packed_rows_with_padding_in_a_batch():
    model = build_model()
    rows = [documents(seed=2, lengths=(20, 9)), documents(seed=3, lengths=(3, 30, 2))]
    width = max(sum(len(d) for d in r) for r in rows) + 4
    ids = torch.zeros(2, width, dtype=torch.long)
    pos = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):  # right padding after the packed documents
        n = sum(len(d) for d in r)
        ids[i, :n] = torch.cat(r)
        pos[i, :n] = torch.cat([torch.arange(len(d)) for d in r])
        mask[i, :n] = 1
    out = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    for i, r in enumerate(rows):
        start = 0
        for d in r:
            assert rel_err(out[i, start : start + len(d)], model(d[None], use_cache=False).logits[0]) < 1e-5
            start += len(d)


def test_packed_documents_cannot_continue_a_cache():
    model = build_model()
    cache = KimiLinearCache(model.config)
    model(documents()[0][None], cache=cache)
    docs = documents(seed=4, lengths=(4, 4))
    with pytest.raises(ValueError, match="cannot continue a cache"):
        model(torch.cat(docs)[None], position_ids=torch.cat([torch.arange(4)] * 2)[None], cache=cache)


def test_short_conv_varlen_equals_short_conv_per_sequence():
    torch.manual_seed(0)
    D, W = 12, 4
    lengths = [5, 1, 2, 9]
    weight = torch.randn(D, 1, W)
    seqs = [torch.randn(1, n, D) for n in lengths]
    windows = torch.randn(len(lengths), D, W - 1)
    real = torch.ones(1, sum(lengths), dtype=torch.bool)
    starts = torch.zeros_like(real)
    starts[0, torch.tensor([0, *lengths]).cumsum(0)[:-1]] = True
    segs = Segments(real, starts)
    y, final = short_conv_varlen(torch.cat(seqs, 1)[0], weight, windows, segs)
    start = 0
    for i, x in enumerate(seqs):
        ref, ref_window = short_conv(x, weight, windows[i : i + 1])
        assert torch.allclose(y[start : start + lengths[i]], ref[0], atol=1e-6)
        assert torch.allclose(final[i], ref_window[0], atol=1e-6)  # a 1-token sequence keeps 2 window slots
        start += lengths[i]


def test_varlen_prefill_twin_restarts_the_state_at_each_sequence():
    # against the float64 recurrence run on each sequence alone
    from kimi_linear.modeling_kimi_linear import kda_gate, kda_step_torch, l2norm

    torch.manual_seed(1)
    H, K = 2, 16
    lengths = [3, 70, 1]
    N = sum(lengths)
    q, k, v, g = (torch.randn(1, N, H, K, dtype=torch.float64) for _ in range(4))
    beta = torch.randn(1, N, H, dtype=torch.float64)
    A_log, dt_bias = torch.randn(H, dtype=torch.float64), torch.randn(H * K, dtype=torch.float64)
    h0 = torch.randn(len(lengths), H, K, K, dtype=torch.float64)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    o, h = kda_prefill_torch(q, k, v, g, beta, A_log, dt_bias, initial_state=h0, cu_seqlens=cu)
    for i in range(len(lengths)):
        S = h0[i : i + 1]
        for t in range(int(cu[i]), int(cu[i + 1])):
            step = [l2norm(q[:, t]), l2norm(k[:, t]), v[:, t], kda_gate(g[:, t], A_log, dt_bias)]
            ref, S = kda_step_torch(*step, torch.sigmoid(beta[:, t]), S)
            assert rel_err(o[:, t], ref) < 1e-10
        assert rel_err(h[i : i + 1], S) < 1e-10


@torch.no_grad()
def test_decode_after_a_padded_prompt_takes_the_one_token_step():
    # padding among the cached tokens only: the new token is real in every row, so KDA's recurrent decode step
    # runs (not the variable-length prefill), and the result equals each row alone
    from kimi_linear.modeling_kimi_linear import KimiDeltaAttention

    model = build_model()
    prompts = documents(seed=7, lengths=(5, 12))
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 12 - len(p) :], mask[i, 12 - len(p) :] = p, 1
    cache = KimiLinearCache(model.config)
    model(ids, attention_mask=mask, cache=cache)
    calls = []
    original = KimiDeltaAttention._decode
    KimiDeltaAttention._decode = lambda self, *a: calls.append(1) or original(self, *a)
    try:
        nxt = torch.tensor([[7], [9]])
        out = model(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), cache=cache).logits
    finally:
        KimiDeltaAttention._decode = original
    assert len(calls) == model.config.layer_types.count("linear_attention")
    for i, p in enumerate(prompts):
        alone = model(torch.cat([p, nxt[i]])[None], use_cache=False).logits[0, -1]
        assert rel_err(out[i, -1], alone) < 1e-5
