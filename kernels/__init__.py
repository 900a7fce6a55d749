"""Kimi Linear kernels, installed as `kimi_linear_kernels` (never as a top-level `kernels`, which is Hugging Face's
own package).

One dispatch point: `kda_backend(tensor)` says which implementation serves a tensor. CUDA tensors go to the Triton
path when a tested fla-core is installed (fla's `chunk_kda` for prefill and training, this package's fused
`kda_decode_fused` for one-token decode); everything else (CPU tensors above all, whatever is installed) stays on
the plain PyTorch path in `modeling_kimi_linear.py`, whose functions are the twins. `force_backend("torch")` pins
the plain path for tests. fla is called by keyword only: its positional order has changed between releases.
"""

import importlib.metadata
import logging

from packaging import version

logger = logging.getLogger(__name__)

# The fla-core releases these wrappers are tested with (on the lent H100); others fall back to PyTorch.
FLA_SUPPORTED = (version.Version("0.6.0"), version.Version("0.7.0"))

_forced = None
_fla = None  # (chunk_kda, fused_recurrent_kda) once imported, False if unavailable


def force_backend(name):
    """Pin the backend: "torch", "triton", or None for automatic choice by device."""
    global _forced
    if name not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {name!r}")
    _forced = name


def fla_status():
    """(usable, reason) for fla-core on this machine."""
    try:
        found = version.Version(importlib.metadata.version("fla-core"))
    except importlib.metadata.PackageNotFoundError:
        return False, "fla-core is not installed"
    if not FLA_SUPPORTED[0] <= found < FLA_SUPPORTED[1]:
        return False, f"fla-core {found} is outside the tested range [{FLA_SUPPORTED[0]}, {FLA_SUPPORTED[1]})"
    return True, f"fla-core {found}"


def _load_fla():
    global _fla
    if _fla is None:
        usable, reason = fla_status()
        if usable:
            try:
                from fla.ops.kda import chunk_kda, fused_recurrent_kda

                _fla = (chunk_kda, fused_recurrent_kda)
                logger.info("Kimi Linear KDA: using %s on CUDA tensors", reason)
            except ImportError as err:
                reason = f"fla-core failed to import ({err})"
                usable = False
        if not usable:
            _fla = False
            logger.info("Kimi Linear KDA: plain PyTorch (%s)", reason)
    return _fla


def kda_backend(x):
    """'triton' or 'torch' for the tensor x. CPU tensors never reach a Triton kernel."""
    if _forced is not None:
        if _forced == "triton" and not x.is_cuda:
            raise RuntimeError("force_backend('triton') needs CUDA tensors; Triton kernels do not run on CPU.")
        if _forced == "triton" and not _load_fla():
            raise RuntimeError(f"force_backend('triton'): {fla_status()[1]}")
        return _forced
    if x.is_cuda and _load_fla():
        return "triton"
    return "torch"


def kda_chunk(q, k, v, g, beta, initial_state=None, output_final_state=True, cu_seqlens=None):
    """fla's chunk_kda on L2-normalised q, k [B, T, H, K], v [B, T, H, V], log-decay g [B, T, H, K] (float32),
    beta [B, T, H]. Returns o [B, T, H, V] and the float32 final state [B, H, K, V]."""
    chunk_kda, _ = _load_fla()
    if initial_state is not None:
        initial_state = initial_state.float()
    return chunk_kda(
        q=q.to(v.dtype),
        k=k.to(v.dtype),
        v=v,
        g=g.float(),
        beta=beta.to(v.dtype),
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=False,
        cu_seqlens=cu_seqlens,
    )


def kda_decode_fused(*args, **kwargs):
    """One fused Triton launch per KDA layer decode step; see kernels/kda_decode.py."""
    from .kda_decode import kda_decode_fused as fused

    return fused(*args, **kwargs)
