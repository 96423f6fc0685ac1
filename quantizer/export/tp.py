"""Will a quantized checkpoint load under tensor parallelism of size N? Checked before any work.

What a TP-N deployment does to each linear (vLLM's column/row parallel layers): a
column-parallel layer (q/k/v, gate/up) keeps its full input and gives each GPU out/N output
rows; a row-parallel layer (o_proj, down_proj) keeps its full output and gives each GPU in/N
input columns. The Marlin kernels that serve 4-bit GPTQ/AWQ checkpoints then require, per GPU:
  input features  % 128 (GPTQ_MARLIN_MIN_THREAD_K) and % group size,
  output features % 64  (GPTQ_MARLIN_MIN_THREAD_N);
fused-MoE Marlin requires expert intermediate per GPU % max(64, group size) and hidden % 128.
Attention heads must split evenly; KV heads must split evenly or be replicated (N a multiple of
the KV-head count, which vLLM handles by giving each GPU a copy).

Only the MLP intermediate width can be fixed after the fact: zero rows of gate/up and zero
columns of down add nothing to the output, so padding it is exact (--pad-for-tp N)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError
from ..plan.shapes import Linear, ModelShapes, layer_groups, layer_kinds, resolve_arch
from ..stream.source import read_config

MARLIN_MIN_THREAD_K = 128
MARLIN_MIN_THREAD_N = 64


@dataclass(frozen=True)
class Problem:
    module: str  # module name in a decoder layer, "attention" for head counts
    message: str
    fixable_by_padding: bool
    fix: str = ""  # what --pad-for-tp does about it: "intermediate_size 224 → 256"


def _alignment(group_size: int) -> int:
    return math.lcm(group_size, MARLIN_MIN_THREAD_K) if group_size > 0 else MARLIN_MIN_THREAD_K


def tp_multiple(tp_size: int, group_size: int) -> int:
    """What a dense MLP width must be a multiple of for TP `tp_size`: each GPU's share a
    multiple of lcm(group size, 128) (this also makes gate/up's share a multiple of 64)."""
    return _alignment(group_size) * tp_size


def padded_intermediate(intermediate: int, tp_size: int, group_size: int) -> int:
    """The smallest width ≥ `intermediate` whose per-GPU share (width / tp_size) is a multiple
    of lcm(group size, 128). Already aligned widths come back unchanged."""
    if intermediate <= 0 or tp_size <= 0:
        raise InputError(f"padded_intermediate needs positive sizes, got {intermediate}, "
                         f"TP {tp_size}")
    unit = tp_multiple(tp_size, group_size)
    return -(-intermediate // unit) * unit


def check_tp(config: dict, arch_spec, tp_size: int, group_size: int) -> list[Problem]:
    """Every problem a TP-`tp_size` deployment of this model at `group_size` would hit; []
    when it would load. arch_spec None: looked up from config's model_type (Llama layout for
    MoE families without an arch file)."""
    if tp_size < 1:
        raise InputError(f"--tp-size must be at least 1, got {tp_size}")
    shapes = ModelShapes.from_config(config)
    arch = resolve_arch(shapes, arch_spec)
    n, g = tp_size, group_size
    problems: list[Problem] = []
    if shapes.heads % n:
        problems.append(Problem("attention", f"{shapes.heads} attention heads do not split "
                                f"over TP {n}; use a TP size that divides {shapes.heads}",
                                False))
    if shapes.kv_heads % n and n % shapes.kv_heads:
        problems.append(Problem("attention", f"{shapes.kv_heads} KV heads neither split over "
                                f"TP {n} nor replicate evenly (TP must divide or be a multiple "
                                f"of {shapes.kv_heads})", False))
    seen = set()
    for moe in layer_kinds(shapes):
        for group in layer_groups(shapes, moe, arch):
            for lin in group.linears:
                if lin.name in seen:
                    continue
                seen.add(lin.name)
                msg = _check_linear(lin, shapes, n, g, expert=group.copies > 1)
                if msg:
                    fix = _padding_fix(lin, config, shapes, n, g, expert=group.copies > 1)
                    msg += (f"; fix: --pad-for-tp {n} pads {fix}" if fix else
                            "; padding cannot fix this: choose another TP size or group size")
                    problems.append(Problem(lin.name, msg, bool(fix), fix))
    return problems


def _padding_fix(lin: Linear, config: dict, shapes: ModelShapes, n: int, g: int,
                 expert: bool) -> str:
    """'KEY OLD → NEW' when --pad-for-tp n fixes this MLP linear's problem, else '': padding
    changes only the MLP width (the key the discovered layer names), so a problem on the
    hidden side (gate/up's input, down's output) or a width already aligned stays."""
    key = lin.width_key
    if key is None:
        return ""
    width = int(getattr(shapes.need_arch().text, key))
    new = padded_intermediate(width, n, g)
    if width <= 0 or new == width:
        return ""
    padded_shapes = ModelShapes.from_config(
        {**config, **shapes.need_arch().config_update(config, key, new)})
    scale = new / width
    padded = Linear(lin.name, int(round(lin.in_features * scale)) if lin.parallel == "row"
                    else lin.in_features,
                    int(round(lin.out_features * scale)) if lin.parallel != "row"
                    else lin.out_features, lin.parallel, lin.width_key)
    if _check_linear(padded, padded_shapes, n, g, expert):
        return ""
    return f"{key} {width} → {new}"


@dataclass(frozen=True)
class Partition:
    """One GPU's share of a linear under TP n, as vLLM's parallel layers cut it."""

    part_in: int
    part_out: int
    split: str  # how it was cut, for messages ("11008 / 4", "full input", ...)
    uneven: str  # '' or why the features do not split evenly (vLLM refuses it)


def partition(lin: Linear, shapes: ModelShapes, n: int) -> Partition:
    """`lin`'s per-GPU shape at TP `n`: column layers split outputs, row layers inputs,
    replicated ones stay whole; k/v replicate when TP exceeds the KV heads."""
    if lin.parallel == "replicated":  # whole on every GPU (DeepSeek's MLA "a" projections)
        return Partition(lin.in_features, lin.out_features, "replicated", "")
    if lin.parallel == "column":
        if lin.name.rsplit(".", 1)[-1] in ("k_proj", "v_proj") and shapes.kv_heads < n:
            return Partition(lin.in_features, shapes.head_dim,
                             f"{shapes.kv_heads} KV heads replicated", "")
        uneven = (f"{lin.name}: {lin.out_features} output features do not split evenly "
                  f"over TP {n}") if lin.out_features % n else ""
        return Partition(lin.in_features, lin.out_features // n,
                         f"{lin.out_features} / {n}", uneven)
    uneven = (f"{lin.name}: {lin.in_features} input features do not split evenly over "
              f"TP {n}") if lin.in_features % n else ""
    return Partition(lin.in_features // n, lin.out_features, f"{lin.in_features} / {n}", uneven)


def marlin_problems(lin: Linear, part: Partition, hidden: int, g: int, expert: bool
                    ) -> list[str]:
    """Why Marlin cannot take `lin`'s per-GPU shape `part` at group size `g` ([] when it
    can): vLLM's verify_marlin_supports_shape for linears, check_moe_marlin_supports_layer
    for fused-MoE experts (`expert`; `hidden` is the model's hidden size)."""
    wrong = []
    if expert:  # fused-MoE Marlin: intermediate per GPU % max(64, g), hidden % 128
        width = part.part_out if lin.parallel == "column" else part.part_in
        need = max(MARLIN_MIN_THREAD_N, g)
        if width % need:
            wrong.append(f"expert intermediate per GPU {width} ({part.split}) is not a "
                         f"multiple of {need} (fused-MoE Marlin: max(64, group size))")
        if hidden % MARLIN_MIN_THREAD_K:
            wrong.append(f"hidden {hidden} is not a multiple of {MARLIN_MIN_THREAD_K}")
        return wrong
    in_note = part.split if lin.parallel == "row" else "full input"
    need_k = _alignment(g)
    if part.part_in % need_k:
        why = "Marlin min_thread_k 128" + (f", group size {g}" if g > 0 else "")
        wrong.append(f"input per GPU {part.part_in} ({in_note}) is not a multiple of {need_k} "
                     f"({why})")
    if part.part_out % MARLIN_MIN_THREAD_N:
        out_note = part.split if lin.parallel == "column" else "full output"
        wrong.append(f"output per GPU {part.part_out} ({out_note}) is not a multiple of "
                     f"{MARLIN_MIN_THREAD_N} (Marlin min_thread_n)")
    return wrong


def _check_linear(lin: Linear, shapes: ModelShapes, n: int, g: int, expert: bool) -> str:
    """'' when `lin` is fine under TP n, else what is wrong with its per-GPU shape."""
    part = partition(lin, shapes, n)
    if part.uneven:
        return part.uneven
    wrong = marlin_problems(lin, part, shapes.hidden, g, expert)
    return f"{lin.name} at TP {n}: " + "; ".join(wrong) if wrong else ""


def describe_problems(problems: list[Problem], tp_size: int, group_size: int | str,
                      padded: bool = False) -> str:
    """Every problem, one a line, then what to do: --pad-for-tp when padding fixes some
    (`padded`: the MLP was already padded for this TP, so it cannot be offered again)."""
    lines = [f"this model will not load at TP {tp_size} with group size {group_size}:"]
    lines += [f"  {p.message}" for p in problems]
    advice = _advice(problems, tp_size, padded)
    if advice:
        lines.append(advice)
    return "\n".join(lines)


def _advice(problems: list[Problem], tp_size: int, padded: bool) -> str:
    """What to do: --pad-for-tp only when padding makes the model load (every problem
    fixable); otherwise padding is not offered, since the export still would not load."""
    if padded or not problems or not all(p.fixable_by_padding for p in problems):
        return ""
    return (f"quantizing with --pad-for-tp {tp_size} fixes all of these (zero-pads the MLP "
            "intermediate width before quantization: exact; config.json records the new size)")


def problem_summary(problems: list[Problem], tp_size: int, group_size: int | str,
                    padded: bool = False) -> str:
    """The refusal in one line: the first problem, the other modules concerned, and what to
    do (`quantize check` prints every problem in full)."""
    first = problems[0].message.split("; ")[0]
    others = list(dict.fromkeys(p.module for p in problems[1:] if p.module != problems[0].module))
    more = (f"; also {', '.join(others)} (quantize check MODEL --tp-size {tp_size} says why)"
            if others else "")
    if _advice(problems, tp_size, padded):
        fixes = ", ".join(sorted({p.fix for p in problems if p.fix}))
        fix = f"quantize with --pad-for-tp {tp_size}: pads {fixes} (exact)"
    else:
        stuck = dict.fromkeys(p.module for p in problems
                              if padded or not p.fixable_by_padding)
        fix = f"padding cannot fix {', '.join(stuck)}: choose another TP size or group size"
    return (f"this model will not load at TP {tp_size} with group size {group_size}: {first}"
            f"{more}; {fix}")


def checkpoint_group_sizes(config: dict, default: int) -> list[int]:
    """Group sizes a checkpoint's quantization_config declares (AWQ / GPTQ: one; compressed-
    tensors: one per config group, -1 for per-channel); [default] when it declares none."""
    q = config.get("quantization_config") or {}
    found = set()
    if q.get("group_size") is not None:
        found.add(int(q["group_size"]))
    for group in (q.get("config_groups") or {}).values():
        weights = (group or {}).get("weights") or {}
        if weights.get("strategy") == "channel" or (weights and weights.get("group_size") is None):
            found.add(-1)
        elif weights.get("group_size") is not None:
            found.add(int(weights["group_size"]))
    return sorted(found) if found else [default]


def check_checkpoint(path, tp_size: int, group_size: int = 128
                     ) -> tuple[list[Problem], list[int]]:
    """`quantize check`: the problems of a model directory (or config.json) at TP `tp_size`,
    reading config.json only; the group size comes from its quantization_config when it has
    one, else `group_size`. Returns (problems over every declared group size, group sizes)."""
    config = read_config(path)
    sizes = checkpoint_group_sizes(config, group_size)
    problems, seen = [], set()
    for g in sizes:
        for problem in check_tp(config, None, tp_size, g):
            if problem.message not in seen:
                seen.add(problem.message)
                problems.append(problem)
    return problems, sizes
