"""Model shapes: the numbers of a HF config that decide memory and tensor-parallel alignment,
and the linears of one decoder layer grouped by the input they read. The planner (plan.py,
plan_memory.py) and the tensor-parallel check (tp.py) both read layers through here."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError


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

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShapes":
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg["text_config"], "model_type": cfg.get("model_type", "")}

        def need(key):
            v = cfg.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(f"config.json: {key!r} must be a positive integer, got {v!r}")
            return v

        hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), \
            need("num_hidden_layers")
        kv = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        common = dict(model_type=str(cfg.get("model_type", "")), hidden=hidden, heads=heads,
                      kv_heads=kv, head_dim=head_dim, layers=layers,
                      vocab=int(cfg.get("vocab_size") or 0),
                      tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))
        if cfg.get("num_local_experts"):  # Mixtral: intermediate_size IS the expert width
            return cls(**common, intermediate=0, num_experts=cfg["num_local_experts"],
                       moe_intermediate=need("intermediate_size"),
                       experts_per_tok=cfg.get("num_experts_per_tok") or 2, moe_layers=layers)
        if cfg.get("n_routed_experts") and cfg.get("kv_lora_rank"):  # DeepSeek-V3 style
            dense = min(int(cfg.get("first_k_dense_replace") or 0), layers)
            mi = need("moe_intermediate_size")
            return cls(**common, intermediate=int(cfg.get("intermediate_size") or 0),
                       num_experts=cfg["n_routed_experts"], moe_intermediate=mi,
                       experts_per_tok=cfg.get("num_experts_per_tok") or 1,
                       shared_expert_intermediate=mi * int(cfg.get("n_shared_experts") or 0),
                       moe_layers=layers - dense,
                       mla=(need("q_lora_rank"), need("kv_lora_rank"), need("qk_nope_head_dim"),
                            need("qk_rope_head_dim"), need("v_head_dim")))
        if cfg.get("n_routed_experts") and cfg.get("moe_intermediate_size"):
            # DeepSeek-style experts under ordinary attention (GLM-4.5/4.6 "glm4_moe")
            dense = min(int(cfg.get("first_k_dense_replace") or 0), layers)
            mi = need("moe_intermediate_size")
            return cls(**common, intermediate=int(cfg.get("intermediate_size") or 0),
                       num_experts=cfg["n_routed_experts"], moe_intermediate=mi,
                       experts_per_tok=cfg.get("num_experts_per_tok") or 1,
                       shared_expert_intermediate=mi * int(cfg.get("n_shared_experts") or 0),
                       moe_layers=layers - dense)
        if cfg.get("num_experts") and cfg.get("moe_intermediate_size"):  # Qwen2-MoE / Qwen3-MoE
            step = cfg.get("decoder_sparse_step") or 1
            dense_only = set(cfg.get("mlp_only_layers") or ())
            moe_layers = sum(1 for i in range(layers)
                             if i not in dense_only and (i + 1) % step == 0)
            return cls(**common, intermediate=int(cfg.get("intermediate_size") or 0),
                       num_experts=cfg["num_experts"],
                       moe_intermediate=cfg["moe_intermediate_size"],
                       experts_per_tok=cfg.get("num_experts_per_tok") or 1,
                       shared_expert_intermediate=int(
                           cfg.get("shared_expert_intermediate_size") or 0),
                       moe_layers=moe_layers)
        return cls(**common, intermediate=need("intermediate_size"))


@dataclass(frozen=True)
class Linear:
    name: str  # module name inside a decoder layer (experts: a label such as experts.down)
    in_features: int
    out_features: int
    parallel: str  # how tensor parallelism splits it: "column" (outputs), "row" (inputs) or
    # "replicated" (DeepSeek's low-rank MLA "a" projections: whole on every GPU)


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


def resolve_arch(shapes: ModelShapes, arch):
    """The arch spec naming the layer's modules: given, registered, or — for MoE families that
    have no arch file yet — the one whose layer they share: DeepSeek-V3's for MLA models
    (Kimi-K2 is a DeepseekV3ForCausalLM under model_type kimi_k2), else the Llama attention
    (GLM-4.5/4.6's q/k/v/o with GQA). The planner needs shapes only; quantizing such a family
    still needs its arch file."""
    if arch is not None:
        return arch
    from .arch import get_arch
    try:
        return get_arch(shapes.model_type)
    except InputError:
        if not shapes.is_moe:
            raise
        if shapes.mla:
            from .arch.deepseek import SPEC as MLA_SPEC
            return MLA_SPEC
        from .arch.llama import SPEC
        return SPEC


def _dense_linear(name: str, s: ModelShapes, arch) -> Linear:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    if name == arch.mlp_down:
        return Linear(name, s.intermediate, s.hidden, "row")
    if name in arch.mlp_gate_up:
        return Linear(name, s.hidden, s.intermediate, "column")
    # Attention projections by their role; the names themselves come from the arch file.
    roles = {"q_proj": (s.hidden, q, "column"), "k_proj": (s.hidden, kv, "column"),
             "v_proj": (s.hidden, kv, "column"), "o_proj": (q, s.hidden, "row")}
    if s.mla:  # the low-rank "a" projections are replicated under TP, the "b" ones split
        qr, kvr, nope, rope, v = s.mla
        roles.update({"q_a_proj": (s.hidden, qr, "replicated"),
                      "kv_a_proj_with_mqa": (s.hidden, kvr + rope, "replicated"),
                      "q_b_proj": (qr, s.heads * (nope + rope), "column"),
                      "kv_b_proj": (kvr, s.heads * (nope + v), "column"),
                      "o_proj": (s.heads * v, s.hidden, "row")})
    leaf = name.rsplit(".", 1)[-1]
    if leaf not in roles:
        raise InputError(f"planner: no shape rule for module {name!r} of {arch.name}")
    return Linear(name, *roles[leaf])


def layer_groups(shapes: ModelShapes, moe: bool, arch=None) -> tuple[InputGroup, ...]:
    """The input groups of one decoder layer (dense, or MoE when `moe`), in execution order."""
    arch = resolve_arch(shapes, arch)
    mlp_names = set(arch.mlp_gate_up) | {arch.mlp_down}
    groups = []
    for names in arch.input_groups:
        if moe and set(names) & mlp_names:
            continue
        groups.append(InputGroup(names[0] if len(names) == 1 else "+".join(
            n.rsplit(".", 1)[-1] for n in names), tuple(_dense_linear(n, shapes, arch)
                                                     for n in names)))
    if not moe:
        return tuple(groups)
    h, e, mi = shapes.hidden, shapes.num_experts, shapes.moe_intermediate
    groups.append(InputGroup("experts.gate+up", (Linear("experts.gate", h, mi, "column"),
                                                  Linear("experts.up", h, mi, "column")), e))
    groups.append(InputGroup("experts.down", (Linear("experts.down", mi, h, "row"),), e))
    si = shapes.shared_expert_intermediate
    if si:
        groups.append(InputGroup("shared_expert.gate+up", (
            Linear("shared_expert.gate", h, si, "column"),
            Linear("shared_expert.up", h, si, "column"))))
        groups.append(InputGroup("shared_expert.down", (Linear("shared_expert.down", si, h,
                                                                "row"),)))
    return tuple(groups)


def layer_kinds(shapes: ModelShapes) -> tuple[bool, ...]:
    """Which layer kinds the model has: (False,) dense only, (True,) MoE only, or both."""
    kinds = []
    if shapes.layers - shapes.moe_layers > 0:
        kinds.append(False)
    if shapes.moe_layers > 0:
        kinds.append(True)
    return tuple(kinds)
