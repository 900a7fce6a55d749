"""Model equivalences: cached decode == one forward, pieces == one prefill, a padded batch == each prompt alone,
latent MLA == expanded MLA, MoE == a per-token reference, and generate() in every mode."""

import pytest
import torch

from conftest import build_model, rel_err, tiny_config
from kimi_linear.configuration_kimi_linear import KDA
from kimi_linear.modeling_kimi_linear import KimiLinearCache, KimiLinearMoE, build_attention_mask


def ids_for(B, T, seed=0, vocab=512):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_cached_decode_equals_one_forward(tiny_model):
    ids = ids_for(2, 90)
    full = tiny_model(ids, use_cache=False).logits
    cache = KimiLinearCache(tiny_model.config)
    logits = [tiny_model(ids[:, :70], cache=cache, use_cache=True).logits]
    for t in range(70, 90):
        logits.append(tiny_model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert rel_err(torch.cat(logits, 1), full) < 1e-5
    assert cache.get_seq_length() == 90


@torch.no_grad()
def test_prefill_in_pieces_equals_one_prefill(tiny_model):
    ids = ids_for(1, 150, seed=1)
    full = tiny_model(ids, use_cache=False).logits
    cache = KimiLinearCache(tiny_model.config)
    pieces, start = [], 0
    for size in (7, 64, 1, 30, 33, 15):  # odd sizes straddle chunk boundaries
        pieces.append(tiny_model(ids[:, start : start + size], cache=cache, use_cache=True).logits)
        start += size
    assert start == 150
    assert rel_err(torch.cat(pieces, 1), full) < 1e-5


def test_long_inference_prefill_runs_each_kda_layer_in_pieces(tiny_model, monkeypatch):
    from kimi_linear.modeling_kimi_linear import KimiDeltaAttention

    ids = ids_for(2, 150, seed=4)
    ref_cache = KimiLinearCache(tiny_model.config)
    ref = tiny_model(ids, cache=ref_cache).logits.detach()  # gradients on: one pass, never pieces
    monkeypatch.setattr(KimiDeltaAttention, "prefill_piece", 40)  # 150 = 40 + 40 + 40 + 30
    cache = KimiLinearCache(tiny_model.config)
    with torch.no_grad():
        pieces = tiny_model(ids, cache=cache).logits
        uncached = tiny_model(ids, use_cache=False).logits
    assert rel_err(pieces, ref) < 1e-5 and rel_err(uncached, ref) < 1e-5
    for a, b in zip(cache.layers, ref_cache.layers):
        for x, y in zip(a.tensors(), b.tensors()):
            assert rel_err(x, y) < 1e-5


def test_long_inference_attention_runs_in_key_blocks(tiny_model, monkeypatch):
    # MLA past key_block keys (inference, no padding): query pieces against key blocks merged by log-sum-exp; the
    # same logits and cache as one SDPA call, for a one-shot prefill and for a continuation of a cached prefix
    from kimi_linear.modeling_kimi_linear import KimiMLAAttention

    ids = ids_for(2, 150, seed=7)
    with torch.no_grad():
        ref_cache = KimiLinearCache(tiny_model.config)
        ref = tiny_model(ids[:, :100], cache=ref_cache).logits
        ref_next = tiny_model(ids[:, 100:], cache=ref_cache).logits
        monkeypatch.setattr(KimiMLAAttention, "key_block", 16)  # 100 keys: 7 blocks; the continuation 50 more
        cache = KimiLinearCache(tiny_model.config)
        blocked = tiny_model(ids[:, :100], cache=cache).logits
        blocked_next = tiny_model(ids[:, 100:], cache=cache).logits
    assert rel_err(blocked, ref) < 1e-5 and rel_err(blocked_next, ref_next) < 1e-5
    trained = tiny_model(ids[:, :100]).logits  # gradients on: one SDPA call, as training needs
    assert rel_err(trained.detach(), ref) < 1e-5


@torch.no_grad()
def test_bfloat16_decode_tracks_float32():
    model32 = build_model()
    model16 = build_model(dtype=torch.bfloat16)
    ids = ids_for(1, 40, seed=2)
    cache = KimiLinearCache(model16.config)
    out = [model16(ids[:, :30], cache=cache).logits] + [
        model16(ids[:, t : t + 1], cache=cache).logits for t in range(30, 40)
    ]
    out = torch.cat(out, 1)
    assert out.dtype == torch.bfloat16
    # cached bf16 decode == one bf16 forward, to bf16 rounding; and bf16 stays near float32 through 8 layers
    assert rel_err(out, model16(ids).logits) < 2e-2
    assert rel_err(out, model32(ids).logits) < 1e-1


def left_pad(prompts, pad_id=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny_model):
    prompts = [ids_for(1, n, seed=n)[0] for n in (5, 23, 70)]
    ids, mask = left_pad(prompts)
    batch = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    for i, p in enumerate(prompts):
        alone = tiny_model.generate(
            p[None],
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
        )
        assert torch.equal(batch[i, ids.shape[1] :], alone[0, len(p) :]), f"prompt {i}"


@torch.no_grad()
def test_padding_does_not_leak_into_kda_or_conv_state(tiny_model):
    prompt = ids_for(1, 20, seed=3)
    ids, mask = left_pad([prompt[0], ids_for(1, 45, seed=4)[0]])
    padded, alone = KimiLinearCache(tiny_model.config), KimiLinearCache(tiny_model.config)
    tiny_model(ids, attention_mask=mask, cache=padded)
    tiny_model(prompt, cache=alone)
    for kind, a, b in zip(tiny_model.config.layer_types, padded.layers, alone.layers):
        if kind == KDA:
            assert rel_err(a.recurrent[:1], b.recurrent) < 1e-5
            for ca, cb in zip(a.conv, b.conv):
                assert rel_err(ca[:1], cb) < 1e-5


@pytest.mark.parametrize("T", [1, 3])  # T == 1: the decode step's two batched products; T > 1: SDPA on latents
@torch.no_grad()
def test_latent_attention_equals_expanded_attention(tiny_model, T):
    mla = next(l.self_attn for l, kind in zip(tiny_model.model.layers, tiny_model.config.layer_types) if kind != KDA)
    B, S = 2, 40
    q = torch.randn(B, mla.num_heads, T, mla.q_head_dim)
    latent = torch.randn(B, S, mla.kv_lora_rank + mla.rope)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[0, :11] = False
    for mask in (None, build_attention_mask(key_mask, T, S, q.device)):
        assert rel_err(mla._attend_latent(q, latent, mask), mla._attend_expanded(q, latent, mask)) < 1e-5
    # no padding: the mask is torch's lower-right causal bias, never a [T, S] tensor; it must mean "query t (at
    # position S - T + t) sees keys 0 .. S - T + t", written out here as a boolean mask
    bias = build_attention_mask(None, T, S, q.device)
    assert not isinstance(bias, torch.Tensor) or bias.dtype != torch.bool
    explicit = (torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None])[None, None]
    for attend in (mla._attend_latent, mla._attend_expanded):
        assert rel_err(attend(q, latent, bias), mla._attend_expanded(q, latent, explicit)) < 1e-5


@torch.no_grad()
def test_generate_with_chunked_prefill_gives_the_same_tokens(tiny_model):
    ids = ids_for(2, 150, seed=8)
    plain = tiny_model.generate(ids, max_new_tokens=8, do_sample=False)
    chunked = tiny_model.generate(ids, max_new_tokens=8, do_sample=False, prefill_chunk_size=32)
    assert torch.equal(plain, chunked)


def moe_reference(moe: KimiLinearMoE, x, groups, topk_group, bias_in_weights):
    """Per-token float64 MoE written from the math: sigmoid scores, biased choice, grouped top-k, weights."""
    gate = moe.gate
    out = []
    for tok in x.double():
        scores = torch.sigmoid(gate.weight.double() @ tok)
        choice = scores + gate.e_score_correction_bias.double()
        per_group = choice.view(groups, -1)
        group_rank = per_group.sort(descending=True).values[:, :2].sum(-1).argsort(descending=True)[:topk_group]
        allowed = torch.zeros(groups, dtype=torch.bool)
        allowed[group_rank] = True
        masked = torch.where(allowed.repeat_interleave(per_group.shape[1]), choice, torch.tensor(-float("inf")))
        chosen = masked.argsort(descending=True)[: gate.top_k]
        w = (choice if bias_in_weights else scores)[chosen]
        w = w / w.sum() * gate.scaling
        y = sum(wi * moe.experts[int(e)].double()(tok) for wi, e in zip(w, chosen))
        out.append(y + moe.shared_experts.double()(tok))
    return torch.stack(out)


@pytest.mark.parametrize("groups, topk_group", [(1, 1), (4, 2)])
@pytest.mark.parametrize("bias_in_weights", [False, True])
@torch.no_grad()
def test_moe_matches_per_token_reference(groups, topk_group, bias_in_weights):
    cfg = tiny_config(num_expert_group=groups, topk_group=topk_group, moe_router_bias_in_weights=bias_in_weights)
    torch.manual_seed(0)
    moe = KimiLinearMoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.gate.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(1, 37, cfg.hidden_size)
    ours = moe(x)[0]
    ref = moe_reference(moe, x[0], groups, topk_group, bias_in_weights)
    assert rel_err(ours, ref) < 1e-5


@torch.no_grad()
def test_cache_holds_only_latents_and_reports_bytes(tiny_model):
    cfg = tiny_model.config
    B, T = 2, 33
    cache = KimiLinearCache(cfg)
    tiny_model(ids_for(B, T), cache=cache)
    n_kda = cfg.layer_types.count(KDA)
    n_mla = len(cfg.layer_types) - n_kda
    H, D, W = cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_conv_size
    sizes = cache.nbytes()
    assert sizes["mla_latent"] == B * T * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * n_mla * 4
    assert sizes["kda_recurrent"] == B * H * D * D * n_kda * 4
    assert sizes["kda_conv"] == 3 * B * H * D * (W - 1) * n_kda * 4
    assert sizes["total"] == sizes["mla_latent"] + sizes["kda_recurrent"] + sizes["kda_conv"]


@torch.no_grad()
def test_cache_batch_select_and_repeat(tiny_model):
    ids = ids_for(2, 30, seed=5)
    nxt = ids_for(2, 1, seed=6)
    base = KimiLinearCache(tiny_model.config)
    tiny_model(ids, cache=base)
    expected = tiny_model(torch.cat([ids, nxt], 1)).logits[:, -1]

    rep = KimiLinearCache(tiny_model.config)
    tiny_model(ids, cache=rep)
    rep.batch_repeat_interleave(2)
    got = tiny_model(nxt.repeat_interleave(2, 0), cache=rep).logits[:, -1]
    assert rel_err(got, expected.repeat_interleave(2, 0)) < 1e-5

    sel = KimiLinearCache(tiny_model.config)
    tiny_model(ids, cache=sel)
    sel.batch_select_indices(torch.tensor([1]))
    assert rel_err(tiny_model(nxt[1:], cache=sel).logits[:, -1], expected[1:]) < 1e-5

    beam = KimiLinearCache(tiny_model.config)
    tiny_model(ids, cache=beam)
    beam.reorder_cache(torch.tensor([1, 0]))
    assert rel_err(tiny_model(nxt.flip(0), cache=beam).logits[:, -1], expected.flip(0)) < 1e-5

    with pytest.raises(ValueError, match="cannot be cropped"):
        beam.crop(10)


@torch.no_grad()
def test_greedy_generate_equals_argmax_of_full_forward(tiny_model):
    ids = ids_for(1, 12, seed=7)
    out = tiny_model.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    seq = ids
    for _ in range(10):
        seq = torch.cat([seq, tiny_model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


@torch.no_grad()
def test_sampling_with_top_k_1_is_greedy(tiny_model):
    ids = ids_for(2, 9, seed=8)
    greedy = tiny_model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    sampled = tiny_model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=1, temperature=0.7)
    assert torch.equal(greedy, sampled)
    free = tiny_model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=50)
    assert free.shape == greedy.shape and (free[:, 9:] < tiny_model.config.vocab_size).all()


@torch.no_grad()
def test_beam_search_scores_match_a_fresh_forward(tiny_model):
    # If the cache were reordered wrongly between beams, the returned beams' scores (accumulated on the cache)
    # would not match the log-probabilities of the same sequences recomputed from scratch.
    ids = ids_for(1, 10, seed=9)
    n = 7
    out = tiny_model.generate(
        ids,
        num_beams=4,
        num_return_sequences=4,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        length_penalty=0.0,
        early_stopping=True,
        output_scores=True,
        return_dict_in_generate=True,
    )
    logp = torch.log_softmax(tiny_model(out.sequences, use_cache=False).logits.double(), -1)
    gen = out.sequences[:, 10:]
    recomputed = logp[:, 9:-1].gather(-1, gen[..., None]).squeeze(-1).sum(-1)
    assert torch.allclose(out.sequences_scores.double(), recomputed, atol=1e-4)
    assert len(set(map(tuple, gen.tolist()))) == 4


def test_training_reaches_every_selected_expert_and_checkpointing_matches():
    model = build_model().train()
    ids = ids_for(2, 70, seed=10)
    chosen = {}
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer, "block_sparse_moe"):
            layer.block_sparse_moe.gate.register_forward_hook(
                lambda mod, args, out, i=i: chosen.setdefault(i, set()).update(out[0].flatten().tolist())
            )
    model(ids, labels=ids).loss.backward()
    assert chosen
    for i, experts in chosen.items():
        for e, expert in enumerate(model.model.layers[i].block_sparse_moe.experts):
            grad = expert.w1.weight.grad
            reached = grad is not None and bool(grad.abs().sum() > 0)
            assert reached == (e in experts), (i, e)
    for name, p in model.named_parameters():
        if ".experts." in name:
            continue  # checked above: exactly the selected experts get gradients
        if "e_score_correction_bias" in name:
            assert p.grad is None  # selection-only bias: not trained
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if n in grads:
            assert rel_err(p.grad, grads[n]) < 1e-5, n


@torch.no_grad()
def test_latent_decode_respects_a_lora_adapter_on_kv_b_proj():
    # Absorbed (latent) decode reads kv_b_proj.weight; with an adapter on kv_b_proj that would silently drop the
    # adapter, so the model must fall back to the expanded path and still match one full forward.
    peft = pytest.importorskip("peft")
    model = build_model()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["kv_b_proj"], init_lora_weights=False)
    model = peft.get_peft_model(model, config).eval()
    ids = ids_for(1, 60, seed=12)
    full = model(input_ids=ids, use_cache=False).logits
    cache = KimiLinearCache(model.config)
    steps = [model(input_ids=ids[:, :40], cache=cache).logits]
    steps += [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(40, 60)]
    assert rel_err(torch.cat(steps, 1), full) < 1e-5
    with model.disable_adapter():
        assert rel_err(model(input_ids=ids, use_cache=False).logits, full) > 1e-3  # the adapter does change outputs


@torch.no_grad()
def test_bench_cache_per_token_is_a_quarter_of_all_mla_and_under_a_seventeenth_of_expanded_kv():
    # The bench configs' attention dimensions (32 KDA heads x 128, latent 512 + 64, 32 MLA heads), with the
    # hidden size, experts and vocabulary shrunk (they do not touch the cache). Bytes per additional token, float32.
    import json
    from pathlib import Path

    from kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM

    shrink = dict(hidden_size=64, head_dim=2, intermediate_size=64, moe_intermediate_size=16, num_experts=2,
                  num_experts_per_token=1, vocab_size=300)  # fmt: skip
    per_token, configs = {}, {}
    for name in ("bench_1b_hybrid", "bench_1b_all_mla"):
        d = json.loads((Path(__file__).parents[1] / "benchmarks" / "configs" / f"{name}.json").read_text())
        configs[name] = cfg = KimiLinearConfig(**{**d, **shrink})
        torch.manual_seed(0)
        model = KimiLinearForCausalLM(cfg).eval()
        totals = []
        for T in (8, 24):
            cache = KimiLinearCache(cfg)
            model(ids_for(1, T, vocab=300), cache=cache)
            totals.append(cache.nbytes()["total"])
        per_token[name] = (totals[1] - totals[0]) / 16
    hybrid, all_mla = per_token["bench_1b_hybrid"], per_token["bench_1b_all_mla"]
    cfg = configs["bench_1b_hybrid"]
    n_mla = len(cfg.layer_types) - cfg.layer_types.count(KDA)
    assert hybrid == n_mla * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # 576 values per MLA layer only
    assert hybrid / all_mla == 2 / 8  # the config's MLA share; KDA adds only its constant state
    # the released remote code caches per-head keys (nope + rope) and values for every MLA layer
    expanded = n_mla * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
    assert hybrid <= expanded / 17


def test_a_shape_without_a_cudnn_plan_rents_the_triton_kernel_until_the_rent_pays_for_a_build(monkeypatch):
    # The prefill attention's choice for a shape without a cuDNN plan (KimiMLAAttention._rent_triton), given the GPU
    # work queued ahead: a build the queue hides happens at once; otherwise each Triton run is charged a quarter of
    # the attention's time at 600 TFLOP/s, the build comes at the first layer whose stall (build time less queue) the
    # charges cover, and the build clears the shape's charges.
    import math

    import kimi_linear.modeling_kimi_linear as modeling
    from kimi_linear.modeling_kimi_linear import KimiMLAAttention

    monkeypatch.setattr(modeling._PLANS, "rent", {})
    monkeypatch.setattr(KimiMLAAttention, "plan_build_ms", 150.0)
    mla = KimiMLAAttention(tiny_config(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128), 3)
    q = torch.empty(1, mla.num_heads, 32768, 192, device="meta")
    assert not mla._rent_triton(q, "a", 160.0)  # 160 ms queued hides a 150 ms build
    per_run_ms = 0.25 * 32768**2 * mla.num_heads * (192 + 128) / 600e9
    runs = 0
    while mla._rent_triton(q, "b", 90.0):  # a build would stall the GPU 60 ms
        runs += 1
    assert runs == math.ceil(60 / per_run_ms), (runs, per_run_ms)
    assert "b" not in modeling._PLANS.rent


@torch.no_grad()
def test_half_types_on_a_cpu_without_native_products_warn_once_naming_float32():
    # a prompt in bfloat16 on a CPU without AVX512-BF16 or AMX warns once, naming the fix; float32 never warns
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("kimi_linear.modeling_kimi_linear")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    model = build_model()
    ids = ids_for(1, 5, seed=3)
    hf_logging.warning_once.cache_clear()
    with CaptureLogger(logger) as fp32:
        model(ids)
    with CaptureLogger(logger) as bf16:
        model.bfloat16()(ids)
    assert "no native" not in fp32.out
    assert ("dtype=torch.float32" in bf16.out) is not native, bf16.out
