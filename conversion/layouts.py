"""The two tensor layouts of a Kimi Linear checkpoint, as one declarative table, and the config.json of each.

released  the layout of moonshotai/Kimi-Linear-48B-A3B and of this repo's model (see ../shared/reference/
          official_layout.md): per-expert `block_sparse_moe.experts.E.w1/w2/w3`, three short-conv weights.
builtin   the layout transformers' built-in `kimi_linear` classes (>= 5.17) hold in memory, and write with
          `save_pretrained(..., save_original_format=False)` (and when saving offloaded or PEFT-wrapped models):
          the forget gate in a submodule, one concatenated conv weight, stacked experts under `mlp.`.

Each rule of RULES is (operation, released pattern(s), builtin pattern, axis); both directions are read from the
same rule:

    rename   one released tensor  <->  one builtin tensor
    concat   k released tensors, concatenated along `axis`  <->  one builtin tensor, split in k equal parts
    stack    for each of k per-expert patterns, the experts stacked on a new dim 0; the k stacks concatenated along
             `axis`  <->  one builtin tensor, split in k along `axis`, then unstacked on dim 0

Patterns hold fields: {L} a layer number, {E} an expert number, and named alternatives (FIELDS). ALIASES are
names another tool writes for a released tensor; they are read as that released tensor.
"""

import re
from dataclasses import dataclass

import torch

from .io import CheckpointError

# --- the table -------------------------------------------------------------------------------------------------------

FIELDS = {
    "L": None,  # a layer number
    "E": None,  # an expert number
    "top": ("model.embed_tokens", "model.norm", "lm_head"),
    "norm": ("input_layernorm", "post_attention_layernorm"),
    "attn": (  # KDA and MLA weights that keep their name
        "q_proj k_proj v_proj b_proj g_a_proj g_b_proj o_norm o_proj "
        "q_a_proj q_a_layernorm q_b_proj kv_a_proj_with_mqa kv_a_layernorm kv_b_proj"
    ).split(),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "gate": ("f_a_proj.weight", "f_b_proj.weight", "dt_bias", "A_log"),  # the KDA forget gate
    "router": ("weight", "e_score_correction_bias"),
}

LAYER = "model.layers.{L}."
ATTN = LAYER + "self_attn."
MOE = LAYER + "block_sparse_moe."
EXPERT = MOE + "experts.{E}."


@dataclass(frozen=True)
class Rule:
    op: str  # "rename" | "concat" | "stack"
    released: tuple  # released name pattern(s); several for concat / stack, in concatenation order
    builtin: str  # builtin name pattern
    axis: int = 0  # concat: the axis of the concatenation; stack: the axis, in the stacked tensor, of the concat


RULES = (
    # unchanged
    Rule("rename", ("{top}.weight",), "{top}.weight"),
    Rule("rename", (LAYER + "{norm}.weight",), LAYER + "{norm}.weight"),
    Rule("rename", (ATTN + "{attn}.weight",), ATTN + "{attn}.weight"),
    Rule("rename", (LAYER + "mlp.{mlp}.weight",), LAYER + "mlp.{mlp}.weight"),  # dense MLP (layer 0)
    # KDA: the forget gate's tensors move into a submodule; the q, k, v short convs become one conv
    Rule("rename", (ATTN + "{gate}",), ATTN + "forget_gate.{gate}"),
    Rule(
        "concat", (ATTN + "q_conv1d.weight", ATTN + "k_conv1d.weight", ATTN + "v_conv1d.weight"), ATTN + "conv1d.weight"
    ),
    # MoE: block_sparse_moe. -> mlp.; experts stacked on dim 0; per expert, w1 (gate) rows then w3 (up) rows
    Rule("rename", (MOE + "gate.{router}",), LAYER + "mlp.gate.{router}"),
    Rule("rename", (MOE + "shared_experts.{mlp}.weight",), LAYER + "mlp.shared_experts.{mlp}.weight"),
    Rule("stack", (EXPERT + "w1.weight", EXPERT + "w3.weight"), LAYER + "mlp.experts.gate_up_proj", axis=1),
    Rule("stack", (EXPERT + "w2.weight",), LAYER + "mlp.experts.down_proj"),
)

ALIASES = (
    # transformers' save_pretrained (save_original_format=True, its default) undoes `block_sparse_moe. -> mlp.` on
    # every layer, so the dense MLP of layer 0 comes out as block_sparse_moe.{gate,up,down}_proj.
    (MOE + "{mlp}.weight", LAYER + "mlp.{mlp}.weight"),
)

# --- patterns --------------------------------------------------------------------------------------------------------

_FIELD = re.compile(r"\{(\w+)\}")


def _regex(pattern):
    parts, last = [], 0
    for m in _FIELD.finditer(pattern):
        alternatives = FIELDS[m.group(1)]
        body = r"\d+" if alternatives is None else "|".join(re.escape(a) for a in alternatives)
        parts += [re.escape(pattern[last : m.start()]), f"(?P<{m.group(1)}>{body})"]
        last = m.end()
    return re.compile("".join(parts) + re.escape(pattern[last:]))


def fill(pattern, fields):
    return _FIELD.sub(lambda m: str(fields[m.group(1)]), pattern)


_COMPILED = {p: _regex(p) for rule in RULES for p in (*rule.released, rule.builtin)}
_COMPILED.update({a: _regex(a) for a, _ in ALIASES})


def _fields(pattern, name):
    m = _COMPILED[pattern].fullmatch(name)
    return None if m is None else m.groupdict()


# --- matching a name -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    rule: int  # index into RULES
    side: str  # "released" | "builtin"
    part: int  # which released pattern (0 for the builtin side)
    fields: tuple  # sorted (field, value) pairs, the expert number included
    name: str  # the name, aliases resolved

    @property
    def group(self):
        """Tensors of one group are converted together (e.g. all experts of one layer's gate_up_proj)."""
        return self.rule, tuple((k, v) for k, v in self.fields if k != "E")


def canonical(name):
    """The released name for a name written by another tool (ALIASES); other names unchanged."""
    for alias, released in ALIASES:
        fields = _fields(alias, name)
        if fields is not None:
            return fill(released, fields)
    return name


def match(name):
    """The rule, side and part a tensor name belongs to; raises CheckpointError for a name no rule knows."""
    name = canonical(name)
    found = []
    for i, rule in enumerate(RULES):
        for part, pattern in enumerate(rule.released):
            fields = _fields(pattern, name)
            if fields is not None:
                found.append(Match(i, "released", part, tuple(sorted(fields.items())), name))
        fields = _fields(rule.builtin, name)
        if fields is not None and not (rule.op == "rename" and rule.released[0] == rule.builtin):
            found.append(Match(i, "builtin", 0, tuple(sorted(fields.items())), name))
    if not found:
        raise CheckpointError(
            f"tensor {name} is not part of a Kimi Linear checkpoint in the released or the transformers built-in "
            "layout (no rule of conversion/layouts.py matches it)."
        )
    assert len(found) == 1, f"conversion/layouts.py: {name} matches several rules: {found}"
    return found[0]


# --- one step: a group of tensors converted together -----------------------------------------------------------------


@dataclass
class Step:
    rule: Rule
    to: str  # "builtin" | "released"
    inputs: list  # names read, in operation order
    outputs: list  # names written, in operation order
    in_shapes: list
    out_shapes: list
    passthrough: bool = False  # the group is already in the target layout

    def run(self, get):
        """Output tensors (in self.outputs order); get(name) reads an input. To builtin, the output is preallocated
        and filled one input at a time (peak: the output plus one input); to released, the outputs are clones of
        slices of the one input, so that no two outputs share storage."""
        if self.passthrough or self.rule.op == "rename":
            return [get(name) for name in self.inputs]
        k = len(self.rule.released)
        if self.to == "builtin":
            out = None
            n = len(self.inputs) // k  # 1 for concat, the number of experts for stack
            for i, name in enumerate(self.inputs):
                t = get(name)
                if out is None:
                    out = torch.empty(self.out_shapes[0], dtype=t.dtype)
                block = out.chunk(k, self.rule.axis)[i // n]
                (block if self.rule.op == "concat" else block[i % n]).copy_(t)
            return [out]
        (name,) = self.inputs
        t = get(name)
        if self.rule.op == "concat":
            return [part.clone() for part in t.chunk(k, self.rule.axis)]
        return [block[e].clone() for block in t.chunk(k, self.rule.axis) for e in range(t.shape[0])]


def _shape_str(shape):
    return "[" + ", ".join(str(d) for d in shape) + "]"


def plan(shapes, dtypes, to, num_experts):
    """The steps that convert a checkpoint with tensors `shapes` / `dtypes` (name -> shape / dtype string) to layout
    `to`. Checks, before anything is read: every name matches a rule, no group is missing a member, no group is in
    both layouts at once, shapes agree within a group, and stacked tensors hold `num_experts` experts."""
    if to not in ("builtin", "released"):
        raise ValueError(f"to must be 'builtin' or 'released', got {to!r}.")
    groups = {}
    for name in shapes:
        m = match(name)
        groups.setdefault(m.group, []).append((m, name))
    steps = []
    for (rule_index, fields), members in groups.items():
        rule, fields = RULES[rule_index], dict(fields)
        sides = {m.side for m, _ in members}
        if len(sides) > 1:
            names = sorted(name for _, name in members)
            raise CheckpointError(
                f"the checkpoint holds {fill(rule.builtin, fields)} in both layouts at once ({', '.join(names)}); "
                "keep one."
            )
        side = sides.pop()
        original = {m.name: name for m, name in members}  # aliases resolved -> the name in the file
        if side == to:
            for m, name in members:
                shape = shapes[name]
                steps.append(Step(rule, to, [name], [m.name], [shape], [shape], passthrough=True))
            continue
        released = _released_names(rule, fields, num_experts)
        builtin = fill(rule.builtin, fields)
        if side == "released":
            missing = [n for n in released if n not in original]
            if missing:
                raise CheckpointError(f"tensor {missing[0]} is missing (needed to build {builtin}).")
            extra = sorted(set(original) - set(released))
            if extra:
                raise CheckpointError(
                    f"tensor {extra[0]} is not expected: the config says num_experts={num_experts} "
                    f"(experts 0..{num_experts - 1})."
                )
            inputs = [original[n] for n in released]
            in_shapes = [shapes[n] for n in inputs]
            out_shape = _joined_shape(rule, builtin, inputs, shapes, dtypes)
            steps.append(Step(rule, to, inputs, [builtin], in_shapes, [out_shape]))
        else:
            (name,) = [name for _, name in members]
            out_shapes = _split_shapes(rule, name, shapes[name], num_experts)
            steps.append(Step(rule, to, [name], released, [shapes[name]], out_shapes))
    outputs = {}
    for step in steps:
        for out in step.outputs:
            if out in outputs:
                raise CheckpointError(f"tensor {out} would be written twice (from {outputs[out]} and {step.inputs}).")
            outputs[out] = step.inputs
    return steps


def _released_names(rule, fields, num_experts):
    if rule.op != "stack":
        return [fill(p, fields) for p in rule.released]
    return [fill(p, {**fields, "E": e}) for p in rule.released for e in range(num_experts)]


def _joined_shape(rule, builtin, inputs, shapes, dtypes):
    """The shape of the builtin tensor built from `inputs`, after checking that they agree with each other."""
    first = inputs[0]
    for name in inputs[1:]:
        if shapes[name] != shapes[first] or dtypes[name] != dtypes[first]:
            raise CheckpointError(
                f"tensor {name} has shape {_shape_str(shapes[name])} {dtypes[name]}, but {first} has "
                f"{_shape_str(shapes[first])} {dtypes[first]}; they must agree to be "
                f"{'stacked' if rule.op == 'stack' else 'concatenated'} into {builtin}."
            )
    shape = list(shapes[first])
    k = len(rule.released)
    if rule.op == "stack":
        shape = [len(inputs) // k, *shape]
    if not 0 <= rule.axis < len(shape):
        raise CheckpointError(f"tensor {first} has shape {_shape_str(shapes[first])}: no axis {rule.axis} to join.")
    shape[rule.axis] *= k
    return tuple(shape)


def _split_shapes(rule, name, shape, num_experts):
    """The shapes of the released tensors cut from builtin tensor `name`, after checking that it can be cut."""
    k, shape = len(rule.released), list(shape)
    if rule.op == "rename":
        return [tuple(shape)]
    if rule.op == "stack" and (len(shape) < 2 or shape[0] != num_experts):
        raise CheckpointError(
            f"tensor {name} has shape {_shape_str(shape)}: its dim 0 should hold num_experts={num_experts} experts."
        )
    if len(shape) <= rule.axis or shape[rule.axis] % k:
        raise CheckpointError(
            f"tensor {name} has shape {_shape_str(shape)}: dim {rule.axis} cannot be split in {k} equal parts."
        )
    shape[rule.axis] //= k
    if rule.op == "concat":
        return [tuple(shape)] * k
    return [tuple(shape[1:])] * (k * num_experts)


def released_view(steps):
    """{released name: shape} of what the steps read (to builtin) or write (to released): the released layout of the
    checkpoint, to compare with what a model with the config expects."""
    view = {}
    for step in steps:
        if step.to == "released":
            view.update(zip(step.outputs, step.out_shapes))
        elif not step.passthrough:
            view.update((canonical(n), s) for n, s in zip(step.inputs, step.in_shapes))
        else:
            view.update(_to_released_shapes(step))
    return view


def _to_released_shapes(step):
    """A builtin tensor passed through unchanged: the released tensors it stands for."""
    (name,), (shape,) = step.outputs, step.out_shapes
    fields, rule = dict(match(name).fields), step.rule
    num_experts = shape[0] if rule.op == "stack" else 0
    return dict(zip(_released_names(rule, fields, num_experts), _split_shapes(rule, name, shape, num_experts)))


# --- config.json -----------------------------------------------------------------------------------------------------

# The built-in config class accepts these names for released keys (its attribute_map).
CONFIG_ALIASES = {
    "num_local_experts": "num_experts",
    "num_experts_per_tok": "num_experts_per_token",
    "n_shared_experts": "num_shared_experts",
    "n_group": "num_expert_group",
    "norm_topk_prob": "moe_renormalize",
    "max_position_embeddings": "model_max_length",
}
# Keys only the built-in config has (written by its save_pretrained); derived from released keys on the way there.
BUILTIN_ONLY_KEYS = (
    "layer_types",
    "mlp_layer_types",
    "linear_head_dim",
    "linear_num_heads",
    "linear_conv_kernel_dim",
    "qk_head_dim",
    "attention_bias",
    "attention_dropout",
    "output_router_logits",
    "pretraining_tp",
    "rope_parameters",
)
_LINEAR_KEYS = (("head_dim", "linear_head_dim", 128), ("num_heads", "linear_num_heads", 32))
_LINEAR_KEYS += (("short_conv_kernel_size", "linear_conv_kernel_dim", 4),)


def released_config(config):
    """config.json for the released layout (this repo's KimiLinearConfig, with auto_map), from a config in either
    format. Raises CheckpointError for a config that is not a Kimi Linear model this repo can run."""
    from kimi_linear.configuration_kimi_linear import _RELEASED_KEYS, KimiLinearConfig
    from kimi_linear.modeling_kimi_linear import AUTO_MAP

    d = dict(config)
    for alias, key in CONFIG_ALIASES.items():
        if alias in d:
            value = d.pop(alias)
            if key in d and d[key] != value:
                raise CheckpointError(f"config.json: {alias}={value} and {key}={d[key]} disagree.")
            d[key] = value
    if d.get("attention_bias"):
        raise CheckpointError("config.json: attention_bias=true; Kimi Linear has no attention biases.")
    n = d.get("num_hidden_layers", 27)
    lac = dict(d.get("linear_attn_config") or {})
    layer_types = d.get("layer_types")
    if layer_types is None and not {"kda_layers", "full_attn_layers"} <= set(lac):  # the built-in default
        layer_types = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)]
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {"linear_attention", "full_attention"})
        if unknown or len(layer_types) != n:
            raise CheckpointError(f"config.json: layer_types must be {n} of linear_attention / full_attention.")
        lac["kda_layers"] = [i + 1 for i, t in enumerate(layer_types) if t == "linear_attention"]
        lac["full_attn_layers"] = [i + 1 for i, t in enumerate(layer_types) if t == "full_attention"]
    for key, builtin_key, default in _LINEAR_KEYS:  # the built-in class gives linear_attn_config precedence too
        lac.setdefault(key, d.get(builtin_key, default))
    d["linear_attn_config"] = {k: lac[k] for k in sorted(lac)}
    if d.get("mlp_layer_types") is not None:
        d["first_k_dense_replace"], d["moe_layer_freq"] = _moe_pattern(d, n)
    rope = d.get("rope_parameters") or {}
    if "rope_theta" in rope:
        d.setdefault("rope_theta", rope["rope_theta"])
    for key in BUILTIN_ONLY_KEYS:
        d.pop(key, None)
    d.setdefault("rope_scaling", None)
    d.setdefault("architectures", ["KimiLinearForCausalLM"])
    d["model_type"] = "kimi_linear"
    d["head_dim"] = d.get("hidden_size", 2304) // d.get("num_attention_heads", 32)
    d["auto_map"] = dict(AUTO_MAP)
    defaults = KimiLinearConfig.__init__.__defaults__
    names = KimiLinearConfig.__init__.__code__.co_varnames[1 : 1 + len(defaults)]
    for key, value in zip(names, defaults):
        if key in _RELEASED_KEYS:
            d.setdefault(key, value)
    try:
        KimiLinearConfig(**d)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"config.json cannot be read as a Kimi Linear config: {err}") from None
    return dict(sorted(d.items()))


def _moe_pattern(d, n):
    """(first_k_dense_replace, moe_layer_freq) that give the built-in's mlp_layer_types under this repo's rule
    (layer i is MoE when i >= first_k_dense_replace and i % moe_layer_freq == 0)."""
    sparse = [t == "sparse" for t in d["mlp_layer_types"]]
    if len(sparse) != n or not set(d["mlp_layer_types"]) <= {"dense", "sparse"}:
        raise CheckpointError(f"config.json: mlp_layer_types must be {n} of dense / sparse.")
    candidates = [(d.get("first_k_dense_replace", 1), d.get("moe_layer_freq", 1))]
    candidates += [(k, f) for f in range(1, n + 1) for k in range(n + 1)]
    for k, f in candidates:
        if sparse == [i >= k and i % f == 0 for i in range(n)]:
            return k, f
    raise CheckpointError(
        f"config.json: mlp_layer_types {d['mlp_layer_types']} is not 'dense below first_k_dense_replace, then MoE "
        "every moe_layer_freq layers', the only pattern the released config can express."
    )


def builtin_config(config):
    """config.json for transformers' built-in class, from a config in either format: the released keys (which it
    reads too, and which make the way back lossless) plus its own, and no auto_map (its layout is not ours)."""
    from kimi_linear.configuration_kimi_linear import KimiLinearConfig

    d = released_config(config)
    if d["moe_router_activation_func"] != "sigmoid":
        raise CheckpointError("config.json: transformers' built-in class supports only the sigmoid router.")
    if d.get("moe_router_bias_in_weights"):
        raise CheckpointError("config.json: moe_router_bias_in_weights=true has no equivalent in the built-in class.")
    if not d["use_grouped_topk"] and d["num_expert_group"] > 1:
        raise CheckpointError("config.json: use_grouped_topk=false with num_expert_group > 1: the built-in groups.")
    cfg = KimiLinearConfig(**d)
    d.pop("auto_map")
    if d.get("rope_scaling") is None:  # transformers warns that rope_scaling is deprecated; null means nothing
        d.pop("rope_scaling", None)
    lac = d["linear_attn_config"]
    d["layer_types"] = list(cfg.layer_types)
    d["mlp_layer_types"] = ["sparse" if t == "moe" else "dense" for t in cfg.mlp_types]
    for key, builtin_key, _ in _LINEAR_KEYS:
        d[builtin_key] = lac[key]
    return dict(sorted(d.items()))
