"""Routed experts as grouped matrix products (moe_experts_grouped, the default) against the per-expert loop
(moe_experts_loop, the reference): outputs and every gradient, whole-model logits, LoRA-wrapped experts, the stacked
weights following every way parameters change, saving and loading, and the hot path free of host syncs."""

import copy
import weakref

import pytest
import torch
from accelerate.utils import set_module_tensor_to_device
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import id_tensor_storage

from conftest import build_model, rel_err, tiny_config
from kimi_linear.modeling_kimi_linear import (
    KimiLinearCache,
    KimiLinearForCausalLM,
    KimiLinearMoE,
    moe_experts_grouped,
    moe_experts_loop,
)


def make_moe(seed=0, dtype=torch.float32, std=0.2, **overrides):
    torch.manual_seed(seed)
    moe = KimiLinearMoE(tiny_config(**overrides))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, std)
        moe.gate.e_score_correction_bias.normal_(0, 0.3)
    return moe.to(dtype)


def reference(moe, x):
    """The same module through moe_experts_loop."""
    moe.grouped = False
    try:
        return moe(x)
    finally:
        moe.grouped = True


def set_grouped(model, on):
    for m in model.modules():
        if isinstance(m, KimiLinearMoE):
            m.grouped = on


@pytest.mark.parametrize(
    "shape, experts, top_k",
    [
        ((1, 1), 8, 2),  # decode: one token, 6 of 8 experts empty
        ((1, 1), 16, 4),
        ((1, 37), 8, 2),  # prefill
        ((3, 20), 16, 4),  # batch > 1
        ((2, 5), 16, 1),
        ((4, 1), 16, 4),  # batched decode
    ],
)
@torch.no_grad()
def test_grouped_matches_loop(shape, experts, top_k):
    moe = make_moe(num_experts=experts, num_experts_per_token=top_k)
    x = torch.randn(*shape, moe.gate.weight.shape[1])
    ids, _ = moe.gate(x.view(-1, x.shape[-1]))
    if shape[0] * shape[1] * top_k < experts:
        assert len(ids.unique()) < experts  # some experts have no tokens
    ours = moe(x)
    assert moe._stacked is not None  # the grouped path ran
    assert rel_err(ours, reference(moe, x)) < 1e-6


def test_grouped_gradients_match_loop():
    # inputs, router, shared expert and every routed expert's w1/w2/w3; an expert without tokens gets a zero
    # gradient from the grouped path where the loop leaves it None.
    moe = make_moe(num_experts=16, num_experts_per_token=2)
    ref = copy.deepcopy(moe)
    x = torch.randn(2, 3, moe.gate.weight.shape[1], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_out = torch.randn(2, 3, moe.gate.weight.shape[1])
    (moe(x) * w_out).sum().backward()
    (reference(ref, x_ref) * w_out).sum().backward()
    assert moe._stacked is not None and ref._stacked is None
    assert rel_err(x.grad, x_ref.grad) < 1e-6
    params = dict(moe.named_parameters())
    empty = 0
    for name, p in ref.named_parameters():
        ours = params[name].grad
        if name == "gate.e_score_correction_bias":
            assert p.grad is None and ours is None
        elif p.grad is None:
            assert name.startswith("experts.") and not ours.any(), name
            empty += 1
        else:
            assert rel_err(ours, p.grad) < 1e-6, name
    assert empty > 0  # the case was covered


@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_gradients_in_bfloat16_and_under_autocast(autocast):
    # bf16 weights (what CUDA runs), or float32 weights under CPU bf16 autocast (cast like nn.Linear's): within bf16
    # rounding of the loop, and the float32 parameters get gradients.
    dtype = torch.float32 if autocast else torch.bfloat16
    moe, x = make_moe(dtype=dtype), torch.randn(1, 29, 64, dtype=dtype, requires_grad=True)
    ref, x_ref = copy.deepcopy(moe), x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, out_ref = moe(x), reference(ref, x_ref)
    assert out.dtype == dtype and moe._stacked is not None
    assert rel_err(out, out_ref) < 1e-2
    out.float().square().sum().backward()
    out_ref.float().square().sum().backward()
    assert rel_err(x.grad, x_ref.grad) < 2e-2
    w, w_ref = moe.experts[3].w2.weight, ref.experts[3].w2.weight
    if w_ref.grad is not None:
        assert w.grad.dtype == dtype and rel_err(w.grad, w_ref.grad) < 2e-2


@torch.no_grad()
def test_whole_model_logits_unchanged_prefill_and_decode():
    model = build_model()
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    runs = {}
    for grouped in (True, False):
        set_grouped(model, grouped)
        cache = KimiLinearCache(model.config)
        steps = [model(ids[:, :16], cache=cache).logits]
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(16, 24)]
        runs[grouped] = torch.cat(steps, 1)
    assert rel_err(runs[True], runs[False]) < 1e-6


def grad_or_zeros(p):
    """A parameter's gradient, zeros where it got none (an expert no token picked, on the loop path)."""
    return p.grad.clone() if p.grad is not None else torch.zeros_like(p)


@pytest.mark.parametrize("rank", [4, 3])
def test_lora_on_experts_runs_grouped_like_the_loop(rank):
    # PEFT LoRA on every expert's w1, w3, w2: the grouped path adds the stacked adapters' terms; the loop calls each
    # wrapped module (PEFT's own forward, the reference). Same logits, same gradient for every adapter. Rank 3's float32
    # rows are 12 bytes, which torch._grouped_mm does not take: the grouped path pads them with zeros.
    model = build_model(seed=3)
    ids = torch.randint(3, 512, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(ids).logits  # stacks the experts first: adapters must work on stacked parameters too
    moe = model.model.layers[1].block_sparse_moe
    assert moe._stacked is not None
    config = LoraConfig(r=rank, lora_alpha=8, target_modules=r".*experts\.\d+\.w[123]", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    stacked, lora = moe._grouped_weights(torch.randn(5, model.config.hidden_size))
    assert stacked is not None and lora is not None  # wrapped experts stay on the grouped path
    runs = {}
    for grouped in (True, False):
        set_grouped(model, grouped)
        peft_model.zero_grad()
        logits = peft_model(ids).logits
        logits.square().mean().backward()
        grads = {n: grad_or_zeros(p) for n, p in peft_model.named_parameters() if "lora_" in n and ".experts." in n}
        runs[grouped] = logits.detach(), grads
    assert rel_err(runs[True][0], runs[False][0]) < 1e-5
    assert rel_err(runs[True][0], base) > 1e-3  # the adapters apply
    experts = sum(len(m.experts) for m in model.modules() if isinstance(m, KimiLinearMoE))
    assert runs[True][1].keys() == runs[False][1].keys() and len(runs[True][1]) == 2 * 3 * experts  # A, B; w1, w3, w2
    for name, g in runs[True][1].items():
        assert rel_err(g, runs[False][1][name]) < 1e-4, name
    set_grouped(model, True)
    with torch.no_grad():
        merged = peft_model.merge_and_unload()  # weights changed by the merge, modules plain nn.Linear again
        assert rel_err(merged(ids).logits, runs[True][0]) < 1e-5
    assert moe._stacked is not None


@torch.no_grad()
def test_lora_on_some_experts_only_runs_the_loop():
    model = build_model(seed=3)
    ids = torch.randint(3, 512, (2, 19), generator=torch.Generator().manual_seed(2))
    base = model(ids).logits
    moe = model.model.layers[1].block_sparse_moe
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*experts\.0\.w[123]", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    assert moe._grouped_weights(torch.randn(5, model.config.hidden_size)) == (None, None)  # the loop runs
    adapted = peft_model(ids).logits
    assert rel_err(adapted, base) > 1e-4
    with peft_model.disable_adapter():  # adapters off: the grouped path again, the base model's logits
        assert moe._grouped_weights(torch.randn(5, model.config.hidden_size))[0] is not None
        assert rel_err(peft_model(ids).logits, base) < 1e-6
    dora = get_peft_model(build_model(seed=3), LoraConfig(r=4, target_modules=r".*experts\.\d+\.w[123]", use_dora=True))
    moe = dora.base_model.model.model.layers[1].block_sparse_moe
    assert moe._grouped_weights(torch.randn(5, model.config.hidden_size)) == (None, None)  # another kind: the loop


def test_stacked_weights_follow_every_change_of_the_parameters():
    moe = make_moe()
    other = make_moe(seed=7)
    x = torch.randn(1, 40, 64)

    def check():
        with torch.no_grad():
            out = moe(x)
            assert moe._stacked is not None
            assert rel_err(out, reference(moe, x)) < 1e-6
        return out

    before = check()
    with torch.no_grad():  # an in-place edit of one expert
        moe.experts[5].w2.weight.mul_(-3)
    assert rel_err(check(), before) > 1e-3
    opt = torch.optim.AdamW(moe.parameters(), lr=0.05)  # optimizer steps update the stacked tensors
    for _ in range(2):
        moe(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        check()
    moe.load_state_dict(other.state_dict())  # in place
    assert rel_err(check(), other(x)) < 1e-6
    moe.load_state_dict(make_moe(seed=8).state_dict(), assign=True)  # new parameter objects
    assert rel_err(check(), make_moe(seed=8)(x)) < 1e-6
    moe.experts[2].w1.weight.data = torch.randn(32, 64)  # a rebound parameter
    check()
    moe.experts[0].w3.weight = torch.nn.Parameter(torch.randn(32, 64))  # a replaced parameter
    check()
    moe.experts[3].w1 = torch.nn.Linear(64, 32, bias=False)  # a replaced projection module
    check()
    moe.experts[6] = make_moe(seed=9).experts[6]  # a replaced expert
    check()
    moe.bfloat16()
    out = moe(x.bfloat16())
    assert moe._stacked[0].dtype == torch.bfloat16
    assert rel_err(out, reference(moe, x.bfloat16())) < 1e-2


def test_stacked_copy_goes_with_the_parameters_living_in_it():
    # accelerate's offloading puts each layer's weights in before its forward and swaps them for meta tensors after:
    # the stacked tensors must go with them (or every layer would keep its experts on the device), and the next
    # forward stacks the weights put back in.
    moe, x = make_moe(), torch.randn(1, 6, 64)
    saved = {n: p.detach().clone() for n, p in moe.experts.named_parameters()}
    with torch.no_grad():
        expected = reference(moe, x)
        for _ in range(2):
            assert rel_err(moe(x), expected) < 1e-6
            stacked = weakref.ref(moe._stacked[0])
            for name in saved:
                set_module_tensor_to_device(moe.experts, name, "meta")
            assert moe._stacked is None and stacked() is None
            for name, value in saved.items():
                set_module_tensor_to_device(moe.experts, name, "cpu", value=value)


def test_stacked_parameters_stay_trainable_after_inference_mode():
    moe = make_moe()
    with torch.inference_mode():
        moe(torch.randn(1, 9, 64))  # stacks here
    x = torch.randn(1, 9, 64, requires_grad=True)
    moe(x).sum().backward()
    assert sum(int(e.w1.weight.grad is not None and e.w1.weight.grad.any()) for e in moe.experts) >= 2


@torch.no_grad()
def test_stacked_model_saves_every_expert_and_loads_identically(tmp_path):
    model = build_model(seed=4)
    ids = torch.randint(3, 512, (1, 21), generator=torch.Generator().manual_seed(3))
    logits = model(ids).logits
    state = model.state_dict()
    # savers drop or clone tensors that share a storage (transformers, accelerate): the stacked experts must not
    assert len({id_tensor_storage(t) for t in state.values()}) == len(state)
    model.save_pretrained(tmp_path)
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path).eval()  # strict: every tensor present
    assert torch.equal(loaded(ids).logits, logits)
    clone = copy.deepcopy(model)
    assert all(m._stacked is None for m in clone.modules() if isinstance(m, KimiLinearMoE))
    assert torch.equal(clone(ids).logits, logits)


@pytest.mark.parametrize("overrides", [{"moe_intermediate_size": 10}, {"dtype": torch.float64}])
@torch.no_grad()
def test_reference_runs_where_grouped_mm_cannot(overrides):
    # widths that are not 16-byte multiples, and float64: torch._grouped_mm refuses both; the loop runs instead
    dtype = overrides.pop("dtype", torch.float32)
    moe = make_moe(dtype=dtype, **overrides)
    x = torch.randn(1, 13, 64, dtype=dtype)
    out = moe(x)
    assert moe._stacked is None
    assert torch.equal(out, reference(moe, x))


def test_hot_path_reads_no_tensor_data_on_the_host():
    # On the meta device tensors have shapes but no data: anything that reads values on the host (.item(), .tolist(),
    # bool(), .cpu(), nonzero, boolean-mask indexing, bincount, unique) raises there. So router + grouped experts +
    # shared expert, forward and backward, running on meta shows the hot path never waits for the device. (Meta's
    # _grouped_mm takes bfloat16 only, as CUDA's kernel does.) The reference loop reads its counts, and must fail.
    moe = make_moe(dtype=torch.bfloat16, num_expert_group=4, topk_group=2).to("meta")
    x = torch.empty(11, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    E, I, H = 8, 32, 64
    w13 = torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w2 = torch.empty(E, H, I, dtype=torch.bfloat16, device="meta", requires_grad=True)
    ids, weights = moe.gate(x)
    out = moe_experts_grouped(x, ids, weights, w13, w2) + moe.shared_experts(x)
    out.backward(torch.empty_like(out))
    assert out.shape == x.shape and w13.grad.shape == w13.shape and moe.gate.weight.grad is not None
    with pytest.raises((RuntimeError, NotImplementedError), match="(?i)meta"):
        moe_experts_loop(x, ids, weights, moe.experts)


def test_train_every_expert_gives_unpicked_experts_zero_gradients_and_changes_nothing_else():
    # what multi-process training sets: every process then reduces the same gradients (sharded training needs it)
    moe = make_moe(num_experts=16, num_experts_per_token=2)
    moe.grouped = False  # the loop, as adapters on the experts make it
    x = torch.randn(1, 3, moe.gate.weight.shape[1])
    plain = moe(x)
    plain.square().sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad(set_to_none=True)
    moe.train_every_expert = True
    touched = moe(x)
    touched.square().sum().backward()
    assert torch.equal(touched, plain)
    unpicked = 0
    for name, p in moe.named_parameters():
        if grads[name] is not None:
            assert torch.equal(p.grad, grads[name]), name
        elif name.startswith("experts."):
            assert p.grad is not None and not p.grad.any(), name
            unpicked += 1
        else:
            assert p.grad is None, name  # the selection-only bias stays out
    assert unpicked > 0
