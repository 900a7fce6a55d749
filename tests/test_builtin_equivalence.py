"""An independent second implementation: transformers' built-in `kimi_linear` (transformers >= 5.17) loads our
saved checkpoint (released layout, converted on its side) and must compute the same logits and greedy tokens."""

import pytest
import torch

from conftest import Builtin, build_model, needs_builtin, rel_err

pytestmark = needs_builtin


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    model = build_model(seed=11)
    with torch.no_grad():  # a non-zero selection bias, so that bias-for-selection-only routing is exercised
        for layer in model.model.layers:
            if hasattr(layer, "block_sparse_moe"):
                layer.block_sparse_moe.gate.e_score_correction_bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    theirs, info = Builtin.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model, theirs.eval()


@torch.no_grad()
def test_logits_match_builtin(pair):
    ours, theirs = pair
    ids = torch.randint(3, 512, (2, 150), generator=torch.Generator().manual_seed(1))
    assert rel_err(ours(ids).logits, theirs(ids).logits) < 1e-4


@torch.no_grad()
def test_greedy_tokens_match_builtin(pair):
    ours, theirs = pair
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(ours.generate(ids, **kwargs), theirs.generate(ids, **kwargs))
