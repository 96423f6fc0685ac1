"""Model shapes: the numbers of a HF config that decide memory and tensor-parallel alignment,
and the linears of one decoder layer grouped by the input they read. The planner (plan.py,
plan_memory.py) and the tensor-parallel check (tp.py) both read layers through here; the
layers themselves -- names, widths, which are sparse -- come from structure discovery on
transformers' own modules (quantizer/arch), never from per-family rules here."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..arch import model_arch
from ..errors import InputError

if TYPE_CHECKING:
    from ..arch.model import ModelArch

# vLLM builds MLA's low-rank "a" projections replicated on every GPU (ReplicatedLinear).
REPLICATED_LEAVES = ("q_a_proj", "kv_a_proj_with_mqa")


@dataclass(frozen=True)
class ModelShapes:
    """The numbers of a HF config that decide memory and tensor-parallel alignment."""

    model_type: str
    hidden: int
    intermediate: int  # dense MLP width; 0 when every layer is MoE without a dense MLP
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    num_experts: int = 0
    moe_intermediate: int = 0  # one expert's MLP width
    experts_per_tok: int = 0
    shared_expert_intermediate: int = 0
    moe_layers: int = 0  # how many decoder layers are MoE (the rest are dense)
    # DeepSeek multi-head latent attention: (q_lora_rank, kv_lora_rank, qk_nope_head_dim,
    # qk_rope_head_dim, v_head_dim); empty for ordinary attention
    mla: tuple[int, ...] = ()
    tied_embeddings: bool = False  # the head is the embedding table (held once)
    # quantizer.arch.ModelArch of this config: every layer kind's linears
    arch: ModelArch | None = field(default=None, compare=False, repr=False)

    def need_arch(self) -> ModelArch:
        """`arch`, which shapes built from a config (from_config) always have."""
        if self.arch is None:
            raise ValueError("these ModelShapes have no ModelArch (build them with from_config)")
        return self.arch

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShapes":
        text = cfg
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            text = {**cfg["text_config"], "model_type": cfg.get("model_type", "")}

        aliases = _attribute_map(str(text.get("model_type") or cfg.get("model_type", "")))

        def need(key):
            v = text.get(key, text.get(aliases.get(key, key)))
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(f"config.json: {key!r} must be a positive integer, got {v!r}")
            return v

        hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), \
            need("num_hidden_layers")
        arch = model_arch(cfg)
        kv = text.get("num_key_value_heads") or text.get(
            aliases.get("num_key_value_heads", "num_key_value_heads")) or heads
        head_dim = text.get("head_dim") or hidden // heads
        mla: tuple[int, ...] = ()
        if text.get("kv_lora_rank"):
            mla = tuple(int(text.get(k) or 0) for k in (
                "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim"))
        moe = arch.moe
        shared = 0
        if moe is not None and moe.shared:
            kind = next(k for k in arch.kinds if k.moe is not None)
            down = f"{moe.disk_block}.{moe.shared}.{moe.shared_linears[-1]}"
            shared = kind.found.linear(down).in_features
        dense = any(k.moe is None for k in arch.kinds)
        return cls(model_type=str(cfg.get("model_type", "")), hidden=hidden,
                   intermediate=int(getattr(arch.text, arch.intermediate_key, 0) or 0)
                   if dense and arch.mlp_down else 0,
                   heads=heads, kv_heads=kv, head_dim=head_dim, layers=layers,
                   vocab=int(text.get("vocab_size") or 0),
                   num_experts=moe.num_experts if moe else 0,
                   moe_intermediate=moe.width if moe else 0,
                   experts_per_tok=int(getattr(arch.text, "num_experts_per_tok", 0) or 0)
                   if moe else 0,
                   shared_expert_intermediate=shared,
                   moe_layers=sum(1 for i in range(arch.num_layers) if arch.is_moe_layer(None, i)),
                   mla=mla, arch=arch,
                   tied_embeddings=bool(getattr(arch.text, "tie_word_embeddings", False)
                                        or cfg.get("tie_word_embeddings", False)))


@dataclass(frozen=True)
class Linear:
    name: str  # module name inside a decoder layer (experts: a label such as experts.down)
    in_features: int
    out_features: int
    parallel: str  # how tensor parallelism splits it: "column" (outputs), "row" (inputs) or
    # "replicated" (DeepSeek's low-rank MLA "a" projections: whole on every GPU)
    # the config key of the MLP width this linear's split side is (--pad-for-tp pads it);
    # None: padding cannot change it
    width_key: str | None = None


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the same input: one Hessian / one activation statistic each copy.
    copies > 1 for MoE experts: independent instances, each with its own state."""

    name: str
    linears: tuple[Linear, ...]
    copies: int = 1

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features

    def weight_elements(self, copies: int | None = None) -> int:
        n = self.copies if copies is None else copies
        return n * sum(lin.in_features * lin.out_features for lin in self.linears)


def resolve_arch(shapes: ModelShapes, arch=None):
    """The ModelArch naming the layer's modules: the one discovered for these shapes."""
    return shapes.arch if shapes.arch is not None else arch


def _kind(arch, moe):
    """The layer kind `moe` means: a LayerKind itself, or True / False for the first MoE /
    dense kind."""
    if not isinstance(moe, bool):
        return moe
    kind = next((k for k in arch.kinds if bool(k) == moe), None)
    if kind is None:
        raise InputError(f"{arch.name}: no {'MoE' if moe else 'dense'} layers")
    return kind


def _width_keys(arch) -> dict[str, int]:
    cfg = arch.text.to_dict()
    return {k: v for k, v in cfg.items() if k.endswith("intermediate_size")
            and isinstance(v, int) and not isinstance(v, bool) and v > 0}


def _key_for(arch, width: int, prefer: tuple[str, ...]) -> str | None:
    keys = _width_keys(arch)
    matches = [k for k in keys if keys[k] == width]
    for p in prefer:
        if p in matches:
            return p
    return matches[0] if matches else None


def layer_groups(shapes: ModelShapes, moe=False, arch=None) -> tuple[InputGroup, ...]:
    """The input groups of one decoder layer kind (`moe`: a LayerKind, or True / False for
    the first MoE / dense kind), in execution order, with their real widths."""
    arch = resolve_arch(shapes, arch)
    kind = _kind(arch, moe)
    spec = arch.for_layer(None, kind.index)
    found = kind.found
    sparse = kind.moe
    block = f"{sparse.disk_block}." if sparse else None
    groups = []
    for names in spec.input_groups:
        if block and names[0].startswith(block):
            continue  # experts and the shared expert: below, as vLLM's fused MoE sees them
        linears = []
        for n in names:
            lin = found.linear(n)
            leaf = n.rsplit(".", 1)[-1]
            parallel = ("row" if lin.row else "replicated" if leaf in REPLICATED_LEAVES
                        else "column")
            mlp = n in arch.mlp_gate_up or n == arch.mlp_down
            linears.append(Linear(n, lin.in_features, lin.out_features, parallel,
                                  arch.intermediate_key if mlp else None))
        groups.append(InputGroup(names[0] if len(names) == 1 else "+".join(
            n.rsplit(".", 1)[-1] for n in names), tuple(linears)))
    if sparse is None:
        return tuple(groups)
    h, e, mi = shapes.hidden, sparse.num_experts, sparse.width
    key = _key_for(arch, mi, ("moe_intermediate_size", "intermediate_size"))
    groups.append(InputGroup("experts.gate+up", (Linear("experts.gate", h, mi, "column", key),
                                                  Linear("experts.up", h, mi, "column", key)),
                             e))
    groups.append(InputGroup("experts.down", (Linear("experts.down", mi, h, "row", key),), e))
    if sparse.shared:
        down = found.linear(f"{sparse.disk_block}.{sparse.shared}.{sparse.shared_linears[-1]}")
        si = down.in_features
        skey = _key_for(arch, si, ("shared_expert_intermediate_size",))
        groups.append(InputGroup("shared_expert.gate+up", (
            Linear("shared_expert.gate", h, si, "column", skey),
            Linear("shared_expert.up", h, si, "column", skey))))
        groups.append(InputGroup("shared_expert.down", (Linear("shared_expert.down", si, h,
                                                                "row", skey),)))
    return tuple(groups)


def layer_kinds(shapes: ModelShapes) -> tuple:
    """The model's layer kinds (quantizer.arch.LayerKind, true for MoE kinds): dense and MoE,
    or more (linear and full attention layers of a hybrid model)."""
    return tuple(shapes.need_arch().kinds)


@functools.lru_cache(maxsize=None)
def _attribute_map(model_type: str) -> dict[str, str]:
    """The config class's standard-name -> its own key map (GPT-2's num_attention_heads is
    n_head in config.json): config.json numbers are read under either name."""
    from transformers import CONFIG_MAPPING
    try:
        return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {})
    except KeyError:
        return {}
