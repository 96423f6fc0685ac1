"""compressed-tensors "pack-quantized" export: the layout llm-compressor writes and vLLM's
CompressedTensorsWNA16 loads, with one config_group per distinct (bits, group size, symmetry,
act-order) so every module can carry its own width (the mixed-bit export).

Per linear: {prefix}.weight_packed int32 (out, in*bits/32), .weight_scale fp16 (out, in/G),
.weight_shape int64 [out, in], .weight_zero_point int32 (out*bits/32, in/G) when asymmetric,
.weight_g_idx int32 (in,) with act-order. Packing order: kernels/packing.py.

What vLLM accepts (CompressedTensorsWNA16): symmetric 2..8 bits on recent releases (4 and 8
only before), asymmetric 4 and 8 bits; vLLM fuses q/k/v and gate/up into one linear each and
requires all shards of a fused linear to share one scheme (see measure.py's candidates)."""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from quantizer.errors import InputError
from quantizer.kernels.packing import (SUPPORTED_BITS, QuantizedWeight, ct_pack_linear,
                                       ct_unpack_linear)


FORMAT = "compressed-tensors"


def check_supported(bits, symmetric: bool = False, act_order: bool = False) -> None:
    if bits not in SUPPORTED_BITS:
        raise InputError(f"compressed-tensors export: bits must be one of {SUPPORTED_BITS}, "
                         f"got {bits}")


def ct_tensors(prefix: str, q: QuantizedWeight, scale_dtype: torch.dtype = torch.float16
               ) -> dict[str, torch.Tensor]:
    check_supported(q.bits)
    ragged_in = bool(q.in_features * q.bits % 32)
    ragged_out = not q.symmetric and bool(q.out_features * q.bits % 32)
    tensors = ct_pack_linear(_padded(q, ragged_in, ragged_out))
    if ragged_in or ragged_out:  # compressed-tensors packs densely: ceil(n*bits/32) words
        in_words = -(-q.in_features * q.bits // 32)
        tensors["weight_packed"] = tensors["weight_packed"][:q.out_features, :in_words]
        if ragged_out:
            out_words = -(-q.out_features * q.bits // 32)
            tensors["weight_zero_point"] = tensors["weight_zero_point"][:out_words]
        tensors["weight_scale"] = tensors["weight_scale"][:q.out_features]
        if "weight_g_idx" in tensors:
            tensors["weight_g_idx"] = tensors["weight_g_idx"][:q.in_features]
        tensors["weight_shape"] = torch.tensor([q.out_features, q.in_features],
                                               dtype=torch.int64)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
    tensors["weight_scale"] = tensors["weight_scale"].contiguous().to(scale_dtype)
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def _padded(q: QuantizedWeight, ragged_in: bool, ragged_out: bool) -> QuantizedWeight:
    """`q` with zero codes appended up to a multiple of 32 inputs / outputs, so the packing
    module's whole-word packer applies; ct_tensors cuts the words back to ceil(n*bits/32),
    the dense layout compressed-tensors writes for widths like 176 at 3 bits."""
    if not (ragged_in or ragged_out):
        return q
    pad_in = -q.in_features % 32 if ragged_in else 0
    pad_out = -q.out_features % 32 if ragged_out else 0
    codes = torch.nn.functional.pad(q.codes, (0, pad_in, 0, pad_out))
    scales = torch.nn.functional.pad(q.scales, (0, 0, 0, pad_out), value=1.0)
    zeros = torch.nn.functional.pad(q.zeros, (0, 0, 0, pad_out))
    g_idx = q.g_idx
    if g_idx is not None:  # appended inputs join group 0; ct_tensors cuts them off again
        g_idx = torch.nn.functional.pad(g_idx, (0, pad_in))
    return QuantizedWeight(codes, scales, zeros, q.bits, q.group_size, g_idx, q.symmetric)


def weights_args(bits: int, group_size: int, symmetric: bool, act_order: bool = False,
                 static_groups: bool = False) -> dict:
    """compressed-tensors QuantizationArgs for an int weight-only scheme.

    actorder "group": columns were quantized in activation order and groups follow that
    order (weight_g_idx is written); "weight": act-order with static groups (groups stay
    contiguous, no g_idx) -- exactly our static_groups."""
    actorder = None
    if act_order and group_size != -1:
        actorder = "weight" if static_groups else "group"
    return {
        "num_bits": int(bits),
        "type": "int",
        "symmetric": bool(symmetric),
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else int(group_size),
        "block_structure": None,
        "dynamic": False,
        "actorder": actorder,
        "observer": "minmax",
        "observer_kwargs": {},
    }


_INDEXED = re.compile(r"^(?P<head>.+?)\.(?P<idx>\d+)\.(?P<tail>.+)$")
# A routed expert's linear: '<block>.experts.<e>.<leaf>' (the names vLLM's fused-MoE layer
# gathers, whatever the leaf is called on disk).
_EXPERT = re.compile(r"^(?P<block>.+\.experts)\.\d+\.[^.]+$")


def expert_blocks(module_bits: dict[str, tuple]) -> dict[str, tuple]:
    """{'<...>.experts': setting} for every fused-MoE block whose experts all share one
    setting: such a block gets one target matching every expert linear name in it, so the
    names vLLM looks a fused-MoE scheme up under ('experts.0.gate_proj' even where the
    checkpoint says 'w1') resolve to the experts' scheme."""
    found: dict[str, set] = defaultdict(set)
    for name, setting in module_bits.items():
        m = _EXPERT.match(name)
        if m:
            found[m["block"]].add(tuple(setting))
    return {block: settings.pop() for block, settings in found.items() if len(settings) == 1}


def block_targets(blocks: list[str]) -> list[str]:
    """Anchored regexes matching every linear of every expert in `blocks` (one per run of
    layers: 're:^model\\.layers\\.(?:1|3)\\.mlp\\.experts\\.\\d+\\.[^.]+$')."""
    runs: dict[tuple[str, str], list[str]] = defaultdict(list)
    for block in blocks:
        m = _INDEXED.match(block)
        head, idx, tail = (m["head"], m["idx"], m["tail"]) if m else (block, "", "")
        runs[(head, tail)].append(idx)
    out = []
    for (head, tail), idxs in sorted(runs.items()):
        if idxs == [""]:
            out.append(f"re:^{re.escape(head)}\\.\\d+\\.[^.]+$")
            continue
        alt = "|".join(sorted(set(idxs), key=int))
        out.append(f"re:^{re.escape(head)}\\.(?:{alt})\\.{re.escape(tail)}\\.\\d+\\.[^.]+$")
    return out


def compact_targets(names: list[str]) -> list[str]:
    """Targets matching exactly `names`: names of the form '<head>.<i>.<tail>' sharing head and
    tail collapse into one anchored regex ('re:^model\\.layers\\.(?:0|3)\\.mlp\\.down_proj$');
    vLLM and compressed-tensors apply 're:' targets with re.match, hence the explicit '$'."""
    runs: dict[tuple[str, str], list[str]] = defaultdict(list)
    plain = []
    for name in names:
        m = _INDEXED.match(name)
        if m:
            runs[(m["head"], m["tail"])].append(m["idx"])
        else:
            plain.append(name)
    out = []
    for (head, tail), idxs in runs.items():
        idxs = sorted(set(idxs), key=int)
        if len(idxs) == 1:
            out.append(f"{head}.{idxs[0]}.{tail}")
        else:
            out.append(f"re:^{re.escape(head)}\\.(?:{'|'.join(idxs)})\\.{re.escape(tail)}$")
    return out + sorted(set(plain))


def ct_quantization_config(module_bits: dict[str, tuple], ignore: list[str] | None = None,
                           static_groups: bool = False) -> dict:
    """config.json "quantization_config" for modules quantized with possibly different
    settings. `module_bits` maps full module names to (bits, group_size, symmetric,
    act_order); one config_group per distinct setting, its targets naming exactly its
    modules."""
    if not module_bits:
        raise InputError("compressed-tensors config: no quantized modules")
    by_setting: dict[tuple, list[str]] = defaultdict(list)
    blocks = expert_blocks(module_bits)
    by_block: dict[tuple, list[str]] = defaultdict(list)
    for block, setting in blocks.items():
        bits, group_size, symmetric, act_order = setting
        by_block[(int(bits), int(group_size), bool(symmetric), bool(act_order))].append(block)
    for name, setting in module_bits.items():
        bits, group_size, symmetric, act_order = setting
        check_supported(bits)
        key = (int(bits), int(group_size), bool(symmetric), bool(act_order))
        m = _EXPERT.match(name)
        if m and m["block"] in blocks:
            by_setting.setdefault(key, [])
            continue
        by_setting[key].append(name)
    groups = {}
    # Targets of different groups never overlap, so readers that take the first match and
    # readers that take any match agree; sorting only makes the file deterministic.
    for i, (setting, names) in enumerate(sorted(by_setting.items(), key=lambda kv: kv[0])):
        bits, group_size, symmetric, act_order = setting
        groups[f"group_{i}"] = {
            "targets": compact_targets(sorted(names)) + block_targets(by_block.get(setting, [])),
            "weights": weights_args(bits, group_size, symmetric, act_order, static_groups),
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": list(ignore) if ignore is not None else ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


# ---- the exporter-module interface quantizer.export.get_exporter hands to the writer ----
def linear_tensors(prefix: str, q: QuantizedWeight) -> dict:
    return ct_tensors(prefix, q)


def linear_from_tensors(prefix: str, tensors: dict, group_size: int | None = None
                        ) -> QuantizedWeight:
    """Inverse of linear_tensors; bits, group size and symmetry follow from the tensors."""
    packed, scale = tensors[f"{prefix}.weight_packed"], tensors[f"{prefix}.weight_scale"]
    shape = tensors[f"{prefix}.weight_shape"]
    in_features = int(shape[1])
    bits = next((b for b in SUPPORTED_BITS if -(-in_features * b // 32) == packed.shape[1]),
                None)
    if bits is None:
        raise InputError(f"{prefix}: weight_packed {tuple(packed.shape)} fits no bit width for "
                         f"{in_features} input features")
    if group_size is None:
        group_size = -1 if scale.shape[1] == 1 else in_features // scale.shape[1]
    return ct_unpack_linear(packed, scale, shape, bits, group_size,
                            weight_zero_point=tensors.get(f"{prefix}.weight_zero_point"),
                            weight_g_idx=tensors.get(f"{prefix}.weight_g_idx"))


def quantization_config(bits: int, group_size: int, not_converted: list[str], **details) -> dict:
    """`details["module_bits"]` ({full name: (bits, group_size, symmetric, act_order)}) gives
    the per-module settings; without it every name in details["modules"] gets the uniform
    (bits, group_size)."""
    module_bits = details.get("module_bits")
    sym, ao = bool(details.get("symmetric", False)), bool(details.get("act_order", False))
    static = bool(details.get("static_groups", False))
    if module_bits is None:
        module_bits = {m: (bits, group_size, sym, ao) for m in details.get("modules", [])}
    # Every linear that no target names must be ignored, or vLLM finds no scheme for it;
    # with a "Linear" target the float routers must be too (details["float_linears"]), or
    # loaders treat them as quantized.
    ignore = ["lm_head"] + [n for n in (not_converted or []) if n != "lm_head"]
    ignore += [n for n in details.get("float_linears") or [] if n not in ignore]
    if not module_bits:  # uniform and no module list: llm-compressor's "every Linear"
        cfg = ct_quantization_config({"_": (bits, group_size, sym, ao)}, ignore, static)
        cfg["config_groups"]["group_0"]["targets"] = ["Linear"]
        return cfg
    return ct_quantization_config(module_bits, ignore=ignore, static_groups=static)

