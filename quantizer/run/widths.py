"""The export's widths, decided before any weight is read: the group size (auto: the largest of
128/64/32 that the fixed widths take), the MLP intermediate zero-padded to whole packed words,
the group size and, under --pad-for-tp N, TP N's alignment; and the refusals when an export
would not load at --tp-size / --pad-for-tp N or a packed layout cannot hold a width."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import InputError
from ..export.tp import check_tp, problem_summary, tp_multiple
from ..stream.source import CheckpointSource

AUTO_GROUP_SIZES = (128, 64, 32)


@dataclass
class Widths:
    intermediate: int  # the MLP intermediate width of the checkpoint
    padded: int | None  # the width it is zero-padded to (None: not padded)
    group_size: int
    notes: list[str] = field(default_factory=list)


def pack_multiple(bits: float, adaptive: bool) -> int:
    """Widths every packed layout can hold whole: AWQ packs 8 outputs per word; b-bit codes
    fill whole int32 words in runs of 32/gcd(b, 32) values; mixed widths need 32."""
    if adaptive:
        return 32
    return math.lcm(8, 32 // math.gcd(int(bits), 32))


def plan_widths(source: CheckpointSource, settings) -> Widths:
    """Group size, padding and their notes for validated `settings`; refuses what the
    packed layouts or the TP targets cannot take."""
    arch = source.arch
    intermediate = int(getattr(arch.text, arch.intermediate_key, 0) or 0)
    multiple = pack_multiple(settings.bits, settings.is_adaptive)
    padded, group_size, msg = padded_width_and_group(source, settings, intermediate, multiple)
    notes = _padding_notes(arch.intermediate_key, intermediate, padded, group_size,
                           settings.pad_for_tp)
    notes.append(msg)
    notes += check_tp_targets(source.raw_config, arch, settings, padded, group_size)
    for name, out_f in linear_out_features(source, padded).items():
        if out_f % multiple:
            raise InputError(f"{name}: out_features={out_f} is not a multiple of "
                             f"{multiple}; the packed export cannot hold it")
    return Widths(intermediate, padded, group_size, notes)


def _padding_notes(key: str, intermediate: int, padded: int | None, group_size: int,
                   tp: int | None) -> list[str]:
    label = group_size_label(group_size)
    if padded and tp:
        return [f"{key} {intermediate} -> {padded} for TP {tp} ({label}): zero-padded so each "
                f"of {tp} GPUs gets {padded // tp} channels, a multiple of "
                f"{tp_multiple(tp, group_size) // tp}, and the packed layout holds whole words "
                f"(exact: padded channels contribute 0)"]
    if padded:
        return [f"{key} {intermediate} -> {padded}: zero-padded to whole packed words and "
                f"{label} groups (exact: padded channels contribute 0)"]
    if tp:
        return [f"{key} {intermediate} already splits over TP {tp} ({label}): no padding "
                f"needed"]
    return []


def padded_width_and_group(source: CheckpointSource, settings, intermediate: int,
                           multiple: int) -> tuple[int | None, int, str]:
    """(padded MLP width or None, group size, group-size note).

    Every quantized input width but the MLP intermediate (which down_proj reads) is fixed; the
    intermediate can be zero-padded exactly. Explicit group sizes are checked on the fixed
    widths. Auto takes the largest of 128/64/32 dividing the fixed widths that also fits the
    intermediate as it is (after whole-word padding), else the largest dividing the fixed
    widths with the intermediate padded to it. The width is then padded to a multiple of the
    packing `multiple`, the group size and, under --pad-for-tp N, TP N's requirement."""
    fixed = {name: w for name, w in linear_in_features(source, None).items()
             if name != source.arch.mlp_down}
    tp = settings.pad_for_tp
    if settings.group_size == "auto":
        group_size, msg = _auto_group_size(fixed, intermediate, multiple, tp)
    else:
        group_size, msg = resolve_group_size(settings.group_size, fixed)
    unit = math.lcm(multiple, max(group_size, 1))
    if tp:
        unit = math.lcm(unit, tp_multiple(tp, group_size))
    width = -(-intermediate // unit) * unit
    arch = source.arch
    if arch.moe is not None and all(arch.is_moe_layer(source.raw_config, i)
                                    for i in arch.representative_layers(source.raw_config)):
        width = intermediate  # no dense MLP to pad (Mixtral's intermediate_size is experts')
    if width != intermediate and not arch.mlp_down:
        # no separate gate/up and down to pad (Phi-3's fused gate_up_proj): refuse, not guess
        raise InputError(f"{arch.name}: its MLP width {intermediate} would need padding to "
                         f"{width} for {group_size_label(group_size)}, but its MLP has no "
                         f"separate gate/up and down projections to pad; choose a "
                         f"--group-size that divides it")
    if width != intermediate and arch.moe is not None:
        # Expert widths are never padded (they are in `fixed`); a dense MLP width of a MoE
        # model could be, but no run has needed it yet: refuse rather than guess.
        raise InputError(f"{source.arch.intermediate_key}={intermediate} would need padding "
                         f"to {width} for {group_size_label(group_size)}; MoE models are not "
                         f"padded: choose a --group-size that divides it")
    return (width if width != intermediate else None), group_size, msg


def _auto_group_size(fixed: dict[str, int], intermediate: int, multiple: int,
                     tp: int | None) -> tuple[int, str]:
    base = -(-intermediate // multiple) * multiple
    options = [g for g in AUTO_GROUP_SIZES if all(w % g == 0 for w in fixed.values())]
    fitting = [g for g in options
               if base % g == 0 and (not tp or base % tp_multiple(tp, g) == 0)]
    group_size = (fitting or options or [-1])[0]
    return group_size, (f"group size auto -> {group_size_label(group_size)}"
                        + ("" if fitting or not options
                           else " (the MLP width is padded to fit it)"))


def resolve_group_size(requested: int | str, widths: dict[str, int]) -> tuple[int, str]:
    """Pick the group size for all quantized linears. `widths` maps module names to in_features.

    auto: the largest of 128/64/32 that divides every width, else per channel (-1). The
    pipeline passes the widths that cannot be padded (the MLP intermediate can: it is then
    zero-padded to a multiple of the chosen size)."""
    if requested == "auto":
        for g in AUTO_GROUP_SIZES:
            if all(w % g == 0 for w in widths.values()):
                return g, f"group size auto -> {g} (divides every fixed quantized input width)"
        bad = sorted({w for w in widths.values() if w % 32})
        return -1, (f"group size auto -> per-channel (-1): input widths {bad} are not "
                    f"multiples of 32")
    g = int(requested)
    if g != -1:
        for name, w in widths.items():
            if w % g:
                raise InputError(f"group size {g} does not divide in_features={w} of {name}; "
                                 f"use --group-size auto or a divisor of {w}")
    return g, f"group size {g}"


def group_size_label(group_size: int) -> str:
    return "per-channel" if group_size == -1 else f"g{group_size}"


def check_tp_targets(cfg: dict, arch, settings, padded: int | None,
                     group_size: int) -> list[str]:
    """Refuse before any work when the export would not load at --tp-size (or --pad-for-tp)
    N; notes saying which TP sizes were checked otherwise."""
    targets = sorted({n for n in (settings.tp_size, settings.pad_for_tp) if n})
    exported = dict(cfg)
    if padded:  # a VLM keeps the width in text_config
        exported.update(arch.config_update(cfg, arch.intermediate_key, padded))
    notes = []
    for n in targets:
        problems = check_tp(exported, arch, n, group_size)
        if problems:
            raise InputError(problem_summary(problems, n, group_size,
                                             padded=settings.pad_for_tp == n))
        notes.append(f"TP-{n}: ok (every quantized module's per-GPU shape aligned at "
                     f"{group_size_label(group_size)})")
    return notes


def layer_linears(source: CheckpointSource) -> Iterator[tuple[str, str]]:
    """(tensor name, linear name) of one layer of each kind: dense, and MoE (every expert)."""
    arch = source.arch
    for i in arch.representative_layers(source.raw_config):
        for name in arch.for_layer(source.raw_config, i).linears:
            yield f"{arch.layer_prefix(i)}.{name}.weight", name


def linear_in_features(source: CheckpointSource, padded: int | None) -> dict[str, int]:
    widths = {}
    for key, name in layer_linears(source):
        widths[name] = padded if (padded and name == source.arch.mlp_down) else \
            source.shape(key)[1]
    return widths


def linear_out_features(source: CheckpointSource, padded: int | None) -> dict[str, int]:
    return {name: (padded if padded and name in source.arch.mlp_gate_up else
                   source.shape(key)[0])
            for key, name in layer_linears(source)}


def linear_shapes(source: CheckpointSource, padded: int | None) -> dict[str, tuple[int, int]]:
    """{linear name: (out_features, in_features)} of every layer kind's linears, with the MLP
    width `padded` (None: as in the checkpoint)."""
    outs, ins = linear_out_features(source, padded), linear_in_features(source, padded)
    return {name: (outs[name], ins[name]) for name in outs}
