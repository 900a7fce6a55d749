"""Kimi Linear configuration.

Reads the released `config.json` verbatim and writes the same keys back, so that vLLM, transformers'
built-in `kimi_linear` class and the released remote code can read what we save. Per-layer kinds are
derived once here (`layer_types`, `mlp_types`); modules look them up and never recompute them.
"""

import transformers
from packaging import version
from transformers import PretrainedConfig

# The transformers releases this code is tested on (CI runs the model tests on both ends).
SUPPORTED_TRANSFORMERS = (version.Version("5.0.0"), version.Version("5.25.0"))
_tf_version = version.Version(transformers.__version__)
if not SUPPORTED_TRANSFORMERS[0] <= version.Version(_tf_version.base_version) < SUPPORTED_TRANSFORMERS[1]:
    raise ImportError(
        f"Kimi Linear remote code supports transformers >= {SUPPORTED_TRANSFORMERS[0]}, "
        f"< {SUPPORTED_TRANSFORMERS[1]}; found {transformers.__version__}. "
        f"Install a supported release, e.g. `pip install 'transformers>=5.0,<5.25'`."
    )

ROUTER_ACTIVATIONS = ("sigmoid", "softmax")
# Layer kinds, in transformers' own vocabulary (its config validation knows these names).
KDA, MLA = "linear_attention", "full_attention"
# Attributes computed from the released keys; never written to config.json.
_DERIVED = ("layer_types", "mlp_types")


class KimiLinearConfig(PretrainedConfig):
    model_type = "kimi_linear"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=163840,
        hidden_size=2304,
        intermediate_size=9216,  # dense MLP width (layers < first_k_dense_replace)
        moe_intermediate_size=1024,  # width of each routed expert
        num_hidden_layers=27,
        num_attention_heads=32,  # MLA heads
        num_key_value_heads=32,  # kept for readers of the released config; MLA uses num_attention_heads
        head_dim=72,  # released key, unused by the math (hidden_size / num_attention_heads)
        hidden_act="silu",
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        use_cache=True,
        pad_token_id=163839,
        bos_token_id=163584,
        eos_token_id=163586,
        tie_word_embeddings=False,
        model_max_length=1048576,
        rope_theta=10000.0,  # released key; MLA here is NoPE, no rotary is applied
        rope_scaling=None,
        # MLA
        q_lora_rank=None,  # None: q_proj directly; else q_a_proj -> q_a_layernorm -> q_b_proj
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,  # the shared (unrotated, NoPE) key part cached next to c_kv
        v_head_dim=128,
        mla_use_nope=True,
        # MoE
        num_experts=256,
        num_experts_per_token=8,
        num_shared_experts=1,
        moe_renormalize=True,
        moe_router_activation_func="sigmoid",
        routed_scaling_factor=2.446,
        use_grouped_topk=True,
        num_expert_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        # The released remote code lets the correction bias leak into the expert weights;
        # True reproduces that, False (default) is the semantics of vLLM, SGLang and transformers.
        moe_router_bias_in_weights=False,
        num_nextn_predict_layers=0,
        # KDA: {kda_layers, full_attn_layers (1-based), num_heads, head_dim, short_conv_kernel_size}
        linear_attn_config=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.model_max_length = model_max_length
        self.rope_theta = rope_theta
        # Carried for other readers only; kept off transformers' RoPE machinery (nothing here rotates).
        self._released_rope_scaling = rope_scaling
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.mla_use_nope = mla_use_nope
        self.num_experts = num_experts
        self.num_experts_per_token = num_experts_per_token
        self.num_shared_experts = num_shared_experts
        self.moe_renormalize = moe_renormalize
        self.moe_router_activation_func = moe_router_activation_func
        self.routed_scaling_factor = routed_scaling_factor
        self.use_grouped_topk = use_grouped_topk
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_layer_freq = moe_layer_freq
        self.moe_router_bias_in_weights = moe_router_bias_in_weights
        self.num_nextn_predict_layers = num_nextn_predict_layers
        if linear_attn_config is None:
            linear_attn_config = {
                "kda_layers": [],
                "full_attn_layers": list(range(1, num_hidden_layers + 1)),
                "num_heads": num_attention_heads,
                "head_dim": 128,
                "short_conv_kernel_size": 4,
            }
        self.linear_attn_config = dict(linear_attn_config)
        for key in _DERIVED:
            kwargs.pop(key, None)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # transformers >= 5 keeps token ids and tying on the config only when the base class knows them.
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        self.layer_types, self.mlp_types = self._derive_layer_kinds()

    # --- derived, validated once -------------------------------------------------------------
    def _derive_layer_kinds(self):
        n = self.num_hidden_layers
        lac = self.linear_attn_config
        for key in ("kda_layers", "full_attn_layers", "num_heads", "head_dim", "short_conv_kernel_size"):
            if key not in lac:
                raise ValueError(f"linear_attn_config is missing '{key}'; the released config.json has it.")
        kda, full = list(lac["kda_layers"]), list(lac["full_attn_layers"])
        listed = kda + full
        if sorted(listed) != list(range(1, n + 1)):
            dupes = sorted({i for i in listed if listed.count(i) > 1})
            missing = sorted(set(range(1, n + 1)) - set(listed))
            extra = sorted(set(listed) - set(range(1, n + 1)))
            raise ValueError(
                "linear_attn_config.kda_layers and full_attn_layers (1-based) must together list every layer "
                f"1..{n} exactly once; listed twice: {dupes}, missing: {missing}, out of range: {extra}."
            )
        layer_types = [KDA if i + 1 in set(kda) else MLA for i in range(n)]

        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.head_dim not in (None, self.hidden_size // self.num_attention_heads):
            raise ValueError(
                f"head_dim ({self.head_dim}) must equal hidden_size / num_attention_heads "
                f"({self.hidden_size // self.num_attention_heads}); it is not used by the math, only checked."
            )
        for name in ("num_heads", "head_dim", "short_conv_kernel_size"):
            if int(lac[name]) < 1:
                raise ValueError(f"linear_attn_config.{name} must be a positive integer, got {lac[name]}.")
        if not self.mla_use_nope:
            raise ValueError(
                "mla_use_nope=False (rotary MLA) is not a Kimi Linear checkpoint and is not implemented; "
                "the released model uses NoPE MLA (mla_use_nope=true)."
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (the released model), got '{self.hidden_act}'.")

        mlp_types = []
        for i in range(n):
            moe = self.num_experts and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0
            mlp_types.append("moe" if moe else "dense")
        if "moe" in mlp_types:
            if self.moe_router_activation_func not in ROUTER_ACTIVATIONS:
                raise ValueError(
                    f"moe_router_activation_func '{self.moe_router_activation_func}' is unknown; "
                    f"use one of {ROUTER_ACTIVATIONS}."
                )
            if not 1 <= self.num_experts_per_token <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_token ({self.num_experts_per_token}) must be between 1 and "
                    f"num_experts ({self.num_experts})."
                )
            groups = self.num_expert_group if self.use_grouped_topk else 1
            if self.num_experts % groups:
                raise ValueError(f"num_experts ({self.num_experts}) must be divisible by num_expert_group ({groups}).")
            if self.use_grouped_topk and not 1 <= self.topk_group <= groups:
                raise ValueError(f"topk_group ({self.topk_group}) must be between 1 and num_expert_group ({groups}).")
            if self.use_grouped_topk and groups > 1 and self.num_experts // groups < 2:
                raise ValueError("grouped top-k ranks groups by their top-2 experts: each group needs >= 2 experts.")
            if (
                self.use_grouped_topk
                and groups > 1
                and self.topk_group * self.num_experts // groups < self.num_experts_per_token
            ):
                raise ValueError(
                    f"topk_group ({self.topk_group}) groups of {self.num_experts // groups} experts cannot hold "
                    f"num_experts_per_token ({self.num_experts_per_token}) experts."
                )
        return layer_types, mlp_types

    @property
    def kda_num_heads(self):
        return int(self.linear_attn_config["num_heads"])

    @property
    def kda_head_dim(self):
        return int(self.linear_attn_config["head_dim"])

    @property
    def kda_conv_size(self):
        return int(self.linear_attn_config["short_conv_kernel_size"])

    def to_dict(self):
        output = super().to_dict()
        for key in _DERIVED + ("rope_parameters",):
            output.pop(key, None)
        output["rope_scaling"] = output.pop("_released_rope_scaling", None)
        return output

    def to_diff_dict(self):
        # Write every released key back, defaults included, so other readers never fall back to their own defaults.
        diff = super().to_diff_dict()
        full = self.to_dict()
        for key in _RELEASED_KEYS:
            if key in full:
                diff[key] = full[key]
        return diff


# The keys of the released config.json, always written on save.
_RELEASED_KEYS = (
    "architectures",
    "bos_token_id",
    "dtype",
    "eos_token_id",
    "first_k_dense_replace",
    "head_dim",
    "hidden_act",
    "hidden_size",
    "initializer_range",
    "intermediate_size",
    "kv_lora_rank",
    "linear_attn_config",
    "mla_use_nope",
    "model_max_length",
    "model_type",
    "moe_intermediate_size",
    "moe_layer_freq",
    "moe_renormalize",
    "moe_router_activation_func",
    "num_attention_heads",
    "num_expert_group",
    "num_experts",
    "num_experts_per_token",
    "num_hidden_layers",
    "num_key_value_heads",
    "num_nextn_predict_layers",
    "num_shared_experts",
    "pad_token_id",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "rms_norm_eps",
    "rope_scaling",
    "rope_theta",
    "routed_scaling_factor",
    "tie_word_embeddings",
    "topk_group",
    "transformers_version",
    "use_cache",
    "use_grouped_topk",
    "v_head_dim",
    "vocab_size",
)

__all__ = ["KimiLinearConfig"]
