"""Prefill graphs (KimiLinearForCausalLM.capture_prefill_graphs): a fresh prefill replayed from a CUDA graph captured
at a padded length. On CPU: the padded prefill the graphs capture (padding an identity step for KDA, hidden by MLA's
causal attention) against the prompt run alone, in float64, through the logits, every cached state and the decode
steps after it; the padded lengths; the errors and the fallbacks' reasons; _ModelState, which tells a captured graph
(prefill or decode) that the model changed; the check's benchmark. On a GPU: the replays against eager prefills and
a float64 reference, generate(), the fallbacks, that a replay never syncs, and that copies of the model or of a
static cache leave the graphs behind."""

import copy
import json
import pickle
import runpy

import pytest
import torch

from conftest import ROOT, build_model, rel_err, rel_rms, tiny_config_dict
from kimi_linear.configuration_kimi_linear import KDA
from kimi_linear.modeling_kimi_linear import (
    KimiLinearCache,
    KimiLinearStaticCache,
    _ModelState,
    _PrefillGraphs,
    _take_prefill,
    prefill_buckets,
)
from test_model import ids_for


def test_padded_lengths_hold_every_length_with_little_padding():
    assert prefill_buckets(1) == [64] and prefill_buckets(64) == [64] and prefill_buckets(65) == [64, 128]
    buckets = prefill_buckets(8192)
    assert len(buckets) == 40 and buckets[-1] == 8192 and buckets == sorted(set(buckets))
    assert all(b % 64 == 0 for b in buckets)
    for T in range(1, 8193):
        padded = next(b for b in buckets if b >= T)
        assert padded - T < max(64, T / 8), T  # under 64 tokens, or under 1/8 of the prompt
    assert prefill_buckets(8193)[-1] == 9216  # the first that holds it


def decode(model, cache, ids):
    """Logits of one decode step per token of ids [B, n] on cache."""
    return torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])], 1)


@pytest.mark.parametrize("T, padded", [(1, 64), (2, 8), (3, 8), (40, 64), (64, 64), (70, 128)])
@pytest.mark.parametrize("static", [False, True])
@torch.no_grad()
def test_padded_prefill_leaves_what_the_prompt_alone_leaves(T, padded, static):
    model = build_model(dtype=torch.float64)
    ids, junk, cont = ids_for(2, T, seed=T), ids_for(2, padded - T, seed=99), ids_for(2, 5, seed=7)
    make = lambda: (  # noqa: E731
        KimiLinearStaticCache(model.config, max_length=T + 5) if static else KimiLinearCache(model.config)
    )
    alone = make()
    expected = model(ids, cache=alone, logits_to_keep=1).logits
    staging = KimiLinearStaticCache(model.config, max_length=padded, batch_size=2, dtype=torch.float64, device="cpu")
    staging.reset()
    got = model._padded_prefill_logits(torch.cat([ids, junk], 1), torch.tensor([T]), staging)
    # float64 but for the router, which computes in float32 (its products may round differently at another row count)
    assert got.shape == expected.shape and rel_err(got, expected) < 1e-6
    cache = make()
    _take_prefill(staging, cache, 2, T, torch.device("cpu"))
    assert cache.get_seq_length() == alone.get_seq_length() == T
    for kind, a, b, s in zip(model.config.layer_types, cache.layers, alone.layers, staging.layers):
        for x, y, z in zip(a.tensors(), b.tensors(), s.tensors(), strict=True):
            assert x.shape == y.shape, kind
            assert rel_err(x, y) < 1e-6 or (kind == KDA and x.abs().max() == y.abs().max() == 0), kind
            assert x.untyped_storage().data_ptr() != z.untyped_storage().data_ptr()  # copies: staging is reused
    # the junk never reaches the state: decoding on from either cache gives the same logits
    assert rel_err(decode(model, cache, cont), decode(model, alone, cont)) < 1e-6


def test_capture_needs_a_gpu_and_sane_arguments():
    model = build_model()
    with pytest.raises(RuntimeError, match="CUDA graphs; the model is on cpu"):
        model.capture_prefill_graphs(256)
    for bad in (0, -5, 2.5, None):
        with pytest.raises(ValueError, match="positive ints"):
            model.capture_prefill_graphs(bad)
    assert model.prefill_mode is None and "_prefill_graphs" not in model.__dict__


def test_what_a_graph_cannot_hold_is_named_before_anything_runs():
    # the checks a prefill passes before a replay, on graphs' bookkeeping for one row and up to 128 tokens (no graph
    # is captured or needed on the CPU: each of these stops before the replay)
    model = build_model()
    graphs = _PrefillGraphs.__new__(_PrefillGraphs)
    graphs.batch_size, graphs.buckets, graphs.ids = 1, [64, 128], torch.zeros(1, 128, dtype=torch.long)
    ids = ids_for(1, 40)
    with torch.no_grad():
        cases = [
            (dict(input_ids=ids, logits_to_keep=0), "logits_to_keep=0 (a graph makes the last token's logits only"),
            (dict(input_ids=ids_for(2, 40)), "a batch of 2 rows (the graphs were captured for 1)"),
            (dict(input_ids=ids_for(1, 129)), "129 tokens (the graphs were captured for up to 128)"),
            (dict(input_ids=ids[:, :0]), "an empty prompt"),
            (
                dict(input_ids=ids, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0)),
                "padding in the batch",
            ),
            (dict(input_ids=ids, position_ids=torch.arange(40).remainder(20)[None]), "packed documents"),
        ]
        for kwargs, reason in cases:
            kwargs = {"attention_mask": None, "position_ids": None, "logits_to_keep": 1, **kwargs}
            assert graphs.obstacle(model, cu_seq_lens=None, **kwargs).startswith(reason)
        model.train()
        reason = graphs.obstacle(model, ids, None, None, 1, None)
        assert reason == "the model is in training mode (model.eval() for inference)"
    assert graphs.obstacle(build_model(), ids, None, None, 1, None) == "autograd is on"


def test_model_state_sees_every_change_a_graph_would_miss_and_none_it_would_not():
    # a captured graph reads its tensors' values when it replays (in-place edits are seen) and everything else as it
    # was at the capture: each change below must show
    model = build_model()
    state = _ModelState(model)
    assert state.matches(model) and not state.matches(build_model())
    with torch.no_grad():  # in place: the graph reads it
        model.lm_head.weight.mul_(2)
        model.model.layers[1].block_sparse_moe.gate.e_score_correction_bias.add_(1)
    assert state.matches(model)
    changes = [
        lambda m: setattr(m.lm_head, "weight", torch.nn.Parameter(m.lm_head.weight.detach().clone())),
        lambda m: setattr(m.lm_head.weight, "data", m.lm_head.weight.detach().clone()),
        lambda m: m.to(torch.float64),
        lambda m: setattr(m.model.layers[0], "mlp", copy.deepcopy(m.model.layers[0].mlp)),  # same values, new module
        lambda m: m.model.norm.register_buffer("extra", torch.zeros(1)),
        lambda m: m.load_state_dict(build_model(seed=1).state_dict(), assign=True),
    ]
    for i, change in enumerate(changes):
        model = build_model()
        state = _ModelState(model)
        change(model)
        assert not state.matches(model), i


def test_model_state_sees_adapters_added_switched_merged_and_rescaled():
    peft = pytest.importorskip("peft")
    model = build_model()
    state = _ModelState(model)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    assert not state.matches(model)  # adapters injected: the graph's modules are gone
    state = _ModelState(model)
    assert state.adapters and state.matches(model)
    with lora.disable_adapter():
        assert not state.matches(model)
    assert state.matches(model)
    lora.base_model.merge_adapter()
    assert not state.matches(model)
    lora.base_model.unmerge_adapter()
    assert state.matches(model)
    layer = state.adapters[0]
    layer.set_scale("default", 0.5)
    assert not state.matches(model)
    layer.set_scale("default", 1.0)
    assert state.matches(model)


def test_graph_check_benchmark_runs_on_cpu(tmp_path):
    bench = runpy.run_path(str(ROOT / "benchmarks" / "graph_checks.py"))
    bench["main"](["--models", "bench", "--rounds", "2", "--out-dir", str(tmp_path)])
    result = json.loads((tmp_path / "graph_checks.json").read_text())["results"]["bench"]
    model = bench["build"]("bench")
    assert result["modules"] == len(list(model.modules())) and result["tensors"] >= len(list(model.parameters()))
    assert len(result["model_state_runs_ms"]) == len(result["walk_signature_runs_ms"]) == 2
    assert (tmp_path / "graph_checks.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------------------------
LAC = dict(tiny_config_dict()["linear_attn_config"], num_heads=32, head_dim=128)  # the released head shape


def cuda_model(dtype=torch.bfloat16):
    return build_model(linear_attn_config=LAC).cuda().to(dtype)


def prompt(B, T, seed=0):
    return ids_for(B, T, seed=seed).cuda()


def no_worse(got, eager, ref):
    """Whether got (bf16, a replayed prefill) is as close to ref (float64) as eager (bf16, the eager prefill) is, give
    or take bf16 rounding."""
    return rel_rms(got, ref) <= 1.5 * rel_rms(eager, ref) + 4e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestOnGpu:
    @torch.no_grad()
    def test_replayed_prefill_is_as_accurate_as_eager(self):
        model, ref_model = cuda_model(), build_model(dtype=torch.float64, linear_attn_config=LAC)
        runs = {}
        for T in (1, 5, 63, 64, 65, 200, 256):
            ids, cont = ids_for(2, T, seed=T), ids_for(2, 4, seed=100 + T)
            ref_cache, eager_cache = KimiLinearCache(model.config), KimiLinearCache(model.config)
            ref = ref_model(ids, cache=ref_cache, logits_to_keep=1).logits
            eager = model(ids.cuda(), cache=eager_cache, logits_to_keep=1).logits
            runs[T] = ids, cont, ref, ref_cache, eager, eager_cache
        assert model.capture_prefill_graphs(256, batch_size=2, progress=False) == [64, 128, 192, 256]
        for T, (ids, cont, ref, ref_cache, eager, eager_cache) in runs.items():
            padded = next(b for b in (64, 128, 192, 256) if b >= T)
            for static in (False, True):
                cache = KimiLinearCache(model.config)
                if static:
                    cache = KimiLinearStaticCache(model.config, max_length=T + 4)
                got = model(ids.cuda(), cache=cache, logits_to_keep=1).logits
                assert model.prefill_mode == f"cuda_graph ({T} tokens as {padded})"
                assert no_worse(got, eager, ref), (T, static, rel_rms(got, ref), rel_rms(eager, ref))
                assert cache.get_seq_length() == T
                for a, b, r in zip(cache.layers, eager_cache.layers, ref_cache.layers):
                    for x, y, z in zip(a.tensors(), b.tensors(), r.tensors(), strict=True):
                        assert x.shape == y.shape and no_worse(x, y, z), (T, static)
                # decoding on: each comparison starts from a copy (a decode step moves a cache on)
                steps = [
                    decode(m, copy.deepcopy(c), i)
                    for m, c, i in (
                        (model, cache, cont.cuda()),
                        (model, eager_cache, cont.cuda()),
                        (ref_model, ref_cache, cont),
                    )
                ]
                assert no_worse(*steps), (T, static)

    @torch.no_grad()
    def test_float32_is_refused_with_the_reason(self):
        with pytest.raises(ValueError, match=r"bfloat16 on sm90/sm100 only \(this model: torch.float32"):
            cuda_model(torch.float32).capture_prefill_graphs(128)

    @pytest.mark.parametrize("implementation", ["dynamic", "static"])
    @torch.no_grad()
    def test_generate_replays_the_prefill(self, implementation):
        model = cuda_model()
        ids, n = prompt(1, 150, 3), 12
        model.capture_prefill_graphs(512, progress=False)
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             cache_implementation=implementation)  # fmt: skip
        assert model.prefill_mode == "cuda_graph (150 tokens as 192)"
        # the same steps by hand: the replayed prefill, then greedy decode steps on the same kind of cache
        static = implementation == "static"
        cache = KimiLinearStaticCache(model.config, max_length=150 + n - 1) if static else KimiLinearCache(model.config)
        tokens = [model(ids, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(n - 1):
            tokens.append(model(tokens[-1], cache=cache).logits[:, -1].argmax(-1, keepdim=True))
        assert torch.equal(out, torch.cat([ids, *tokens], 1))

    @torch.no_grad()
    def test_what_the_graphs_do_not_hold_runs_eagerly_and_says_why(self):
        model = cuda_model()
        model.capture_prefill_graphs(128, progress=False)
        ids = prompt(1, 40)
        expected = model(ids, logits_to_keep=1).logits
        first_token_masked = torch.ones_like(ids)
        first_token_masked[0, 0] = 0
        cases = [
            (dict(input_ids=prompt(2, 40)), "eager (a batch of 2 rows (the graphs were captured for 1))"),
            (dict(input_ids=prompt(1, 129)), "eager (129 tokens (the graphs were captured for up to 128))"),
            (dict(input_ids=ids, logits_to_keep=0), "eager (logits_to_keep=0 (a graph makes the last token's"),
            (dict(input_ids=ids, attention_mask=first_token_masked), "eager (padding in the batch)"),
            (
                dict(input_ids=ids, position_ids=torch.arange(40, device="cuda").remainder(20)[None]),
                "eager (packed documents)",
            ),  # fmt: skip
        ]
        for kwargs, mode in cases:
            kwargs.setdefault("logits_to_keep", 1)
            model(**kwargs)
            assert model.prefill_mode.startswith(mode), (model.prefill_mode, mode)
        with torch.enable_grad():
            model(ids, logits_to_keep=1)
        assert model.prefill_mode == "eager (autograd is on)"
        # a decode step after a prefill is not a prefill: the mode stays
        cache = KimiLinearCache(model.config)
        model(ids, cache=cache, logits_to_keep=1)
        model(ids[:, :1], cache=cache, logits_to_keep=1)
        assert model.prefill_mode == "cuda_graph (40 tokens as 64)"
        # new parameters: the graphs would read the old ones; eager, with the new weights, until captured again
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.flip(0).clone())
        changed = model(ids, logits_to_keep=1).logits
        assert model.prefill_mode == "eager (the model changed since the capture)"
        assert rel_rms(changed, expected) > 0.1
        model.capture_prefill_graphs(128, progress=False)
        regraphed = model(ids, logits_to_keep=1).logits  # the new weights (bf16 rounding apart), not the old ones
        assert model.prefill_mode.startswith("cuda_graph")
        assert rel_rms(regraphed, changed) < 0.1 and rel_rms(regraphed, expected) > 0.5
        model.release_prefill_graphs()
        model(ids, logits_to_keep=1)
        assert model.prefill_mode is None and "_prefill_graphs" not in model.__dict__

    @torch.no_grad()
    def test_a_replayed_prefill_never_syncs(self):
        model = cuda_model()
        model.capture_prefill_graphs(128, progress=False)
        ids = prompt(1, 100)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for cache in (KimiLinearCache(model.config), KimiLinearStaticCache(model.config, max_length=120)):
                out = model(ids, cache=cache, logits_to_keep=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert model.prefill_mode == "cuda_graph (100 tokens as 128)"
        assert out.logits.shape == (1, 1, model.config.vocab_size)

    @torch.no_grad()
    def test_copies_leave_the_graphs_behind_and_a_copied_cache_decodes_through_its_own(self):
        model = cuda_model()
        model.capture_prefill_graphs(128, progress=False)
        ids, n = prompt(1, 100, 5), 6
        cache = KimiLinearStaticCache(model.config, max_length=100 + n + 1)
        token = model(ids, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)  # captures the decode graph
        assert model.prefill_mode == "cuda_graph (100 tokens as 128)" and cache.graph_replays == 1
        # the prompt-reuse recipe: decode on from a copy of the cache, then from the cache itself; each replays a
        # graph of its own tensors (a shared graph would write the copy's steps into the original's state)
        twin_cache = copy.deepcopy(cache)
        tokens = []
        for c in (twin_cache, cache):
            steps = [token]
            for _ in range(n - 1):
                steps.append(model(steps[-1], cache=c).logits[:, -1].argmax(-1, keepdim=True))
            assert c.decode_mode == "cuda_graph"
            tokens.append(torch.cat(steps, 1))
        assert twin_cache.graph_replays == n - 1 and cache.graph_replays == n
        assert torch.equal(tokens[0], tokens[1])
        # a copied or unpickled model prefills eagerly (no graphs), and the original still replays its own
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), copy.copy(model)):
            assert "_prefill_graphs" not in twin.__dict__
            twin(ids, logits_to_keep=1)
            assert twin.prefill_mode is None
        model(ids, logits_to_keep=1)
        assert model.prefill_mode == "cuda_graph (100 tokens as 128)"
