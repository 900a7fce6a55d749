"""Diagnostic for test_gpu.py's packed-row test (run on a CUDA machine from tests/): how far the packed row's logits
are from the separate rows', with the short conv in Triton and in PyTorch, in bf16 and in float32, token by token
(routing ties concentrate the gap in a few tokens; a leak across documents spreads it over every later document),
and how many MoE tokens picked different experts packed and alone."""

import torch
from transformers import DataCollatorWithFlattening

import kimi_linear.modeling_kimi_linear as M
from conftest import build_model, tiny_config_dict


def rel_rms(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def torch_conv(fn):
    def wrapped(*args, **kwargs):
        saved, M._triton_kernels = M._triton_kernels, lambda x: None
        try:
            return fn(*args, **kwargs)
        finally:
            M._triton_kernels = saved

    return wrapped


def routes(model):
    """Forward hooks recording each MoE layer's chosen experts, per call."""
    seen = []
    for mod in model.modules():
        if type(mod).__name__ == "KimiLinearRouter":
            mod.register_forward_hook(lambda m, i, o: seen.append(o[0].detach().sort(-1).values))
    return seen


def main():
    lac = dict(tiny_config_dict()["linear_attn_config"], num_heads=32, head_dim=128)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run (the plain path both ways)
    base = build_model(linear_attn_config=lac).to(dev)
    gen = torch.Generator().manual_seed(6)
    docs = [torch.randint(3, 512, (n,), generator=gen) for n in (37, 1, 200, 64)]
    batch = DataCollatorWithFlattening()([{"input_ids": d.tolist()} for d in docs])
    ids, pos = batch["input_ids"].to(dev), batch["position_ids"].to(dev)
    originals = (M.short_conv, M.short_conv_varlen)
    for dtype in (torch.bfloat16, torch.float32):
        model = base.to(dtype).train()
        seen = routes(model)
        for conv in ("triton", "torch"):
            if conv == "torch":
                M.short_conv, M.short_conv_varlen = (torch_conv(f) for f in originals)
            with torch.enable_grad():  # as the test trains: autograd keeps every token on the training path
                seen.clear()
                packed = model(ids, position_ids=pos, use_cache=False).logits[0].detach()
                packed_routes = [r.clone() for r in seen]
                seen.clear()
                alone = torch.cat([model(d[None].to(dev), use_cache=False).logits[0].detach() for d in docs])
                alone_routes = [torch.cat(seen[i :: len(packed_routes)]) for i in range(len(packed_routes))]
            M.short_conv, M.short_conv_varlen = originals
            per_token = (packed.float() - alone.float()).norm(dim=-1) / alone.float().norm(dim=-1)
            flips = sum(int((a.reshape(-1, a.shape[-1]) != b.reshape(-1, b.shape[-1])).any(-1).sum())
                        for a, b in zip(packed_routes, alone_routes))  # fmt: skip
            top = per_token.topk(5).values.tolist()
            print(f"{str(dtype):15s} conv {conv:6s}: gap {rel_rms(packed, alone):.4f}, per-token median "
                  f"{per_token.median():.4f}, top 5 {[round(x, 3) for x in top]}, tokens routed differently "
                  f"(summed over MoE layers) {flips}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
