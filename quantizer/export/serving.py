"""Serving rules: will vLLM load this export right, and on its fast (Marlin) path?

Our own rules, written from how vLLM decides at load time (read in its source; each rule cites
the behaviour it encodes). An export is described by an `ExportView`: its quantization_config
and, per linear, what the tensors hold (bits, group size, zero points, g_idx). The same rules
run on a planned export before any work (`planned_view`) and on the written files before they
are published (`read_view`). Three verdicts per finding:

  error    vLLM refuses the checkpoint or loads it with wrong numbers (never published)
  warning  vLLM loads it right but off its fast path (or only some releases / GPUs take it)
  (fine)   nothing said

vLLM's view of a model differs from the checkpoint's in two ways the rules must follow:
fused linears (q/k/v -> qkv_proj, gate/up -> gate_up_proj, DeepSeek's q_a/kv_a ->
fused_qkv_a_proj: one scheme for all shards) and fused-MoE layers (every routed expert of a
layer in one FusedMoE module: one scheme, looked up under expert 0's names)."""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError
from ..plan.shapes import Linear, ModelShapes, layer_groups, layer_kinds, resolve_arch
from ..stream.source import read_config
from .tp import marlin_problems, partition

log = logging.getLogger(__name__)

ENGINES = ("vllm", "none")
ERROR, WARNING = "error", "warning"

# vLLM's MARLIN_SUPPORTED_GROUP_SIZES (quantization/utils/marlin_utils.py).
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
# GPTQMarlinConfig.TYPE_MAP: Marlin serves GPTQ-style (bias-coded, no zero point) 4 and 8 bit.
MARLIN_SYMMETRIC_BITS = (4, 8)
# query_marlin_supported_quant_types(has_zp=True): AWQ-style zero points, uint4 only.
MARLIN_ZERO_POINT_BITS = (4,)
# GPTQConfig (exllama / gptq_gemm): "only 2/3/4/8-bit weight quantization is supported".
GPTQ_BITS = (2, 3, 4, 8)
# WNA16_ZP_SUPPORTED_TYPES_MAP in compressed_tensors_wNa16.py: zero points for 4 and 8 bit.
CT_ZERO_POINT_BITS = (4, 8)
# MoeWNA16Method / the Marlin MoE methods: int4 and int8 experts only.
MOE_BITS = (4, 8)
# vLLM's packed_modules_mapping: checkpoint linears it fuses into one module (one scheme).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
         "gate_up_proj": ("gate_proj", "up_proj"),
         "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa")}
# The expert names vLLM's CompressedTensorsMoEMethod.get_moe_method looks a fused-MoE
# layer's scheme up under: f"{layer_name}.0.{proj}" whatever the checkpoint calls them.
MOE_LOOKUP = ("gate_proj", "up_proj", "down_proj")
_EXPERT = re.compile(r"^(?P<block>.+\.experts)\.(?P<e>\d+)\.(?P<leaf>[^.]+)$")
_LAYER = re.compile(r"^(?P<head>.+?\.layers)\.(?P<i>\d+)\.(?P<rel>.+)$")
_DOWN_LEAVES = ("down_proj", "w2")
_DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # what --pad-for-tp pads


class NotServable(InputError):
    """The export would load wrong in (or be refused by) the serving engine. Raised after the
    layers are done: the job directory is kept, so a fixed layerquant can re-export it."""


@dataclass(frozen=True)
class Scheme:
    """How a loader reads one linear: bits, group size (-1 per channel), zero points,
    act-order with a g_idx the kernel must apply ("group") or not."""

    bits: int
    group_size: int
    symmetric: bool
    g_idx: bool = False

    def label(self) -> str:
        g = "ch" if self.group_size == -1 else f"g{self.group_size}"
        return (f"{self.bits}-bit {g} {'sym' if self.symmetric else 'asym'}"
                + (" act-order g_idx" if self.g_idx else ""))


@dataclass(frozen=True)
class LinearInfo:
    """One linear of the export as its tensors hold it (`scheme` None: float weights)."""

    name: str
    in_features: int
    out_features: int
    scheme: Scheme | None
    zero_points: bool = False  # a zero-point tensor is stored (CT); AWQ/GPTQ always store one
    gidx_permuted: bool = False  # a stored g_idx that is not i // group_size


@dataclass
class ExportView:
    config: dict  # config.json
    linears: dict[str, LinearInfo]
    source: str = ""

    @property
    def qcfg(self) -> dict:
        return self.config.get("quantization_config") or {}

    @property
    def method(self) -> str:
        return str(self.qcfg.get("quant_method", "")).lower()


@dataclass(frozen=True)
class Finding:
    verdict: str  # ERROR or WARNING
    rule: str
    module: str  # a module name with the layer index replaced by '*', or a model-wide label
    message: str
    fix: str = ""
    layers: tuple[int, ...] = ()

    def line(self) -> str:
        where = self.module
        if self.layers:
            where += f" (layers {_ranges(self.layers)})"
        text = f"{self.verdict}: [{self.rule}] {where}: {self.message}"
        return text + (f"; fix: {self.fix}" if self.fix else "")


@dataclass
class Report:
    findings: list[Finding]
    modules: int  # quantized linears checked
    tp_size: int = 1
    engine: str = "vllm"
    paths: dict[str, str] = field(default_factory=dict)  # vLLM kernel path per unit kind

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == WARNING]

    def summary(self) -> str:
        return (f"serving check ({self.engine}, TP {self.tp_size}): {len(self.errors)} "
                f"error(s), {len(self.warnings)} warning(s), {self.modules} quantized modules")

    def to_dict(self) -> dict:
        return {"engine": self.engine, "tp_size": self.tp_size, "summary": self.summary(),
                "kernel_paths": dict(self.paths),
                "errors": [f.line() for f in self.errors],
                "warnings": [f.line() for f in self.warnings]}

    def render(self) -> str:
        lines = [f.line() for f in self.errors] + [f.line() for f in self.warnings]
        lines += [f"vLLM path: {kind}: {path}" for kind, path in self.paths.items()]
        return "\n".join([*lines, self.summary()])


def _ranges(idx: tuple[int, ...]) -> str:
    out, start = [], None
    idx = tuple(sorted(set(idx)))
    for k, i in enumerate(idx):
        if start is None:
            start = i
        if k + 1 == len(idx) or idx[k + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


# ---- reading an export ------------------------------------------------------------------
def read_view(path) -> ExportView:
    """config.json and the tensors' headers (plus the small g_idx / weight_shape tensors)."""
    p = Path(path)
    config = read_config(p)
    files = sorted(p.glob("*.safetensors"))
    with ExitStack() as stack:  # one handle per shard: small tensors are read per linear
        handles = {f: stack.enter_context(safe_open(str(f), "pt")) for f in files}
        headers: dict[str, tuple[tuple[int, ...], str, Path]] = {}
        for f, h in handles.items():
            for k in h.keys():
                sl = h.get_slice(k)
                headers[k] = (tuple(sl.get_shape()), str(sl.get_dtype()), f)

        def tensor(name):
            return handles[headers[name][2]].get_tensor(name)

        linears = _linears_from_tensors(headers, tensor, config)
    return ExportView(config, linears, str(p))


def _linears_from_tensors(headers: dict, tensor, config: dict) -> dict[str, LinearInfo]:
    qcfg = config.get("quantization_config") or {}
    method = str(qcfg.get("quant_method", "")).lower()
    out: dict[str, LinearInfo] = {}
    for name, (shape, dtype, _) in headers.items():
        if name.endswith(".weight_packed"):
            prefix = name[: -len(".weight_packed")]
            out[prefix] = _ct_linear(prefix, headers, tensor)
        elif name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            out[prefix] = (_awq_linear(prefix, headers, qcfg) if method == "awq"
                           else _gptq_linear(prefix, headers, tensor, qcfg))
    for name, (shape, dtype, _) in headers.items():
        if name.endswith(".weight") and len(shape) == 2 and "embed" not in name:
            prefix = name[: -len(".weight")]
            if prefix not in out and (_LAYER.match(prefix) or prefix == "lm_head"):
                out[prefix] = LinearInfo(prefix, shape[1], shape[0], None)
    return out


def _groups(in_features: int, n_groups: int) -> int:
    """The group size the tensors hold: one group is the whole input (== -1, per channel)."""
    return in_features // max(n_groups, 1)


def same_group(a: int, b: int, in_features: int) -> bool:
    """Whether group sizes `a` and `b` read a linear of `in_features` inputs alike."""
    def norm(g):
        return -1 if g == -1 or g >= in_features else g
    return norm(a) == norm(b)


def _ct_linear(prefix: str, headers: dict, tensor) -> LinearInfo:
    packed = headers[f"{prefix}.weight_packed"][0]
    scale = headers[f"{prefix}.weight_scale"][0]
    if f"{prefix}.weight_shape" in headers:
        out_f, in_f = (int(v) for v in tensor(f"{prefix}.weight_shape").tolist())
    else:
        out_f, in_f = scale[0], packed[1] * 32 // 4
    bits = next((b for b in range(2, 9) if -(-in_f * b // 32) == packed[1]), 0)
    zp = f"{prefix}.weight_zero_point" in headers
    g_idx = f"{prefix}.weight_g_idx" in headers
    gs = _groups(in_f, scale[1] if len(scale) > 1 else 1)
    permuted = g_idx and not _trivial(tensor(f"{prefix}.weight_g_idx"), gs)
    return LinearInfo(prefix, in_f, out_f, Scheme(bits, gs, not zp, g_idx), zp, permuted)


def _gptq_linear(prefix: str, headers: dict, tensor, qcfg: dict) -> LinearInfo:
    qweight, scales = headers[f"{prefix}.qweight"][0], headers[f"{prefix}.scales"][0]
    gidx_name = f"{prefix}.g_idx"
    in_f = headers[gidx_name][0][0] if gidx_name in headers else \
        qweight[0] * 32 // int(qcfg.get("bits", 4))
    bits = qweight[0] * 32 // in_f if in_f else 0
    gs = _groups(in_f, scales[0])
    permuted = gidx_name in headers and not _trivial(tensor(gidx_name), gs)
    return LinearInfo(prefix, in_f, scales[1], Scheme(bits, gs, bool(qcfg.get("sym", False)),
                                                       permuted), True, permuted)


def _awq_linear(prefix: str, headers: dict, qcfg: dict) -> LinearInfo:
    qweight, scales = headers[f"{prefix}.qweight"][0], headers[f"{prefix}.scales"][0]
    in_f, out_f = qweight[0], scales[1]
    bits = qweight[1] * 32 // out_f if out_f else 0
    return LinearInfo(prefix, in_f, out_f, Scheme(bits, _groups(in_f, scales[0]), False), True)


def _trivial(g_idx, group_size: int) -> bool:
    n = g_idx.numel()
    gs = n if group_size == -1 else group_size
    return bool(torch.equal(g_idx.to(torch.int64), torch.arange(n) // gs))


# ---- what the loader will use for each linear -------------------------------------------
@dataclass(frozen=True)
class Declared:
    """What vLLM builds for a linear: `scheme` None = an unquantized layer; `why` says how
    the config led there (for messages); `target` the CT config group that matched."""

    scheme: Scheme | None
    why: str
    target: str = ""


def declared(view: ExportView, name: str) -> Declared:
    method = view.method
    q = view.qcfg
    if method == "awq":
        # AWQMarlinConfig.get_quant_method: is_layer_skipped(..., skip_with_substr=True) --
        # a module_to_not_convert that is a substring of the name leaves it unquantized.
        skip = [m for m in (q.get("modules_to_not_convert") or []) if m and m in name]
        if skip:
            return Declared(None, f"modules_to_not_convert {skip[0]!r} is a substring of it")
        return Declared(Scheme(int(q.get("bits", 0)), int(q.get("group_size", -1)),
                               not q.get("zero_point", True)), "awq config")
    if method == "gptq":
        return _gptq_declared(view, name)
    if method == "compressed-tensors":
        return _ct_declared(q, name)
    return Declared(None, f"quant_method {method!r}")


def _gptq_declared(view: ExportView, name: str) -> Declared:
    """GPTQ(Marlin)Config: the base scheme, GPTQModel's `dynamic` overrides ('-:' skips a
    module, '+:' or bare patterns override its fields; gptq_utils.get_dynamic_override), and
    layers whose tensors are float are built unquantized (maybe_update_config reads them)."""
    q = view.qcfg
    info = view.linears.get(name)
    if info is not None and info.scheme is None:
        return Declared(None, "float tensors")
    bits, gs = int(q.get("bits", 0)), int(q.get("group_size", -1))
    sym, desc = bool(q.get("sym", False)), bool(q.get("desc_act", False))
    for pattern, over in (q.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return Declared(None, f"dynamic {pattern!r} skips it")
        elif re.match(pattern.removeprefix("+:"), name):
            bits, gs = int(over.get("bits", bits)), int(over.get("group_size", gs))
            sym, desc = bool(over.get("sym", sym)), bool(over.get("desc_act", desc))
            break
    if desc and gs == -1:  # GPTQMarlinConfig: act-order means nothing per channel
        desc = False
    return Declared(Scheme(bits, gs, sym, desc), "gptq config")


def _match(name: str, target: str) -> bool:
    # compressed-tensors / vLLM: 're:' targets with re.match, others by equality (class-name
    # targets such as "Linear" match every linear module).
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == "Linear"


def _ct_declared(q: dict, name: str) -> Declared:
    """CompressedTensorsConfig: `ignore` first (should_ignore_layer), then the first config
    group with a matching target (find_matched_target walks targets in file order)."""
    for ign in q.get("ignore") or []:
        if _match(name, ign) and ign != "Linear":
            return Declared(None, f"ignore {ign!r}")
    for gname, group in (q.get("config_groups") or {}).items():
        for target in group.get("targets") or []:
            if _match(name, target):
                w = group.get("weights") or {}
                gs = -1 if w.get("strategy") == "channel" or w.get("group_size") in (None, -1) \
                    else int(w["group_size"])
                actorder = w.get("actorder")
                g_idx = actorder in ("group", "dynamic", True)
                return Declared(Scheme(int(w.get("num_bits", 0)), gs,
                                       bool(w.get("symmetric", True)), g_idx),
                                f"config group {gname}", target)
    return Declared(None, "no config group targets it")


# ---- vLLM's modules ---------------------------------------------------------------------
@dataclass
class Unit:
    """A module vLLM builds: one linear, a fused linear, or a fused-MoE layer."""

    kind: str  # "linear", "fused", "moe"
    name: str  # vLLM's name (model.layers.3.self_attn.qkv_proj, ...experts for MoE)
    members: list[str]
    layer: int | None


def units(view: ExportView) -> list[Unit]:
    names = sorted(view.linears)
    out: list[Unit] = []
    taken: set[str] = set()
    moe: dict[str, list[str]] = defaultdict(list)
    for n in names:
        m = _EXPERT.match(n)
        if m:
            moe[m["block"]].append(n)
            taken.add(n)
    for block, members in sorted(moe.items()):
        out.append(Unit("moe", block, members, _layer_index(block)))
    by_parent: dict[str, dict[str, str]] = defaultdict(dict)
    for n in names:
        if n not in taken:
            parent, _, leaf = n.rpartition(".")
            by_parent[parent][leaf] = n
    for parent, leaves in by_parent.items():
        for fused, shards in FUSED.items():
            if all(s in leaves for s in shards):
                members = [leaves.pop(s) for s in shards]
                out.append(Unit("fused", f"{parent}.{fused}", members, _layer_index(parent)))
        for leaf, n in leaves.items():
            out.append(Unit("linear", n, [n], _layer_index(n)))
    return out


def _layer_index(name: str) -> int | None:
    m = _LAYER.match(name + ".x")
    return int(m["i"]) if m else None


def _generic(name: str) -> str:
    m = _LAYER.match(name)
    return f"{m['head']}.*.{m['rel']}" if m else name


# ---- the rules ---------------------------------------------------------------------------
class _Collector:
    def __init__(self):
        self.found: dict[tuple, list[int]] = {}

    def add(self, verdict, rule, module, message, fix="", layer=None):
        key = (verdict, rule, _generic(module) if layer is not None else module, message, fix)
        self.found.setdefault(key, [])
        if layer is not None:
            self.found[key].append(layer)

    def findings(self) -> list[Finding]:
        return [Finding(v, r, m, msg, fix, tuple(sorted(set(ls))))
                for (v, r, m, msg, fix), ls in self.found.items()]


def check_view(view: ExportView, tp_size: int = 1, engine: str = "vllm",
               strict_tp: bool = False) -> Report:
    """Every rule over the export. `strict_tp`: the user asked for TP `tp_size` (--tp-size),
    so a per-GPU shape Marlin cannot take is an error there, not a warning."""
    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    quantized = [i for i in view.linears.values() if i.scheme is not None]
    report = Report([], len(quantized), tp_size, engine)
    if engine == "none":
        return report
    c = _Collector()
    method = view.method
    if not quantized:
        c.add(ERROR, "format", "model", "no quantized linear found in the tensors")
    elif method not in ("awq", "gptq", "compressed-tensors"):
        # vLLM picks a quantization method by quantization_config.quant_method.
        c.add(ERROR, "format", "model", f"quant_method {method!r} is not one layerquant "
              "writes for vLLM (awq, gptq, compressed-tensors)")
    else:
        _config_rules(view, c)
        shapes = _shapes(view)
        for unit in units(view):
            _unit_rules(view, unit, c, shapes, tp_size, strict_tp)
        report.paths = kernel_paths(view, units(view))
    report.findings = sorted(c.findings(), key=lambda f: (f.verdict != ERROR, f.rule, f.module))
    return report


def _shapes(view: ExportView) -> ModelShapes | None:
    try:
        return ModelShapes.from_config(view.config)
    except InputError:
        return None


def _config_rules(view: ExportView, c: _Collector) -> None:
    q, method = view.qcfg, view.method
    if method == "compressed-tensors":
        for gname, group in (q.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            actorder = w.get("actorder")
            # compressed-tensors >= 0.19 (QuantizationArgs.validate_actorder): actorder 'group'
            # / 'dynamic' / true "has been removed"; the config no longer parses, so neither
            # transformers nor vLLM loads the checkpoint. 'weight' (static groups) is kept.
            if actorder in ("group", "dynamic", True):
                c.add(ERROR, "ct-actorder", f"config group {gname}",
                      f"actorder {actorder!r} is rejected by compressed-tensors >= 0.19",
                      "--static-groups (actorder 'weight', no g_idx) or --format gptq")
            elif actorder not in (None, "weight", "static", False):
                c.add(ERROR, "ct-actorder", f"config group {gname}",
                      f"actorder {actorder!r} is not a compressed-tensors value")
            if group.get("format", q.get("format")) != "pack-quantized":
                # _get_scheme_from_parts: WNA16 needs format pack-quantized.
                c.add(ERROR, "ct-format", f"config group {gname}",
                      f"format {group.get('format', q.get('format'))!r}: vLLM's WNA16 "
                      "scheme reads pack-quantized only")


def _unit_rules(view: ExportView, unit: Unit, c: _Collector, shapes, tp_size: int,
                strict_tp: bool) -> None:
    decl = {m: declared(view, m) for m in unit.members}
    infos = [view.linears[m] for m in unit.members]
    if all(i.scheme is None for i in infos):
        _float_rules(view, unit, decl, c)
        return
    if unit.kind == "moe":
        _moe_rules(view, unit, decl, c, shapes, tp_size, strict_tp)
        return
    _fused_consistency(view, unit, decl, c)
    for m in unit.members:
        _linear_rules(view, view.linears[m], decl[m], c, unit)
    _shape_rules(view, unit, decl, c, shapes, tp_size, strict_tp)


def _float_rules(view, unit, decl, c) -> None:
    """A float linear must be built float: a scheme for it means the loader expects packed
    tensors that are not there (compressed-tensors "Linear" targets catch routers unless they
    are in `ignore`; transformers then fails at the router's forward)."""
    for m in unit.members:
        d = decl[m]
        if d.scheme is not None and view.method == "compressed-tensors":
            c.add(ERROR, "ct-ignore", m, f"float weights, but {d.why} (target {d.target!r}) "
                  "quantizes it: loaders expect packed tensors", "list it in `ignore`",
                  _layer_index(m))


def _fused_consistency(view, unit, decl, c) -> None:
    """vLLM fuses these shards into one module with one scheme: should_ignore_layer raises
    "Found a different quantization schemes" when some shards are ignored, and
    _match_fused_layer applies the first shard's target to all (other widths load wrong);
    GPTQ: "Detected some but not all shards ... are quantized"."""
    if unit.kind != "fused":
        return
    schemes = {decl[m].scheme for m in unit.members}
    actual = {_key(view.linears[m]) for m in unit.members}
    if len(schemes) > 1 or len(actual) > 1:
        desc = ", ".join(f"{m.rsplit('.', 1)[-1]} "
                         f"{view.linears[m].scheme.label() if view.linears[m].scheme else 'float'}"
                         for m in unit.members)
        c.add(ERROR, "fused-scheme", unit.name, f"vLLM fuses {desc} into one module with one "
              "scheme", "give the fused shards one setting (adaptive: --engine vllm "
              "constrains it)", unit.layer)


def _key(info: LinearInfo):
    s = info.scheme
    if s is None:
        return None
    g = -1 if s.group_size == -1 or s.group_size >= info.in_features else s.group_size
    return (s.bits, g, s.symmetric, s.g_idx)


def _linear_rules(view, info: LinearInfo, d: Declared, c: _Collector, unit: Unit) -> None:
    name, s, method = info.name, info.scheme, view.method
    layer = _layer_index(name)
    if s is None:
        if d.scheme is not None:
            _float_rules(view, Unit("linear", name, [name], layer), {name: d}, c)
        return
    if d.scheme is None:
        # The loader builds an unquantized layer and cannot load qweight / weight_packed.
        c.add(ERROR, "scheme", name, f"packed tensors, but the loader builds it unquantized "
              f"({d.why})", "the config must target every quantized linear", layer)
        return
    _scheme_matches(view, info, d, c, layer)
    if method == "awq":
        # AWQMarlinConfig.TYPE_MAP / AWQ GEMM kernel: the AutoAWQ layout is 4-bit.
        if s.bits != 4:
            c.add(ERROR, "awq-bits", name, f"{s.bits}-bit AWQ: vLLM serves 4-bit AWQ only",
                  "--format gptq or compressed-tensors", layer)
    elif method == "gptq":
        if s.bits not in GPTQ_BITS:
            c.add(ERROR, "gptq-bits", name, f"{s.bits}-bit: vLLM's GPTQ kernels take "
                  f"{'/'.join(map(str, GPTQ_BITS))}-bit", "--format compressed-tensors", layer)
        elif d.scheme.g_idx is False and info.gidx_permuted:
            # desc_act false: gptq_marlin builds the kernel without g_idx (has_g_idx =
            # desc_act) and never reads the stored permutation.
            c.add(ERROR, "gidx", name, "g_idx is a permutation but desc_act is false: vLLM "
                  "ignores it", "export with desc_act true or static groups", layer)
        elif not (s.bits in MARLIN_SYMMETRIC_BITS and d.scheme.symmetric
                  and s.group_size in MARLIN_GROUP_SIZES):
            # GPTQMarlinConfig.is_gptq_marlin_compatible: (bits, sym) in TYPE_MAP and a Marlin
            # group size, else vLLM uses GPTQConfig (exllama / gptq_gemm), which it calls
            # slower (and warns unreliable for 4-bit on recent releases).
            why = ("asymmetric (zero points)" if not d.scheme.symmetric else
                   f"{s.bits}-bit" if s.bits not in MARLIN_SYMMETRIC_BITS else
                   f"group size {s.group_size}")
            c.add(WARNING, "gptq-marlin", name, f"{why}: vLLM serves it with its exllama / "
                  "gptq_gemm kernels, not gptq_marlin", "--sym (4 or 8 bit, group "
                  "-1/32/64/128)", layer)
    elif method == "compressed-tensors":
        _ct_linear_rules(info, d, c, layer)


def _scheme_matches(view, info: LinearInfo, d: Declared, c: _Collector, layer) -> None:
    """The config must describe the tensors: else the loader allocates other shapes (load
    error) or reads the codes with the wrong zero point / order (wrong numbers)."""
    s, want = info.scheme, d.scheme
    assert s is not None and want is not None  # callers compare quantized linears only
    bad = []
    if s.bits != want.bits:
        bad.append(f"{s.bits}-bit tensors, {want.bits}-bit in the config")
    if not same_group(s.group_size, want.group_size, info.in_features):
        bad.append(f"group size {s.group_size} in the tensors, {want.group_size} in the config")
    if view.method == "compressed-tensors":
        if info.zero_points and want.symmetric:
            bad.append("zero points stored, symmetric in the config (they would be ignored)")
        if not info.zero_points and not want.symmetric:
            bad.append("asymmetric in the config, no weight_zero_point stored")
        if info.gidx_permuted and not want.g_idx:
            bad.append("a permuting weight_g_idx stored, the config's actorder never reads it")
    if bad:
        c.add(ERROR, "scheme", info.name, f"{d.why}: " + "; ".join(bad),
              "re-export (the config must match the tensors)", layer)


def _ct_linear_rules(info: LinearInfo, d: Declared, c: _Collector, layer) -> None:
    s = d.scheme
    assert s is not None  # _linear_rules returned for a linear declared unquantized
    if not s.symmetric and s.bits not in CT_ZERO_POINT_BITS:
        # CompressedTensorsWNA16.__init__: "Asymmetric quantization not supported for
        # num_bits" outside WNA16_ZP_SUPPORTED_TYPES_MAP (4, 8).
        c.add(ERROR, "ct-asym-bits", info.name, f"asymmetric {s.bits}-bit: vLLM takes zero "
              "points for 4 and 8 bit only", "--sym (the default)", layer)
    elif not s.symmetric:
        # Zero points: vLLM >= 0.8.5 (#14211); Marlin's zero-point type is uint4 only.
        path = "Marlin (uint4 with zero points)" if s.bits == 4 else \
            "no Marlin kernel (Marlin takes zero points for 4 bit only)"
        c.add(WARNING, "ct-asym", info.name, f"asymmetric {s.bits}-bit compressed-tensors: "
              f"vLLM >= 0.8.5 only, {path}", "--sym for every vLLM release", layer)
    elif s.bits not in MARLIN_SYMMETRIC_BITS:
        # WNA16_SUPPORTED_BITS was [4, 8] until recent releases widened it to 2-8 (bias-coded
        # uint types Marlin does not take).
        c.add(WARNING, "ct-bits", info.name, f"{s.bits}-bit: only recent vLLM releases take "
              "2-8 bit compressed-tensors (older: 4 and 8), and not on Marlin",
              "4 or 8 bit for the fast path", layer)


def _layer_shapes(shapes: ModelShapes | None, view: ExportView):
    if shapes is None:
        return None, {}
    try:
        arch = resolve_arch(shapes, None)
    except InputError:
        return shapes, {}
    styles = {}
    for moe in layer_kinds(shapes):
        for group in layer_groups(shapes, moe, arch):
            for lin in group.linears:
                styles[lin.name] = lin.parallel
    return shapes, styles


def _parallel(rel: str, styles: dict) -> str | None:
    if rel in styles:
        return styles[rel]
    leaf = rel.rsplit(".", 1)[-1]
    if ".shared_expert" in f".{rel}":
        return "row" if leaf == "down_proj" else "column"
    return None


def _shape_rules(view, unit: Unit, decl, c: _Collector, shapes, tp_size: int,
                 strict_tp: bool) -> None:
    """Marlin's shape limits per GPU (verify_marlin_supports_shape: N % 64, K % 128, K %
    group): a miss sends the layer to another kernel (awq_marlin -> awq; gptq_marlin /
    compressed-tensors -> Machete, Exllama, ... or none), so it is a warning -- an error when
    the user asked for this TP size (--tp-size N: the fast path at TP N)."""
    shapes, styles = _layer_shapes(shapes, view)
    for m in unit.members:
        info = view.linears[m]
        mm = _LAYER.match(m)
        if info.scheme is None or mm is None or shapes is None:
            continue
        style = _parallel(mm["rel"], styles)
        if style is None:
            continue
        lin = Linear(mm["rel"], info.in_features, info.out_features, style)
        part = partition(lin, shapes, tp_size)
        layer = int(mm["i"])
        if part.uneven:
            # vLLM's parallel layers assert an even split (divide(...)): refused.
            c.add(ERROR, "tp-split", m, part.uneven, "another --tp-size", layer)
            continue
        g = info.scheme.group_size
        if g > 0 and part.part_in % g and part.part_in != info.in_features:
            # verify_group_size_divides_partition / GPTQ "input size is not aligned".
            c.add(ERROR, "tp-split", m, f"input per GPU {part.part_in} is not a multiple of "
                  f"group size {g} at TP {tp_size}", f"--pad-for-tp {tp_size}" if mm["rel"]
                  in _DENSE_MLP else "another --tp-size or --group-size", layer)
            continue
        wrong = marlin_problems(lin, part, shapes.hidden, g, expert=False)
        if g not in MARLIN_GROUP_SIZES:
            wrong.append(f"group size {g} (Marlin: -1/32/64/128)")
        if wrong:
            verdict = ERROR if strict_tp else WARNING
            c.add(verdict, "marlin-shape", m, f"{mm['rel']} at TP {tp_size}: "
                  + "; ".join(wrong) + " -- off the Marlin kernels",
                  f"--pad-for-tp {tp_size}" if tp_size > 1 and mm["rel"] in _DENSE_MLP
                  else "", layer)


def _moe_rules(view, unit: Unit, decl, c: _Collector, shapes, tp_size: int,
               strict_tp: bool) -> None:
    name, layer, method = unit.name, unit.layer, view.method
    infos = [view.linears[m] for m in unit.members]
    # Declared schemes (the config's) decide; the tensors are held to them below. Tensors
    # alone cannot tell g64 on a 64-wide down_proj from per-channel.
    schemes = {decl[m].scheme for m in unit.members}
    if len(schemes) > 1 or None in schemes or any(i.scheme is None for i in infos):
        # FusedMoE holds every expert in one w13 / w2 tensor pair of one layout; the CT MoE
        # method raises "All MoE projections need to have same quantization scheme".
        desc = sorted({s.label() if s else "float" for s in schemes}
                      | {"float tensors" for i in infos if i.scheme is None})
        c.add(ERROR, "moe-scheme", name, f"experts of one fused-MoE layer differ "
              f"({', '.join(desc)}): vLLM loads one scheme per layer",
              "one setting for all experts of a layer (adaptive: --engine vllm)", layer)
        return
    s = next(iter(schemes))
    for m in unit.members:
        _scheme_matches(view, view.linears[m], decl[m], c, layer)
    if method == "compressed-tensors":
        _ct_moe_lookup(view, unit, s, c)
    if s.bits not in MOE_BITS:
        c.add(ERROR, "moe-bits", name, f"{s.bits}-bit experts: vLLM's fused-MoE methods take "
              "int4 / int8 only", "--bits 4 or 8 for MoE experts", layer)
        return
    if method == "awq" and s.bits != 4:
        return  # awq-bits says it per linear
    sym = s.symmetric
    if method == "gptq" and not sym:
        # gptq_marlin takes symmetric only, so vLLM picks GPTQConfig, whose get_quant_method
        # builds MoeWNA16Config with "sym": True for a FusedMoE: zero points never read.
        c.add(ERROR, "moe-gptq-asym", name, "asymmetric GPTQ experts: vLLM's GPTQ MoE path "
              "assumes symmetric and ignores the zero points (wrong numbers, silently)",
              "--sym (the GPTQ default)", layer)
        return
    if method == "compressed-tensors" and not sym:
        # CompressedTensorsMoEMethod: WNA16 MoE was symmetric-only until vLLM #44025 (2026).
        c.add(ERROR, "ct-moe-asym", name, "asymmetric compressed-tensors experts: refused "
              "by the fused-MoE methods of vLLM releases before mid-2026", "--sym", layer)
        return
    _moe_shape_rules(view, unit, s, c, shapes, tp_size, strict_tp)


def _ct_moe_lookup(view, unit: Unit, s: Scheme, c: _Collector) -> None:
    """CompressedTensorsMoEMethod.get_moe_method looks the layer's scheme up under
    f"{experts}.0.gate_proj/up_proj/down_proj" (vLLM's names, not the checkpoint's: w1/w3/w2
    for Mixtral); every one must resolve to the experts' scheme. Releases before #28871
    read the "Linear" target instead."""
    q = view.qcfg
    for proj in MOE_LOOKUP:
        d = _ct_declared(q, f"{unit.name}.0.{proj}")
        if d.scheme is None:
            c.add(ERROR, "moe-lookup", unit.name, f"vLLM looks the fused-MoE scheme up under "
                  f"experts.0.{proj}, which {d.why}: it builds the layer unquantized or "
                  "refuses (\"Unable to find matching target\")",
                  "targets that cover the expert names vLLM looks up", unit.layer)
            return
        if (d.scheme.bits, d.scheme.group_size, d.scheme.symmetric) != (
                s.bits, s.group_size, s.symmetric):
            c.add(ERROR, "moe-lookup", unit.name, f"vLLM's lookup name experts.0.{proj} "
                  f"resolves to {d.scheme.label()}, the experts hold {s.label()}",
                  "targets that cover the expert names vLLM looks up", unit.layer)
            return
    targets = [t for g in (q.get("config_groups") or {}).values() for t in g.get("targets", [])]
    if "Linear" not in targets:
        c.add(WARNING, "moe-linear-target", "model", "no \"Linear\" config group: vLLM "
              "releases before late 2025 (#28871) read MoE schemes from it only (KeyError "
              "'Linear')", "a recent vLLM")


def _moe_shape_rules(view, unit: Unit, s: Scheme, c: _Collector, shapes, tp_size: int,
                     strict_tp: bool) -> None:
    """check_moe_marlin_supports_layer: hidden % 128, intermediate per GPU % max(64, g),
    g in -1/32/64/128; otherwise the MoeWNA16 (Triton) method, which halves the group
    size until it divides both widths (asserting >= 32), takes 8-bit only per channel, and
    drops act-order g_idx (CT raises "WNA16MoE is not supported with actorder=group")."""
    if shapes is None:
        return
    down = [view.linears[m] for m in unit.members
            if m.rsplit(".", 1)[-1] in _DOWN_LEAVES]
    if not down:
        return
    inter, hidden = down[0].in_features, down[0].out_features
    if inter % tp_size:
        c.add(ERROR, "tp-split", unit.name, f"expert width {inter} does not split over TP "
              f"{tp_size}", "another --tp-size", unit.layer)
        return
    per = inter // tp_size
    lin = Linear("experts.down", inter, hidden, "row")
    wrong = marlin_problems(lin, partition(lin, shapes, tp_size), hidden, s.group_size,
                            expert=True)
    if s.group_size not in MARLIN_GROUP_SIZES:
        wrong.append(f"group size {s.group_size} (Marlin: -1/32/64/128)")
    if not wrong:
        return
    fallback = []
    if s.g_idx:
        fallback.append("act-order g_idx (the MoeWNA16 kernels ignore it)")
    if s.bits == 8 and s.group_size != -1:
        fallback.append("8-bit with groups (MoeWNA16 takes int8 per channel only)")
    g = s.group_size if s.group_size > 0 else per
    while g >= 32 and (per % g or hidden % g):
        g //= 2
    if s.group_size > 0 and g < 32:
        fallback.append(f"no group size >= 32 divides {per} and {hidden}")
    msg = "fused-MoE Marlin cannot take it: " + "; ".join(wrong)
    if fallback:
        c.add(ERROR, "moe-fallback", unit.name, msg + "; and vLLM's MoeWNA16 fallback "
              "cannot either: " + "; ".join(fallback), "--static-groups / 4-bit / another "
              "group size", unit.layer)
    else:
        c.add(ERROR if strict_tp else WARNING, "moe-marlin-shape", unit.name,
              msg + " -- served by the MoeWNA16 (Triton) kernels instead",
              "", unit.layer)


# ---- which kernel path, for the report --------------------------------------------------
def kernel_paths(view: ExportView, us: list[Unit]) -> dict[str, str]:
    """The vLLM method each kind of module takes (the config decides it, shapes aside)."""
    q, method = view.qcfg, view.method
    dense = [u for u in us if u.kind != "moe" and any(view.linears[m].scheme for m in u.members)]
    moe = [u for u in us if u.kind == "moe" and view.linears[u.members[0]].scheme]
    paths = {}
    if method == "awq":
        bits, g = int(q.get("bits", 0)), int(q.get("group_size", -1))
        marlin = bits == 4 and g in MARLIN_GROUP_SIZES
        if dense:
            paths["dense"] = "awq_marlin (AWQMarlinLinearMethod)" if marlin else "awq (GEMM)"
        if moe:
            paths["moe"] = "awq_marlin (AWQMoEMethod, Marlin MoE)" if marlin else "moe_wna16"
    elif method == "gptq":
        bits, g, sym = int(q.get("bits", 0)), int(q.get("group_size", -1)), bool(q.get("sym"))
        marlin = bits in MARLIN_SYMMETRIC_BITS and sym and g in MARLIN_GROUP_SIZES
        if dense:
            paths["dense"] = ("gptq_marlin (GPTQMarlinLinearMethod)" if marlin
                              else "gptq (exllama / gptq_gemm)")
        if moe:
            paths["moe"] = ("gptq_marlin (GPTQMarlinMoEMethod)" if marlin
                            else "gptq -> MoeWNA16 (assumes symmetric)")
    elif method == "compressed-tensors":
        schemes = {s for u in dense for m in u.members
                   if (s := view.linears[m].scheme) is not None}
        if dense:
            marlin = all(s.bits in MARLIN_SYMMETRIC_BITS and s.symmetric or
                         s.bits in MARLIN_ZERO_POINT_BITS and not s.symmetric
                         for s in schemes)
            paths["dense"] = ("compressed-tensors WNA16 (Marlin)" if marlin
                              else "compressed-tensors WNA16 (non-Marlin kernels)")
        if moe:
            paths["moe"] = "compressed-tensors WNA16 MoE (Marlin MoE)"
    return paths


# ---- entry points -------------------------------------------------------------------------
def check_export(path, tp_size: int = 1, engine: str = "vllm", strict_tp: bool = False
                 ) -> Report:
    return check_view(read_view(path), tp_size, engine, strict_tp)


def refuse_errors(report: Report, when: str, error=InputError) -> None:
    """Raise `error` naming every error (one line each) and the setting that fixes it."""
    if report.errors:
        lines = [f"{when}: vLLM would load this export wrong or refuse it "
                 f"({len(report.errors)} error(s); --engine none skips the vLLM rules):"]
        lines += [f"  {f.line()}" for f in report.errors]
        raise error("\n".join(lines))


def planned_view(config: dict, qcfg: dict, shapes: dict[str, tuple[int, int]],
                 layer_names: list[str], settings_of) -> ExportView:
    """The export a job will write, described before any weight is read: `layer_names` the
    full names of every quantized linear, `shapes` (out, in) by name, `settings_of(name)` its
    Scheme (zero points and g_idx as the exporter will store them)."""
    method = str(qcfg.get("quant_method", "")).lower()
    linears = {}
    for n in layer_names:
        out_f, in_f = shapes[n]
        s = settings_of(n)
        linears[n] = LinearInfo(n, in_f, out_f, s,
                                zero_points=(not s.symmetric) if method ==
                                "compressed-tensors" else True,
                                gidx_permuted=s.g_idx)
    return ExportView({**config, "quantization_config": qcfg}, linears, "plan")


__all__ = ["ENGINES", "ExportView", "Finding", "LinearInfo", "NotServable", "Report", "Scheme",
           "check_export", "check_view", "declared", "planned_view", "read_view",
           "refuse_errors", "same_group", "units", "candidate_servable", "default_symmetric",
           "expert_block", "is_expert", "router_ignore"]


# ---- defaults that serve ------------------------------------------------------------------
def default_symmetric(export_format: str) -> bool:
    """The symmetry a format's default export takes so that vLLM serves it on its fast path
    for dense and MoE models alike:
    - awq: asymmetric. The AutoAWQ layout always stores zero points, and vLLM serves them on
      Marlin (awq_marlin, uint4 with zero points; AWQMoEMethod for experts).
    - gptq: symmetric. gptq_marlin takes (4|8-bit, sym) only; asymmetric GPTQ runs on the
      exllama / gptq_gemm kernels, and on MoE vLLM's GPTQ path assumes symmetric (wrong
      numbers).
    - compressed-tensors: symmetric. Zero points need vLLM >= 0.8.5 (#14211) for 4/8-bit
      dense layers and are refused for MoE experts before vLLM #44025 (2026) and for 2/3/5/6-bit
      everywhere. `--asym` keeps the asymmetric choice for 4-bit dense exports."""
    return export_format != "awq"


def candidate_servable(candidate: dict, symmetric: bool, expert: bool) -> bool:
    """Whether vLLM serves a measured adaptive candidate (measurement.json form):
    - one scheme per vLLM module: mixtures give the shards of a fused linear (q/k/v, gate/up)
      different widths (should_ignore_layer / _match_fused_layer, see `_fused_consistency`);
    - routed experts: int4 / int8, symmetric (the fused-MoE methods; see `_moe_rules`);
    - dense: zero points only at 4 / 8 bit (WNA16_ZP_SUPPORTED_TYPES_MAP).
    Ties (every expert of a layer one setting) are the optimiser's, not a candidate's."""
    if not candidate.get("uniform", True):
        return False
    bits = {int(m["bits"]) for m in (candidate.get("modules") or {}).values()} or {
        int(candidate["bits"])}
    if expert:
        return symmetric and bits <= set(MOE_BITS)
    return symmetric or bits <= set(CT_ZERO_POINT_BITS)


def is_expert(name: str) -> bool:
    """A routed expert's linear (gathered into vLLM's fused-MoE layer)."""
    return _EXPERT.match(name) is not None


def expert_block(name: str) -> str | None:
    m = _EXPERT.match(name)
    return m["block"] if m else None


def router_ignore(arch) -> list[str]:
    """`ignore` entries for the float linears a MoE layer keeps beside its quantized ones
    (router, shared-expert gate): with a "Linear" target compressed-tensors and vLLM would
    otherwise take them as quantized."""
    moe = getattr(arch, "moe", None)
    if moe is None:
        return []
    head = re.escape(arch.layers_prefix) + r"\.\d+\." + re.escape(moe.disk_block) + r"\."
    return [f"re:^{head}{re.escape(n)}$" for n in (moe.router, moe.shared_gate) if n]
