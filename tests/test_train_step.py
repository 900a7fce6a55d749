"""finetune/train_step.py on CPU: which batches a CUDA graph can replay, the refusals, and that the eager step is a
plain training step (the same losses and adapters as a hand-written loop). Graph capture and replay against eager
steps: test_gpu.py."""

import copy

import peft
import pytest
import torch

from conftest import build_model
from kimi_linear_finetune.lora import collate, collate_packed
from kimi_linear_finetune.train_step import TrainStep, make_capturable, why_not_graphed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "kv_b_proj", "gate_proj"]


def lora_model():
    torch.manual_seed(0)
    model = peft.get_peft_model(build_model(), peft.LoraConfig(r=4, target_modules=TARGETS))
    for name, p in model.named_parameters():  # B starts at zero, which would leave A without gradients
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def test_only_full_rows_without_packing_are_graphed():
    full = collate([[5, 6, 7, 8], [9, 10, 11, 12]], pad_id=0)
    assert why_not_graphed(full) is None
    assert why_not_graphed({"input_ids": full["input_ids"], "labels": full["labels"]}) is None
    assert why_not_graphed(collate([[5, 6, 7, 8], [9, 10]], pad_id=0)) == "padding in the batch"
    packed = collate_packed([[[5, 6], [7, 8]]], pad_id=0)
    assert "position_ids" in why_not_graphed(packed)


def test_refusals_name_the_way_out():
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="CUDA device.*cuda_graph=False"):
        TrainStep(model, torch.optim.AdamW(params), cuda_graph=True)
    with pytest.raises(TypeError, match="Adam or AdamW, not SGD.*cuda_graph=False"):
        make_capturable(torch.optim.SGD(params, lr=0.1), torch.device("cpu"))


def test_eager_steps_equal_a_plain_training_loop():
    # Padded and full batches, clipping that bites, a schedule: TrainStep's losses, norms and adapters are those of
    # the loop every PyTorch user writes (a step that skipped zeroing the gradients, or clipped before the
    # backward, would not be).
    batches = [collate([[5 + i, 6, 7, 8, 9, 10], [11, 12, 13 + i, 14, 15, 16]], pad_id=0) for i in range(2)]
    batches.insert(1, collate([[5, 6, 7, 8, 9, 10], [11, 12, 13]], pad_id=0))

    def run(model, stepper):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: [1.0, 0.3, 2.0, 1.0][s])
        out = []
        for batch in batches:
            out.append(stepper(model, params, opt, batch))
            sched.step()
        return out, [p.detach().clone() for p in params]

    def plain(model, params, opt, batch):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 0.05)
        opt.step()
        opt.zero_grad()
        return float(loss), float(norm)

    runners = {}

    def ours(model, params, opt, batch):
        runner = runners.setdefault(id(model), TrainStep(model, opt, max_grad_norm=0.05))
        loss, norm = runner(batch)
        return float(loss), float(norm)

    model = lora_model()
    ref, ref_params = run(copy.deepcopy(model), plain)
    got, got_params = run(model, ours)
    assert [x for pair in got for x in pair] == pytest.approx([x for pair in ref for x in pair], rel=1e-6)
    for a, b in zip(got_params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert ref[0][1] > 0.05  # the clipping bites
