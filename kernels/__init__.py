"""Kimi Linear kernels, installed as `kimi_linear_kernels` (never as a top-level `kernels`, which is Hugging Face's
own package).

One dispatch point: `kda_backend(tensor)` says which implementation serves a tensor. CUDA tensors go to the Triton
path when a tested fla-core is installed: `kda_prefill` (the q/k L2 norm, then fla's `chunk_kda` with the gate and
beta fused in; prefill and training, dense or variable-length) and this package's `kda_decode_fused` /
`kda_decode_layer` (a decode step in one launch, nothing tuned). fla's autotuned kernels start from pre-chosen
configurations (kernels/tuned.py) and the variants the model uses compile side by side on first use
(kernels/precompile.py). This package's own Triton kernels need no fla (`triton_serves(tensor)`): the fused norms
(kernels/norm.py: RMSNorm with the residual add, the gated output norm, the q/k L2 norm; forward and backward) and
the decode step's MoE (kernels/moe_decode.py: router, chosen and shared experts as matrix-vector products), KDA's
short convolution (kernels/conv.py, forward and backward), MLA's decode attention (kernels/mla_decode.py), MLA's
prefill attention where cuDNN has no plan yet for a prompt's shape (kernels/mla_prefill.py), a prefill's
projections at inference without cuBLAS's per-row-count choice (kernels/gemm.py), and a LoRA-adapted
linear layer's training step (kernels/lora.py; kimi_linear_finetune puts it under PEFT's layers).
Everything else (CPU tensors above all, whatever is installed) stays on the plain PyTorch path in
`modeling_kimi_linear.py`, whose functions are the twins. `force_backend("torch")` pins the plain path for tests. fla
is called by keyword only: its positional order has changed between releases.
"""

import functools
import importlib.metadata
import importlib.util
import logging
import sys
import types
from pathlib import Path

import torch
from packaging import version

logger = logging.getLogger(__name__)


def on_input_device(fn):
    """Run fn with the CUDA device of its first tensor argument current. Triton launches a kernel on the current
    device, whatever device its tensors are on, and DLPack exports from the current device only: a model whose layers
    are split over GPUs (device_map) calls with tensors on a device other than the current one."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is None or not x.is_cuda or x.device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(x.device):
            return fn(*args, **kwargs)

    return run


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
                _fla = _import_kda_ops()
                logger.info("Kimi Linear KDA: using %s on CUDA tensors", reason)
                _pin_tuned()
            except ImportError as err:
                reason = f"fla-core failed to import ({err})"
                usable = False
        if not usable:
            _fla = False
            logger.info("Kimi Linear KDA: plain PyTorch (%s)", reason)
    return _fla


# fla's packages whose __init__.py imports every model, layer and op fla has (most of the 12 s that importing
# fla.ops.kda took in a fresh process on the lent H100 hosts): deferred, only the KDA modules import.
_DEFERRED_FLA_PACKAGES = ("fla", "fla.ops", "fla.modules")


class _DeferredPackage(types.ModuleType):
    """A package imported without running its __init__.py: its submodules import as usual, and the __init__.py runs
    at the first attribute the package lacks (PEP 562), so `import fla; fla.X` elsewhere still sees the whole
    package."""

    def __getattr__(self, name):
        source = self.__dict__.pop("_deferred_init", None)
        if source is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        exec(compile(source, self.__file__, "exec"), self.__dict__)
        return getattr(self, name)


def _import_kda_ops():
    """(chunk_kda, fused_recurrent_kda) from fla-core, with fla, fla.ops and fla.modules deferred (_DeferredPackage)
    unless something imported them already."""
    for name in _DEFERRED_FLA_PACKAGES:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None or not spec.origin:
            break  # the plain import below then fails or runs as usual
        package = _DeferredPackage(name)
        package.__spec__, package.__loader__, package.__file__ = spec, spec.loader, spec.origin
        package.__path__, package.__package__ = list(spec.submodule_search_locations), name
        package._deferred_init = Path(spec.origin).read_text()
        if name == "fla":  # fla's modules import it from the package itself
            package.__version__ = importlib.metadata.version("fla-core")
        sys.modules[name] = package
        if "." in name:
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, package)
    from fla.ops.kda import chunk_kda, fused_recurrent_kda

    return chunk_kda, fused_recurrent_kda


def _pin_tuned():
    """Pre-chosen configurations for fla's autotuned kernels (kernels/tuned.py): a fresh process skips the
    autotuning sweep. A failure here only costs that sweep, never correctness."""
    try:
        from .tuned import pin

        pin()
    except Exception as err:  # noqa: BLE001
        logger.warning("Kimi Linear: could not pin fla kernel configurations (%s); fla autotunes as usual", err)


_precompiled = set()


def _precompile(device, dtype, training):
    """On the first call of a kind (device, dtype, training or not): compile the recorded fla kernel variants it will
    need side by side (kernels/precompile.py) rather than one by one as the call reaches them. A failure here only
    costs that parallelism, never correctness."""
    if (device, dtype, training) in _precompiled:
        return
    _precompiled.add((device, dtype, training))
    try:
        from .precompile import warm

        with torch.cuda.device(device):  # Triton keeps its compiled kernels per device
            warm(dtype, training)
    except Exception as err:  # noqa: BLE001
        logger.warning("Kimi Linear: could not precompile fla kernels (%s); they compile on first use", err)


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


_triton = None  # whether triton imports, once asked


def triton_serves(x):
    """Whether this package's own Triton kernels that need no fla (the fused norms, the decode step's MoE, the MLA
    decode attention, the short conv) take tensor x: a CUDA tensor of 32 bits or fewer (they compute in float32; a
    float64 model keeps the plain path) on a GPU of compute capability 8.0 or newer (bfloat16 in Triton) with Triton
    importable, unless force_backend("torch") pinned the plain path."""
    global _triton
    if _forced == "torch" or not x.is_cuda or x.dtype == torch.float64:
        return False
    if _triton is None:
        try:
            import triton  # noqa: F401

            _triton = True
        except ImportError:
            _triton = False
    return _triton and _capability(x.device) >= (8, 0)


@functools.cache
def _capability(device):
    """The CUDA device's compute capability (major, minor), asked once per device."""
    return torch.cuda.get_device_capability(device)


@on_input_device
def rms_norm(x, weight, eps, residual=None, gate=None):
    """Fused RMSNorm, gated RMSNorm, or residual add + RMSNorm, forward and backward; see kernels/norm.py."""
    from .norm import rms_norm as fused

    return fused(x, weight, eps, residual=residual, gate=gate)


def rms_norm_serves(x, weight, *others):
    from .norm import serves

    return serves(x, weight, *others)


@on_input_device
def route(*args, **kwargs):
    """The MoE router of a few tokens in one launch; see kernels/moe_decode.py."""
    from .moe_decode import route as fused

    return fused(*args, **kwargs)


@on_input_device
def moe_experts(*args, **kwargs):
    """Routed or shared experts of a few tokens as matrix-vector products; see kernels/moe_decode.py."""
    from .moe_decode import experts

    return experts(*args, **kwargs)


@on_input_device
def l2norm(x, eps=1e-6):
    """x / sqrt(sum(x^2) + eps) over the last dimension, in float32, rounded back to x's dtype (fla's l2norm): one
    fused launch each way (kernels/norm.py), or these few PyTorch passes where Triton does not serve. Not fla's own
    L2-norm kernel: it is autotuned per bucket of 2048 tokens (its NB key), so every prompt of a new length bucket
    paid an autotuning sweep (about 11 s on an H100)."""
    if triton_serves(x):
        from .norm import l2_norm

        return l2_norm(x, eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


@on_input_device
def kda_prefill(
    q, k, v, g, beta, A_log, dt_bias, initial_state=None, output_final_state=True, cu_seqlens=None, cu_seqlens_cpu=None
):
    """One KDA layer's prefill or training step from the raw projections: the q/k L2 norm (l2norm), then fla's
    chunk_kda with the forget gate -exp(A_log) * softplus(g + dt_bias) and beta's sigmoid inside its kernels (no
    float32 copies of g around the kernel). q, k [B, T, H, K] after the conv, v [B, T, H, V], g = f_b(f_a(x))
    [B, T, H, K], beta = b_proj(x) [B, T, H], A_log with H elements, dt_bias [H*K]; cu_seqlens [S+1] with B == 1
    for S variable-length sequences (initial_state [S, H, K, V]; cu_seqlens_cpu: the same on the host, where the
    caller has it, saving a copy and its sync). Twin: kda_prefill_torch in modeling_kimi_linear.py."""
    chunk_kda, _ = _load_fla()
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta, A_log, dt_bias))
    _precompile(q.device, q.dtype, training)
    if initial_state is not None:
        initial_state = initial_state.float()
    return chunk_kda(
        q=l2norm(q),
        k=l2norm(k),
        v=v,
        g=g,
        beta=beta,
        A_log=A_log.reshape(-1).float(),
        dt_bias=dt_bias.float(),
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=False,
        use_gate_in_kernel=True,
        use_beta_sigmoid_in_kernel=True,
        cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_cpu if cu_seqlens_cpu is not None or cu_seqlens is None else cu_seqlens.cpu(),
    )


@on_input_device
def kda_decode_fused(*args, **kwargs):
    """One fused Triton launch per KDA layer decode step; see kernels/kda_decode.py."""
    from .kda_decode import kda_decode_fused as fused

    return fused(*args, **kwargs)


@on_input_device
def kda_decode_layer(*args, **kwargs):
    """A KDA layer's decode step from the projections to o_proj's input (the gate's f_b, the fused step, the gated
    output norm) in one Triton launch; see kernels/kda_decode.py."""
    from .kda_decode import kda_decode_layer as fused

    return fused(*args, **kwargs)


@on_input_device
def projections(*args, **kwargs):
    """Up to six projections of one input in one Triton launch (matrix-vector products for a decode step); see
    kernels/kda_decode.py."""
    from .kda_decode import projections as fused

    return fused(*args, **kwargs)


def mla_prefill_serves(q, v_dim):
    """Whether the Triton prefill attention (kernels/mla_prefill.py) takes q [B, H, T, D] with values of v_dim: a
    tensor triton_serves on a Hopper GPU or newer (the cards where SDPA runs cuDNN's kernel, which it stands in for
    while cuDNN has no plan for a shape), with head dims it is written for."""
    from .mla_prefill import split_dims

    return (
        triton_serves(q)
        and q.dtype != torch.float32
        and _capability(q.device) >= (9, 0)
        and split_dims(q.shape[-1]) is not None
        and v_dim >= 16
        and v_dim & (v_dim - 1) == 0
    )


@on_input_device
def mla_prefill_attention(*args, **kwargs):
    """MLA's causal prefill attention without a per-length plan; see kernels/mla_prefill.py."""
    from .mla_prefill import mla_prefill

    return mla_prefill(*args, **kwargs)


@on_input_device
def mla_decode_attention(*args, **kwargs):
    """MLA decode attention on the latents in one pass over the cache; see kernels/mla_decode.py."""
    from .mla_decode import mla_decode as fused

    return fused(*args, **kwargs)


@on_input_device
def short_conv(*args, **kwargs):
    """KDA's short convolution with SiLU on [B, T, D], forward and backward in Triton; see kernels/conv.py."""
    from .conv import short_conv as fused

    return fused(*args, **kwargs)


@on_input_device
def short_conv_varlen(*args, **kwargs):
    """short_conv over packed sequences ([N, D], cu_seqlens), no tap crossing a boundary; see kernels/conv.py."""
    from .conv import short_conv_varlen as fused

    return fused(*args, **kwargs)


def grouped_lora_serves(y, x, adapters, expert=None, ends=None):
    """Whether grouped_lora_add_ takes these tensors (Triton serving x, then kernels/lora.py's grouped_serves)."""
    if not triton_serves(x):
        return False
    from .lora import grouped_serves

    return grouped_serves(y, x, adapters, expert, ends)


@on_input_device
def grouped_lora_add_(*args, **kwargs):
    """y += s (x A[e]^T) B[e]^T in place, each row with its routed expert's float32 adapters (LoRA on every routed
    expert), forward and backward without a host sync; see kernels/lora.py."""
    from .lora import grouped_lora_add_ as fused

    return fused(*args, **kwargs)


@on_input_device
def products(x, *weights, cublas_rows=None):
    """[x @ w.T for w in weights] for up to three nn.Linear weights of one half-precision input in one Triton launch
    that chooses nothing per number of rows (the projections of an inference prefill); cublas_rows: beyond that many
    rows, cuBLAS in blocks of exactly that many. See kernels/gemm.py."""
    from .gemm import products as fused

    return fused(x, *weights, cublas_rows=cublas_rows)


def lora_serves(x, weight, bias, lora_a, lora_b):
    """Whether lora_linear takes these tensors (Triton serving x, then kernels/lora.py's serves)."""
    if not triton_serves(x):
        return False
    from .lora import serves

    return serves(x, weight, bias, lora_a, lora_b)


@on_input_device
def lora_linear(*args, **kwargs):
    """x W^T (+ bias) + s (x A^T) B^T, the float32 adapters' products fused (forward and backward); see
    kernels/lora.py."""
    from .lora import lora_linear as fused

    return fused(*args, **kwargs)
