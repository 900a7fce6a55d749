"""KimiLinearStaticCache (preallocated cache, fixed-shape decode step) against KimiLinearCache, the growing cache:
the same logits and tokens for manual decode loops, greedy and sampled generate(), padded batches, beam search, prompts
that fill the cache, and clear errors past max_length. On CPU the decode step runs eagerly; the CUDA graph that
replays it on a GPU is tested in test_gpu.py."""

import json
import runpy
import sys

import pytest
import torch

from conftest import ROOT, rel_err, tiny_config, tiny_config_dict
from kimi_linear.configuration_kimi_linear import KDA
from kimi_linear.modeling_kimi_linear import (
    _CACHE_FIELD,
    KimiLinearCache,
    KimiLinearMoE,
    KimiLinearStaticCache,
    MLALayerState,
    MLAStaticLayerState,
    moe_experts_gathered,
    moe_experts_loop,
)
from test_model import ids_for, left_pad

CACHE = _CACHE_FIELD  # generate()'s name for a cache object: `cache` from transformers 5.24, before past_key_values


def cache_of(out):
    got = out.get("cache")  # transformers >= 5.24; before, past_key_values
    return got if got is not None else out.get("past_key_values")


def decode_loop(model, ids, prompt_len, cache, mask=None):
    """Logits of a prefill of prompt_len tokens, then of one token at a time (teacher forcing)."""
    steps = [model(ids[:, :prompt_len], attention_mask=None if mask is None else mask[:, :prompt_len], cache=cache)]
    for t in range(prompt_len, ids.shape[1]):
        part = None if mask is None else mask[:, : t + 1]
        steps.append(model(ids[:, t : t + 1], attention_mask=part, cache=cache))
    return torch.cat([s.logits for s in steps], 1)


@pytest.mark.parametrize("room", [0, 37])
@torch.no_grad()
def test_static_decode_equals_dynamic_decode_and_one_forward(tiny_model, room):
    ids = ids_for(2, 50, seed=20)
    dynamic = decode_loop(tiny_model, ids, 30, KimiLinearCache(tiny_model.config))
    cache = KimiLinearStaticCache(tiny_model.config, max_length=50 + room)
    static = decode_loop(tiny_model, ids, 30, cache)
    assert rel_err(static, dynamic) < 1e-5
    assert rel_err(static, tiny_model(ids, use_cache=False).logits) < 1e-5
    assert cache.get_seq_length() == 50 and int(cache.position) == 50
    assert cache.decode_mode == "eager (CUDA graphs need a CUDA device, the model runs on cpu)"
    # what is held: the KDA states as the growing cache holds them, the latents in the first 50 slots
    grown = KimiLinearCache(tiny_model.config)
    tiny_model(ids, cache=grown)
    for a, b in zip(cache.layers, grown.layers):
        for x, y in zip(a.tensors(), b.tensors()):
            assert x.shape == y.shape and rel_err(x, y) < 1e-5


@torch.no_grad()
def test_static_decode_with_a_tiny_buffer_takes_the_expanded_attention(tiny_model):
    # max_length < 8: a decode step attends over the whole (masked) buffer through the expanded (per-head) path
    ids = ids_for(1, 6, seed=21)
    cache = KimiLinearStaticCache(tiny_model.config, max_length=6)
    assert rel_err(decode_loop(tiny_model, ids, 2, cache), tiny_model(ids, use_cache=False).logits) < 1e-5


@torch.no_grad()
def test_padded_prefill_then_static_decode_equals_dynamic(tiny_model):
    prompts = [ids_for(1, n, seed=n)[0] for n in (4, 19, 33)]
    ids, mask = left_pad(prompts)
    cont = ids_for(3, 12, seed=22)
    full_ids = torch.cat([ids, cont], 1)
    full_mask = torch.cat([mask, torch.ones_like(cont)], 1)
    dynamic = decode_loop(tiny_model, full_ids, ids.shape[1], KimiLinearCache(tiny_model.config), full_mask)
    cache = KimiLinearStaticCache(tiny_model.config, max_length=full_ids.shape[1])
    static = decode_loop(tiny_model, full_ids, ids.shape[1], cache, full_mask)
    real = full_mask.bool()
    assert rel_err(static[real], dynamic[real]) < 1e-5
    assert torch.equal(cache.key_mask[:, : ids.shape[1]], mask.bool())


def spans_or_none(cache, full=None):
    """After a decode step: whether every MLA layer holds a span (the slots a GPU's one-pass attention reads instead
    of the decode mask: each row's first real slot to the step's own), asserting that each span lets through exactly
    the slots the mask does; False when no layer holds one (the mask rules). full: the step's attention mask, for the
    growing cache (the static cache's mask is its own)."""
    if isinstance(cache, KimiLinearStaticCache):
        last = int(cache.position) - 1  # the step's own slot
        keys = torch.arange(cache.max_length)
        allowed = cache.key_mask & (keys <= last)
    else:
        last = full.shape[1] - 1
        keys = torch.arange(full.shape[1])
        allowed = full.bool()
    spans = [layer.span for layer in cache.layers if isinstance(layer, MLALayerState)]
    assert len(spans) == cache.layer_types.count("full_attention") > 0
    if all(span is None for span in spans):
        return False
    for first, end in spans:
        assert end is cache.position if isinstance(cache, KimiLinearStaticCache) else end.tolist() == [last]
        assert torch.equal((keys >= first[:, None]) & (keys <= last), allowed), (first, allowed.int().argmax(1))
    return True


@torch.no_grad()
def test_decode_spans_let_through_exactly_what_the_mask_does(tiny_model):
    # Both caches: spans while each row's padding is a prefix of it, the mask alone otherwise. The growing cache reads
    # its spans from each step's attention mask (none without padding); the static cache from its prefill's.
    prompts = [ids_for(1, n, seed=n)[0] for n in (4, 19, 33)]
    ids, mask = left_pad(prompts)
    T = ids.shape[1]
    holes = mask.clone()
    holes[1, 20:23] = 0  # padding after a real token: no span can say that
    cache = KimiLinearStaticCache(tiny_model.config, max_length=T + 8)
    for prompt_mask, pieces, spans in [(mask, [T], True), (mask, [10, T - 10], True), (holes, [T], False),
                                       (torch.ones_like(mask), [T], True)]:  # fmt: skip
        cache.reset()
        dynamic = KimiLinearCache(tiny_model.config)
        start = 0
        for n in pieces:  # the prefill, whole or in two forwards
            for c in (cache, dynamic):
                tiny_model(ids[:, start : start + n], attention_mask=prompt_mask[:, : start + n], cache=c)
                assert spans_or_none(c, prompt_mask[:, : start + n]) is False
            start += n
        token, full = ids[:, -1:], prompt_mask
        for _ in range(4):
            full = torch.cat([full, torch.ones_like(token)], 1)
            got = tiny_model(token, attention_mask=full, cache=cache).logits
            want = tiny_model(token, attention_mask=full, cache=dynamic).logits
            assert rel_err(got, want) < 1e-5
            assert spans_or_none(cache) is spans
            assert spans_or_none(dynamic, full) is (spans and not bool(full.all()))
            token = got[:, -1:].argmax(-1)
        if spans:
            assert torch.equal(cache.first, (prompt_mask == 0).sum(1))
        step = torch.cat([full, torch.ones_like(token)], 1)
        step[0, -1] = 0  # a padded new token, after real ones: the growing cache's step takes the mask
        tiny_model(token, attention_mask=step, cache=dynamic)
        assert spans_or_none(dynamic, step) is False
        step = torch.cat([step, torch.ones_like(token)], 1)
        step[0] = 0  # a row of padding only, its new token too: no span holds nothing, the mask takes it
        tiny_model(token, attention_mask=step, cache=dynamic)
        assert spans_or_none(dynamic, step) is False
    cache.reset()
    dynamic = KimiLinearCache(tiny_model.config)
    beams = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)[[2, 0, 1]]
    for c in (cache, dynamic):
        tiny_model(ids, attention_mask=mask, cache=c)
        c.reorder_cache(torch.tensor([2, 0, 1]))  # beams reordered: each row's first real slot goes with it
        tiny_model(ids[:, -1:], attention_mask=beams, cache=c)
    assert spans_or_none(cache) and torch.equal(cache.first, (mask[[2, 0, 1]] == 0).sum(1))
    assert spans_or_none(dynamic, beams)


def generate_both(model, ids, **kwargs):
    """generate() with the growing cache and with the static one, same seed, logits returned."""
    kwargs = dict(kwargs, return_dict_in_generate=True, output_logits=True)
    torch.manual_seed(0)
    dynamic = model.generate(ids, cache_implementation="dynamic", **kwargs)
    torch.manual_seed(0)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert isinstance(cache_of(dynamic), KimiLinearCache) and not isinstance(cache_of(dynamic), KimiLinearStaticCache)
    assert isinstance(cache_of(static), KimiLinearStaticCache)
    return dynamic, static


def assert_same_generation(dynamic, static):
    assert torch.equal(static.sequences, dynamic.sequences)
    assert rel_err(torch.stack(static.logits), torch.stack(dynamic.logits)) < 1e-5


@torch.no_grad()
def test_greedy_generate_static_equals_dynamic(tiny_model):
    ids = ids_for(2, 11, seed=23)
    dynamic, static = generate_both(tiny_model, ids, max_new_tokens=15, min_new_tokens=15, do_sample=False)
    assert_same_generation(dynamic, static)
    cache = cache_of(static)
    # generate() sizes the cache to the prompt plus max_new_tokens - 1 (the last token is never fed back)
    assert cache.max_length == 11 + 15 - 1 == cache.get_seq_length()
    assert cache.decode_mode.startswith("eager (CUDA graphs need a CUDA device") and cache.graph_replays == 0


@torch.no_grad()
def test_sampled_generate_static_equals_dynamic(tiny_model):
    ids = ids_for(3, 7, seed=24)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=True, top_k=20, temperature=1.3)
    dynamic, static = generate_both(tiny_model, ids, **kwargs)
    assert_same_generation(dynamic, static)
    torch.manual_seed(1)
    other = tiny_model.generate(ids, cache_implementation="static", **kwargs)
    assert not torch.equal(other, static.sequences)  # the seed matters: sampling did happen


@torch.no_grad()
def test_left_padded_generate_static_equals_dynamic(tiny_model):
    ids, mask = left_pad([ids_for(1, n, seed=n)[0] for n in (3, 26, 9)])
    dynamic, static = generate_both(
        tiny_model, ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False
    )
    assert_same_generation(dynamic, static)


@torch.no_grad()
def test_beam_search_static_equals_dynamic(tiny_model):
    ids = ids_for(1, 10, seed=9)
    kwargs = dict(num_beams=3, num_return_sequences=3, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    dynamic, static = generate_both(tiny_model, ids, output_scores=True, **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    assert torch.allclose(static.sequences_scores, dynamic.sequences_scores, atol=1e-5)
    assert cache_of(static).batch_size == 3


@pytest.mark.parametrize("prompt_len, new", [(24, 1), (23, 2), (12, 13)])
@torch.no_grad()
def test_prompt_near_max_length(tiny_model, prompt_len, new):
    # a user cache of 24 tokens: a prompt that fills it, one that leaves one decode step, and a long generation
    ids = ids_for(1, prompt_len, seed=prompt_len)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    cache = KimiLinearStaticCache(tiny_model.config, max_length=prompt_len + new - 1)
    out = tiny_model.generate(ids, **{CACHE: cache}, **kwargs)
    assert torch.equal(out, tiny_model.generate(ids, **kwargs))
    assert cache.get_seq_length() == cache.max_length


@torch.no_grad()
def test_generation_past_max_length_is_refused(tiny_model):
    ids = ids_for(1, 20, seed=25)
    cache = KimiLinearStaticCache(tiny_model.config, max_length=24)
    with pytest.raises(ValueError, match=r"room for 29 tokens .* max_length=24"):
        tiny_model.generate(ids, **{CACHE: cache}, max_new_tokens=10, do_sample=False)
    assert cache.get_seq_length() == 0  # refused before anything ran
    tiny_model(ids, cache=cache)
    for t in range(4):
        tiny_model(ids[:, t : t + 1], cache=cache)
    with pytest.raises(ValueError, match=r"max_length=24 tokens: 24 are cached and 1 more"):
        tiny_model(ids[:, :1], cache=cache)
    with pytest.raises(ValueError, match=r"max_length=24 tokens: 0 are cached and 25 more"):
        tiny_model(ids_for(1, 25), cache=KimiLinearStaticCache(tiny_model.config, max_length=24))


@torch.no_grad()
def test_a_generation_continued_past_its_static_cache_grows_it(tiny_model):
    # generate() made the cache: a later generate() that continues it past its length grows it (the latents move to
    # larger buffers, the padding kept) and gives the tokens of one generation as long as both, on the growing cache
    prompts = [ids_for(1, n, seed=n)[0] for n in (6, 13)]
    ids, mask = left_pad(prompts)
    T = ids.shape[1]
    kwargs = dict(do_sample=False, return_dict_in_generate=True)
    first = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                                cache_implementation="static", **kwargs)  # fmt: skip
    cache = cache_of(first)
    assert isinstance(cache, KimiLinearStaticCache) and cache.made_by_generate and cache.max_length == T + 4
    held = [layer.buffer.clone() for layer in cache.layers if isinstance(layer, MLAStaticLayerState)]
    more = torch.cat([mask, torch.ones_like(first.sequences[:, T:])], 1)
    second = tiny_model.generate(first.sequences, attention_mask=more, max_new_tokens=7, min_new_tokens=7,
                                 **{CACHE: cache}, **kwargs)  # fmt: skip
    assert cache.max_length == T + 5 + 6 == cache.get_seq_length()
    grown = [layer.buffer for layer in cache.layers if isinstance(layer, MLAStaticLayerState)]
    assert all(torch.equal(g[:, : T + 4], h) for g, h in zip(grown, held))  # the cached latents, moved as they were
    whole = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                                cache_implementation="dynamic", **kwargs)  # fmt: skip
    assert not isinstance(cache_of(whole), KimiLinearStaticCache)
    assert torch.equal(second.sequences, whole.sequences)
    # a cache the caller built keeps its max_length: refused, naming the way out
    mine = KimiLinearStaticCache(tiny_model.config, max_length=T + 4)
    tiny_model.generate(ids, attention_mask=mask, max_new_tokens=5, **{CACHE: mine}, do_sample=False)
    with pytest.raises(ValueError, match=r"room for 24 tokens .* max_length=17. .* \(or call cache.grow\(n\)\)"):
        tiny_model.generate(first.sequences, attention_mask=more, max_new_tokens=7, **{CACHE: mine}, do_sample=False)


def test_generate_takes_the_growing_cache_off_cuda_and_says_why(tiny_model):
    assert tiny_model._auto_cache("greedy_search", 2, 100) == (
        "dynamic",
        "the model is on cpu: CUDA graphs need one CUDA device",
    )


@torch.no_grad()
def test_reset_reuses_the_cache_and_wrong_shapes_are_refused(tiny_model):
    ids = ids_for(2, 9, seed=26)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    cache = KimiLinearStaticCache(tiny_model.config, max_length=40, cuda_graph=False)
    first = tiny_model.generate(ids, **{CACHE: cache}, **kwargs)
    buffers = [t.data_ptr() for layer in cache.layers for t in layer.tensors()]
    cache.reset()
    assert cache.get_seq_length() == 0 and int(cache.position) == 0
    assert all(int(t.abs().sum()) == 0 for layer in cache.layers for t in layer.tensors())
    second = tiny_model.generate(ids.flip(0), **{CACHE: cache}, **kwargs)
    assert [t.data_ptr() for layer in cache.layers for t in layer.tensors()] == buffers  # nothing reallocated
    assert torch.equal(second, first.flip(0))
    assert cache.decode_mode == "eager (cuda_graph=False)"

    with pytest.raises(ValueError, match="batch_size=2, got a batch of 3"):
        tiny_model(ids_for(3, 1), cache=cache)
    with pytest.raises(ValueError, match="fixed batch size"):
        cache.batch_select_indices(torch.tensor([0]))
    with pytest.raises(ValueError, match="fixed batch size"):
        cache.batch_repeat_interleave(2)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(3)
    with pytest.raises(ValueError, match="either cache_implementation='static' or a cache object"):
        tiny_model.generate(ids, **{CACHE: cache}, cache_implementation="static", **kwargs)
    with pytest.raises(ValueError, match="'offloaded'"):
        tiny_model.generate(ids, cache_implementation="offloaded", **kwargs)


@torch.no_grad()
def test_cache_allocated_up_front_matches_lazy_allocation(tiny_model):
    ids = ids_for(2, 20, seed=27)
    cfg = tiny_model.config
    cache = KimiLinearStaticCache(cfg, max_length=20, batch_size=2, dtype=torch.float32, device="cpu")
    H, D, W = cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_conv_size
    for kind, layer in zip(cfg.layer_types, cache.layers):
        if kind == KDA:
            assert [tuple(t.shape) for t in layer.tensors()] == [(2, H * D, W - 1)] * 3 + [(2, H, D, D)]
            assert layer.recurrent.dtype == torch.float32
        else:
            assert tuple(layer.buffer.shape) == (2, 20, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    lazy = KimiLinearStaticCache(cfg, max_length=20)
    assert rel_err(decode_loop(tiny_model, ids, 14, cache), decode_loop(tiny_model, ids, 14, lazy)) < 1e-6
    wrong = KimiLinearStaticCache(cfg, max_length=20, batch_size=2, dtype=torch.bfloat16, device="cpu")
    with pytest.raises(ValueError, match="allocated for torch.bfloat16 activations"):
        tiny_model(ids, cache=wrong)


@pytest.mark.parametrize("N", [1, 5])
def test_gathered_experts_equal_the_loop(N):
    torch.manual_seed(0)
    moe = KimiLinearMoE(tiny_config())
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(N, moe.gate.weight.shape[1], requires_grad=True)
    moe(x)  # stacks the expert weights
    w13, w2 = moe._stacked[:2]
    with torch.no_grad():
        ids, weights = moe.gate(x)
    ours = moe_experts_gathered(x, ids, weights, w13, w2)
    ref = moe_experts_loop(x, ids, weights, moe.experts)
    assert rel_err(ours, ref) < 1e-6
    (g_ours,) = torch.autograd.grad(ours.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert rel_err(g_ours, g_ref) < 1e-5


def test_decode_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "bench"
    tiny = ROOT / "conversion" / "configs" / "tiny.json"
    bench = runpy.run_path(str(ROOT / "benchmarks" / "decode_gpu.py"))
    bench["main"](["--device", "cpu", "--configs", str(tiny), "--contexts", "64", "128", "--batches", "1", "2",
                   "--steps", "2", "--warmup", "1", "--no-builtin", "--out-dir", str(out)])  # fmt: skip
    result = json.loads((out / "decode_gpu.json").read_text())
    rows = {(r["variant"], r["batch"], r["context"]): r for r in result["rows"]}
    assert len(rows) == 3 * 2 * 2 and (out / "decode_gpu.png").exists()
    cfg = tiny_config()
    H, K, W, n_kda = cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_conv_size, cfg.layer_types.count(KDA)
    latent = (len(cfg.layer_types) - n_kda) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2  # bfloat16 latents
    kda = n_kda * (H * K * K * 4 + 3 * H * K * (W - 1) * 2)  # float32 state, bfloat16 conv windows
    for B in (1, 2):
        for ctx in (64, 128):
            graph, eager = rows[("hybrid cuda_graph", B, ctx)], rows[("hybrid eager", B, ctx)]
            assert graph["status"] == eager["status"] == "ok" and graph["tpot_ms"] > 0 and eager["tpot_ms"] > 0
            assert graph["decode_mode"].startswith("eager (CUDA graphs need a CUDA device")
            # what the cache held, from its tensors, against the count from the config
            assert graph["cache_bytes_per_token_measured"] == pytest.approx(latent + kda / graph["cache_tokens"])
        # the floor grows with the context by the MLA latents read, and nothing else
        grow = rows[("hybrid floor", B, 128)]["bytes_per_step"] - rows[("hybrid floor", B, 64)]["bytes_per_step"]
        assert grow == pytest.approx(B * 64 * latent)
    assert result["cache_bytes_per_token"]["64"]["hybrid"] == pytest.approx(latent + kda / 64)


def test_streaming_script_with_each_cache_streams_the_same_text(tmp_path, monkeypatch, capsys):
    from kimi_linear_conversion.random_checkpoint import make_random_checkpoint

    ckpt = make_random_checkpoint(ROOT / "conversion" / "configs" / "tiny.json", tmp_path / "ckpt", seed=4)
    graph = (
        "cuda_graph" if torch.cuda.is_available() else "eager (CUDA graphs need a CUDA device, the model runs on cpu)"
    )
    texts = []
    for switch, mode in [(["--cache", "dynamic"], "eager (KimiLinearCache)"), (["--cuda-graph"], graph),
                         ([], graph if torch.cuda.is_available() else "eager (KimiLinearCache)")]:  # fmt: skip
        argv = ["generate.py", "--model", str(ckpt), "--greedy", "--max-new-tokens", "16", *switch, "Hello"]
        monkeypatch.setattr(sys, "argv", argv)
        runpy.run_path(str(ROOT / "generate.py"), run_name="__main__")
        out = capsys.readouterr()
        texts.append(out.out)
        assert "[16 tokens in" in out.err and f"decode: {mode}]" in out.err, out.err
    assert texts[0] == texts[1] == texts[2] and len(texts[0]) > len("Hello")


def test_prefill_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "bench"
    hybrid = tiny_config_dict()
    mla = dict(hybrid, linear_attn_config=dict(hybrid["linear_attn_config"], kda_layers=[],
               full_attn_layers=list(range(1, hybrid["num_hidden_layers"] + 1))))  # fmt: skip
    paths = []
    for name, cfg in (("hybrid", hybrid), ("mla", mla)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(cfg))
    bench = runpy.run_path(str(ROOT / "benchmarks" / "prefill_gpu.py"))
    result = bench["main"](["--device", "cpu", "--dtype", "float32", "--configs", *map(str, paths),
                            "--contexts", "96", "160", "--chunk", "64", "--out-dir", str(out)])  # fmt: skip
    assert json.loads((out / "prefill_gpu.json").read_text()) == result and (out / "prefill_gpu.png").exists()
    rows = {(r["model"], r["context"]): r for r in result["rows"]}
    assert all(r["status"] == "ok" and r["tokens"] == r["context"] for r in rows.values())
    assert set(result["all_mla_over_hybrid"]) == {"96", "160"}
    cfg = tiny_config()
    latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # float32 latents per MLA layer and token
    # the all-MLA cache is latents alone, every layer; the hybrid's grows only by its MLA layers' latents
    assert rows[("all-MLA", 160)]["cache_bytes"] == 160 * latent * len(cfg.layer_types)
    n_mla = len(cfg.layer_types) - cfg.layer_types.count(KDA)
    assert rows[("hybrid", 160)]["cache_bytes"] - rows[("hybrid", 96)]["cache_bytes"] == 64 * latent * n_mla
