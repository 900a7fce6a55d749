"""PEFT's LoRA linear layers with the adapter products fused (kimi_linear_kernels.lora_linear) where that serves.

    import peft
    from kimi_linear_finetune.fast_lora import fuse_lora
    model = peft.get_peft_model(model, peft.LoraConfig(...))
    fuse_lora(model)            # returns how many layers now take the fused path when it serves

`fuse_lora` turns each of PEFT's `lora.Linear` layers into a `FusedLoraLinear`, a subclass with the same parameters,
state dict, adapter files, merging and unloading: only its forward changes, and only when the call is the plain case
(one active adapter, unmerged, no dropout while training, no DoRA or other variant, no bias on lora_B, a plain
nn.Linear base with frozen weights, half-precision CUDA activations with float32 adapters, no autocast). Every other
call (CPU, float32 models, mixed adapter batches, ...) runs PEFT's own forward unchanged. The arithmetic is PEFT's:
float32 adapter products, one rounding to the activations' dtype (kernels/lora.py). `train_lora` applies it.
"""

import torch
from torch import nn

import kimi_linear_kernels as kernels


def _lora_linear_class():
    from peft.tuners.lora import Linear

    return Linear


class _Fused:
    """Mixed into PEFT's lora.Linear (FusedLoraLinear below): the fused forward where it serves."""

    def _fused_args(self, x, args, kwargs):
        """(weight, bias, lora_A, lora_B, scaling) when this call can take the fused path, else None."""
        if args or kwargs or self.disable_adapters or self.merged or getattr(self, "fan_in_fan_out", False):
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        (name,) = active
        if name in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(name):
            return None
        dropout = self.lora_dropout[name]
        if not isinstance(dropout, nn.Identity) and not (isinstance(dropout, nn.Dropout) and not dropout.training):
            return None
        base, lora_a, lora_b = self.get_base_layer(), self.lora_A[name], self.lora_B[name]
        if type(base) is not nn.Linear or type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
            return None
        if lora_a.bias is not None or lora_b.bias is not None:
            return None
        if not kernels.lora_serves(x, base.weight, base.bias, lora_a.weight, lora_b.weight):
            return None
        return base.weight, base.bias, lora_a.weight, lora_b.weight, self.scaling[name]

    def forward(self, x, *args, **kwargs):
        fused = self._fused_args(x, args, kwargs)
        if fused is None:
            return super().forward(x, *args, **kwargs)
        return kernels.lora_linear(x, *fused)


_classes = {}


def fused_class():
    """FusedLoraLinear: PEFT's lora.Linear with the fused forward (made once PEFT is imported)."""
    if "linear" not in _classes:
        base = _lora_linear_class()
        _classes["linear"] = type(
            "FusedLoraLinear", (_Fused, base), {"__module__": __name__, "__doc__": _Fused.__doc__}
        )
    return _classes["linear"]


def _swap(model, old, new):
    """Turn every module of exactly class `old` into class `new`, in place; returns how many."""
    changed = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            changed += 1
    return changed


def fuse_lora(model):
    """Give every PEFT lora.Linear layer of `model` (exactly that class) the fused forward, in place; returns how many
    layers changed. Idempotent; PEFT's own methods (save, merge, unload, adapters) keep working."""
    return _swap(model, _lora_linear_class(), fused_class())


def unfuse_lora(model):
    """Undo fuse_lora (PEFT's own forward everywhere); returns how many layers changed."""
    return _swap(model, fused_class(), _lora_linear_class())


def fused_layers(model):
    """How many of model's layers would take the fused path for activations of their base weight's dtype and device
    (what a training step at that dtype runs), for reports."""
    fused = fused_class()
    count = 0
    for module in model.modules():
        if type(module) is fused:
            w = module.get_base_layer().weight
            count += module._fused_args(torch.empty(1, w.shape[1], dtype=w.dtype, device=w.device), (), {}) is not None
    return count
