"""A MoE decoder layer's quantization plan, from the MoESpec discovery found: which linears
exist (every routed expert's gate/up/down, the shared expert's), in which input groups they
run, and the AWQ scaling groups. Names are on-disk tensor names, one source of truth with the
unfused expert modules in experts.py (which are built from the same rules)."""
from __future__ import annotations

from dataclasses import replace

from .base import ArchSpec, MoESpec, ScaleGroup

# Attention linears AWQ never clips (as for dense layers: the q/k dot product amplifies it).
_NO_CLIP_LEAVES = ("q_proj", "k_proj")


def num_experts(moe: MoESpec, config=None) -> int:
    return int(moe.num_experts)


def shared_names(moe: MoESpec) -> tuple[str, ...] | None:
    if not moe.shared:
        return None
    return tuple(f"{moe.disk_block}.{moe.shared}.{n}" for n in moe.shared_linears)


def moe_layer_spec(spec: ArchSpec, norm: str | None, rtn_experts: tuple[int, ...] = ()
                   ) -> ArchSpec:
    """`spec` (the layer's groups outside its sparse block) with the MoE block's groups added.
    `norm` produces the block's input (it takes the experts' AWQ fold). Experts in
    `rtn_experts` (too few calibration tokens) are left out of the groups -- the caller rounds
    them -- but still take the norm's AWQ fold, so their inputs stay what they were."""
    moe = spec.moe
    if moe is None:
        raise ValueError("moe_layer_spec needs a spec with an MoE block")
    attn_groups = spec.input_groups
    attn_scales = spec.scale_groups
    skip = set(rtn_experts)
    routed = [e for e in range(moe.num_experts) if e not in skip]

    groups: list[tuple[str, ...]] = []
    shared = shared_names(moe)
    if shared:
        groups += [shared[:-1], shared[-1:]]
    # Every expert's gate/up, then every down: expert e's down reads only expert e's gate/up
    # outputs, so this order is still true-sequential, and same-kind groups sit next to each
    # other for ArchSpec.capture_batches to share forwards.
    groups += [(moe.expert(e, 0), moe.expert(e, 1)) for e in routed]
    groups += [(moe.expert(e, 2),) for e in routed]

    in_norm_group = list(shared[:-1] if shared else ()) + [
        moe.expert(e, k) for e in routed for k in (0, 1)]
    folded_only = [f"{moe.disk_block}.{moe.router}"] if moe.router else []
    if moe.shared_gate:
        folded_only.append(f"{moe.disk_block}.{moe.shared_gate}")
    folded_only += [moe.expert(e, k) for e in sorted(skip) for k in (0, 1)]
    # With nothing left to search (every expert on the fallback, no shared expert) the norm
    # keeps its weight and nothing needs the fold.
    scales = [ScaleGroup(norm, tuple(in_norm_group), judge=moe.disk_block,
                         also_scale=tuple(folded_only), stat=moe.disk_block)
              ] if in_norm_group and norm else []
    if shared:
        scales.append(ScaleGroup(shared[-2], (shared[-1],), judge=shared[-1]))
    scales += [ScaleGroup(moe.expert(e, 1), (moe.expert(e, 2),), judge=moe.expert(e, 2))
               for e in routed]

    # Routed experts see only their own tokens: the clip search samples a layer-wide token
    # subset, which they do not have, so they keep their full range.
    clip_skip = tuple(n for g in attn_groups for n in g if n.rsplit(".", 1)[-1]
                      in _NO_CLIP_LEAVES) + tuple(n for g in groups for n in g
                                                  if f".{moe.experts}." in n)
    return replace(spec, input_groups=attn_groups + tuple(groups),
                   scale_groups=attn_scales + tuple(scales), clip_skip=clip_skip)
