"""Quantized originals read as float: checkpoints published already quantized, dequantized one
tensor at a time on the device just before calibration, never written back in full precision.

Formats (`original_format(config, header)` recognises them from config.json's
quantization_config and the safetensors headers alone):

- ``fp8`` block-scaled (DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8; transformers' "fp8" method):
  ``X.weight`` float8 e4m3 (out, in) and ``X.weight_scale_inv`` (ceil(out/b0), ceil(in/b1))
  for ``weight_block_size`` [b0, b1] (a single value when the block size is null: per
  tensor); W = fp8 * scale_inv over each block (the "inv" is the dequantization multiplier).
- compressed-tensors float / naive-quantized (FP8 e4m3 or INT8 ``X.weight`` +
  ``X.weight_scale`` per tensor, channel (out, 1), group (out, in/g) or block
  (ceil(out/b0), ceil(in/b1)); INT8 may carry a ``weight_zero_point``): W = (q - z) * s.
- compressed-tensors pack-quantized (Kimi-K2-Thinking's INT4): ``X.weight_packed`` int32,
  ``X.weight_scale`` (out, groups), ``X.weight_shape`` [out, in], optional
  ``X.weight_zero_point`` and ``X.weight_g_idx``; unpacked by kernels/packing.py, the one
  definition of that layout in this project.
- MXFP4 (gpt-oss; transformers' "mxfp4" method): ``X_blocks`` uint8 (E, rows, G, 16), two
  FP4 e2m1 codes per byte, low nibble first, and ``X_scales`` uint8 (E, rows, G), an e8m0
  exponent biased by 127 per 32 values; the float tensor ``X`` is (E, G*32, rows), the
  layout of transformers' GptOss experts (gate_up_proj (E, H, 2I), down_proj (E, I, H)).

Every stored tensor belongs to exactly one logical tensor (a weight and its scales, or a plain
tensor as it is); activation scales (``input_scale``, ``k_scale`` ...) describe activation
quantization, which a weight-only export does not carry, and are dropped. Everything the
headers can prove wrong (a missing or stray scale, a scale of the wrong shape or dtype) is
refused when the checkpoint is opened, before any work; what needs the values (weight_shape,
g_idx, non-finite scales) when the tensor is read."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..kernels.packing import ct_unpack_linear

# Float32 elements per slice while dequantizing (64 MiB): the device never holds a float32
# copy of a whole wide weight (DeepSeek-V3's dense MLP is 18432 x 7168).
SLICE_ELEMENTS = 1 << 24

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")
# Tensors of activation (not weight) quantization: a weight-only export does not carry them.
ACTIVATION_SUFFIXES = (".input_scale", ".input_zero_point", ".output_scale",
                       ".output_zero_point", ".k_scale", ".v_scale", ".q_scale",
                       ".activation_scale", ".input_global_scale")
# Tensors only quantized exports hold (AWQ / GPTQ qweight, compressed-tensors weight_packed).
_PACKED_SUFFIXES = (".qweight", ".qzeros", ".weight_packed")
# Methods people publish quantized checkpoints in that this module does not read.
_NOT_READ = {"awq": "AWQ", "gptq": "GPTQ", "bitsandbytes": "bitsandbytes", "gguf": "GGUF",
             "hqq": "HQQ", "exl2": "EXL2", "aqlm": "AQLM", "quanto": "quanto",
             "torchao": "torchao", "fbgemm_fp8": "FBGEMM FP8", "modelopt": "ModelOpt",
             "nvfp4": "NVFP4", "bitnet": "BitNet", "eetq": "EETQ", "higgs": "HIGGS",
             "vptq": "VPTQ", "spqr": "SpQR", "fp_quant": "FP-Quant", "auto-round": "AutoRound"}


@dataclass(frozen=True)
class Logical:
    """One tensor as the model sees it, and the stored tensors it is made of."""

    name: str
    shape: tuple[int, ...] | None  # None: known only from the tensors (pack-quantized)
    parts: dict[str, str]  # role -> stored tensor name; role "weight" is the main part
    decoder: str  # "plain", "scaled", "packed", "mxfp4"
    stored_bytes: int = 0  # bytes of every part on disk (what reading it costs host RAM)
    args: tuple = ()  # decoder arguments fixed by the header (block sizes, candidates)


@dataclass
class StoredWeight:
    """A quantized tensor as read from disk (its parts in host memory), to be dequantized on
    the device that will use it (skeleton.load_layer) -- never before."""

    logical: Logical
    fmt: "OriginalFormat"
    parts: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def dequantize(self, device, dtype: torch.dtype) -> torch.Tensor:
        return self.fmt.dequantize(self.logical, self.parts, torch.device(device), dtype)


@dataclass(frozen=True)
class OriginalFormat:
    """A quantized checkpoint format this module reads (see the module docstring)."""

    kind: str  # "fp8-block", "compressed-tensors", "mxfp4"
    label: str  # for people: what was found
    block: tuple[int, int] | None = None  # fp8-block: weight_block_size (None: per tensor)
    schemes: tuple[dict, ...] = ()  # compressed-tensors: the config groups' weight args
    ignore: tuple[str, ...] = field(default=(), compare=False)
    dtype: torch.dtype = torch.bfloat16  # the float dtype the checkpoint stands for

    # ---- the logical view of a header ---------------------------------------------------
    def logical(self, header: dict[str, tuple[list[int], str]]) -> dict[str, Logical]:
        """Every logical tensor, name -> Logical; refuses what the header proves wrong."""
        used: set[str] = set()
        out: dict[str, Logical] = {}
        for name, (shape, dtype) in header.items():
            found = self._quantized_at(name, shape, dtype, header)
            if found is not None:
                out[found.name] = found
                used.update(found.parts.values())
        for name, (shape, dtype) in header.items():
            if name in used:
                continue
            if name.endswith(ACTIVATION_SUFFIXES):
                continue
            self._refuse_stray(name, dtype, header)
            out[name] = Logical(name, tuple(shape), {"weight": name}, "plain",
                                _nbytes(shape, dtype))
        return out

    def _quantized_at(self, name, shape, dtype, header) -> Logical | None:
        if self.kind == "mxfp4":
            return _mxfp4_logical(name, shape, dtype, header) if name.endswith("_blocks") \
                else None
        if self.kind == "compressed-tensors" and name.endswith(".weight_packed"):
            return _packed_logical(name, shape, dtype, header, self.schemes)
        if name.endswith(".weight") and dtype in (*FP8_DTYPES, "I8"):
            if self.kind == "fp8-block":
                return _scaled_logical(name, shape, dtype, header, "weight_scale_inv",
                                       [_block_scheme(self.block)])
            return _scaled_logical(name, shape, dtype, header, "weight_scale",
                                   [s for s in self.schemes if s.get("type") in
                                    (("float",) if dtype in FP8_DTYPES else ("int",))])
        return None

    def _refuse_stray(self, name: str, dtype: str, header) -> None:
        """A scale, zero point or packed part whose weight is not quantized (or missing)."""
        suffixes = ("_scales",) if self.kind == "mxfp4" else (
            ".weight_scale_inv", ".weight_scale", ".weight_zero_point", ".weight_shape",
            ".weight_g_idx")
        for suffix in suffixes:
            if name.endswith(suffix):
                owner = name[:-len(suffix)]
                raise InputError(f"{name}: a scale tensor without its quantized weight "
                                 f"({_owner_state(owner, header)})")
        if dtype in FP8_DTYPES:
            raise InputError(f"{name}: an {dtype} tensor that is not a quantized weight "
                             f"of this {self.label} checkpoint")

    # ---- reading --------------------------------------------------------------------------
    def dequantize(self, lg: Logical, parts: dict[str, torch.Tensor], device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
        for role, t in parts.items():
            if role != "weight" and t.is_floating_point() and not torch.isfinite(
                    t.float()).all():
                raise InputError(f"{lg.parts[role]} contains NaN or inf")
        if lg.decoder == "scaled":
            return _dequantize_scaled(lg, parts, device, dtype)
        if lg.decoder == "packed":
            return _dequantize_packed(lg, parts, device, dtype)
        if lg.decoder == "mxfp4":
            return _dequantize_mxfp4(lg, parts, device, dtype)
        raise AssertionError(lg.decoder)

    def bytes_per_weight(self) -> float:
        """Stored bytes per weight of a quantized linear (the planner's host-RAM term)."""
        if self.kind == "mxfp4":
            return 0.5 + 1 / 32
        if self.kind == "fp8-block":
            return 1.0 + (4 / (self.block[0] * self.block[1]) if self.block else 0.0)
        bits = [int(s.get("num_bits") or 8) for s in self.schemes] or [8]
        gs = [int(s.get("group_size") or 0) for s in self.schemes]
        scale = max((2 / g for g in gs if g > 0), default=0.0)
        return max(bits) / 8 + scale


# ---------------------------------------------------------------------------- recognition


def original_format(config: dict, header: dict[str, tuple[list[int], str]]
                    ) -> OriginalFormat | None:
    """The quantized-original format of a checkpoint, or None for a float one. Raises
    InputError (one line) for a quantization this module does not read, or a header that
    contradicts its config."""
    qc = config.get("quantization_config") or config.get("compression_config")
    if not qc and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    if not qc:
        fp8 = sorted({d for _, d in header.values() if d in FP8_DTYPES})
        if fp8:
            raise InputError(f"the checkpoint holds {'/'.join(fp8)} tensors but config.json "
                             f"has no quantization_config saying how they are scaled")
        packed = next((n for n in header if n.endswith(_PACKED_SUFFIXES)), None)
        if packed:  # an AWQ / GPTQ / compressed-tensors export whose config lost it
            raise InputError(f"the model is already quantized (tensor {packed}) but config.json "
                             f"has no quantization_config; layerquant reads float checkpoints: "
                             f"give it the original model")
        return None
    if not isinstance(qc, dict):
        raise InputError(f"config.json: quantization_config must be an object, got {qc!r}")
    method = str(qc.get("quant_method", "")).lower()
    dtype = _config_dtype(config)
    if method == "fp8":
        return _fp8_format(qc, dtype)
    if method == "compressed-tensors":
        return _ct_format(qc, dtype)
    if method == "mxfp4":
        return OriginalFormat("mxfp4", "MXFP4 (gpt-oss layout: *_blocks + e8m0 *_scales)",
                              ignore=tuple(qc.get("modules_to_not_convert") or ()),
                              dtype=dtype)
    what = _NOT_READ.get(method, repr(method))
    raise InputError(f"the model is already quantized ({what}); layerquant reads float "
                     f"checkpoints and FP8 (fp8 block / compressed-tensors), compressed-tensors "
                     f"INT pack-quantized and MXFP4 originals")


def _config_dtype(config: dict) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    dt = getattr(torch, str(name), None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.bfloat16


def _fp8_format(qc: dict, dtype: torch.dtype) -> OriginalFormat:
    fmt = str(qc.get("fmt", "e4m3")).lower()
    if fmt not in ("e4m3", "e5m2"):
        raise InputError(f"quantization_config.fmt {fmt!r}: FP8 originals are e4m3 or e5m2")
    block = qc.get("weight_block_size")
    if block is not None:
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and b > 0 for b in block)):
            raise InputError(f"quantization_config.weight_block_size must be two positive "
                             f"integers, got {block!r}")
        block = (int(block[0]), int(block[1]))
    label = (f"FP8 {fmt}, {block[0]}x{block[1]} block scales" if block else
             f"FP8 {fmt}, per-tensor scales") + " (weight_scale_inv)"
    return OriginalFormat("fp8-block", label, block=block,
                          ignore=tuple(qc.get("modules_to_not_convert") or ()), dtype=dtype)


_CT_FORMATS = ("pack-quantized", "float-quantized", "naive-quantized", "int-quantized",
               "mixed-precision")


def _ct_format(qc: dict, dtype: torch.dtype) -> OriginalFormat:
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and str(sparsity.get("format", "dense")) != "dense":
        raise InputError(f"compressed-tensors sparsity format {sparsity.get('format')!r} is "
                         f"not read (dense only)")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise InputError("compressed-tensors quantization_config has no config_groups")
    schemes, formats = [], {str(qc.get("format") or "")}
    for gname, group in groups.items():
        w = (group or {}).get("weights")
        if not w:
            continue
        if group.get("format"):
            formats.add(str(group["format"]))
        if w.get("type") not in ("int", "float"):
            raise InputError(f"compressed-tensors group {gname}: weight type "
                             f"{w.get('type')!r} is not read (int or float)")
        if w.get("type") == "float" and int(w.get("num_bits") or 0) != 8:
            raise InputError(f"compressed-tensors group {gname}: {w.get('num_bits')}-bit "
                             f"float weights (NVFP4/MXFP4 packing) are not read; FP8 is")
        schemes.append(dict(w))
    bad = sorted(f for f in formats - {""} if f not in _CT_FORMATS)
    if bad:
        raise InputError(f"compressed-tensors format {bad[0]!r} is not read (one of "
                         f"{', '.join(_CT_FORMATS)})")
    if not schemes:
        raise InputError("compressed-tensors quantization_config quantizes no weights")
    kinds = sorted({f"{'FP' if s['type'] == 'float' else 'INT'}{s.get('num_bits')} "
                    f"{s.get('strategy', '')}".strip() for s in schemes})
    return OriginalFormat("compressed-tensors", "compressed-tensors " + ", ".join(kinds),
                          schemes=tuple(schemes), ignore=tuple(qc.get("ignore") or ()),
                          dtype=dtype)


# ------------------------------------------------------------------------ header checks


def _nbytes(shape, dtype: str) -> int:
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)
    return math.prod(shape) * size


def _owner_state(owner: str, header) -> str:
    for suffix in (".weight", ".weight_packed", "_blocks", ""):
        if owner + suffix in header:
            shape, dtype = header[owner + suffix]
            return f"{owner + suffix} is {dtype} {shape}"
    return f"no {owner}.weight in the checkpoint"


def _block_scheme(block: tuple[int, int] | None) -> dict:
    return ({"strategy": "block", "block_structure": list(block)} if block
            else {"strategy": "tensor"})


def _scale_grid(scheme: dict, out_f: int, in_f: int) -> tuple[int, int] | None:
    """(rows, cols) each scale covers for `scheme`, or None when it cannot apply."""
    strategy = scheme.get("strategy") or "tensor"
    if strategy == "tensor":
        return (out_f, in_f)
    if strategy == "channel":
        return (1, in_f)
    if strategy == "group":
        g = int(scheme.get("group_size") or 0)
        return (1, g) if g > 0 and in_f % g == 0 else None
    if strategy == "block":
        b = scheme.get("block_structure") or []
        return (int(b[0]), int(b[1])) if len(b) == 2 else None
    return None


def _expected_scale(grid, out_f: int, in_f: int) -> tuple[int, ...]:
    return (-(-out_f // grid[0]), -(-in_f // grid[1]))


def _scaled_logical(name, shape, dtype, header, scale_role: str, schemes) -> Logical:
    """An FP8 / INT8 weight with its scale (and an INT8 zero point): which scheme's grid the
    scale's shape fits decides how it is applied."""
    base = name[:-len(".weight")]
    scale_name = f"{base}.{scale_role}"
    if len(shape) != 2:
        raise InputError(f"{name}: {dtype} weight of shape {shape}; only 2-D linear weights "
                         f"are read in this format")
    if scale_name not in header:
        raise InputError(f"{name} is {dtype} but its scale {scale_name} is missing")
    s_shape, s_dtype = header[scale_name]
    if s_dtype not in SCALE_DTYPES:
        raise InputError(f"{scale_name}: scale dtype {s_dtype} (expected one of "
                         f"{', '.join(SCALE_DTYPES)})")
    out_f, in_f = shape
    got = tuple(s for s in s_shape)
    grid = None
    for scheme in schemes:
        g = _scale_grid(scheme, out_f, in_f)
        if g is None:
            continue
        want = _expected_scale(g, out_f, in_f)
        if got == want or (want == (1, 1) and math.prod(got) == 1):
            grid = g
            break
    if grid is None:
        wants = [_expected_scale(g, out_f, in_f) for s in schemes
                 for g in [_scale_grid(s, out_f, in_f)] if g is not None]
        raise InputError(f"{scale_name} has shape {list(s_shape)}; a {list(shape)} weight "
                         f"needs {' or '.join(str(list(w)) for w in wants) or 'a scale grid'}"
                         f" for this checkpoint's quantization_config")
    parts = {"weight": name, "scale": scale_name}
    zp = f"{base}.weight_zero_point"
    if zp in header:
        if dtype in FP8_DTYPES or (tuple(header[zp][0]) != got
                                   and math.prod(header[zp][0]) != math.prod(got)):
            raise InputError(f"{zp}: shape {header[zp][0]} does not match its scale "
                             f"{list(s_shape)}")
        parts["zero"] = zp
    nbytes = sum(_nbytes(*header[p]) for p in parts.values())
    return Logical(name, tuple(shape), parts, "scaled", nbytes, args=grid)


def _packed_logical(name, shape, dtype, header, schemes) -> Logical:
    base = name[:-len(".weight_packed")]
    if dtype != "I32" or len(shape) != 2:
        raise InputError(f"{name}: pack-quantized weights are 2-D int32, got {dtype} {shape}")
    parts = {"weight": name}
    for role, suffix in (("scale", "weight_scale"), ("shape", "weight_shape"),
                         ("zero", "weight_zero_point"), ("g_idx", "weight_g_idx")):
        key = f"{base}.{suffix}"
        if key in header:
            parts[role] = key
        elif role in ("scale", "shape"):
            raise InputError(f"{name} is pack-quantized but {key} is missing")
    s_shape, s_dtype = header[parts["scale"]]
    if s_dtype not in SCALE_DTYPES or len(s_shape) != 2 or s_shape[0] != shape[0]:
        raise InputError(f"{parts['scale']}: {s_dtype} {s_shape} does not fit a packed "
                         f"weight of {shape[0]} rows (expected (rows, groups) floats)")
    if tuple(header[parts["shape"]][0]) != (2,):
        raise InputError(f"{parts['shape']} must hold [out, in], got shape "
                         f"{header[parts['shape']][0]}")
    ints = [s for s in schemes if s.get("type") == "int"]
    if not ints:
        raise InputError(f"{name} is pack-quantized but no config group quantizes int weights")
    bits = sorted({int(s.get("num_bits") or 4) for s in ints})
    nbytes = sum(_nbytes(*header[p]) for p in parts.values())
    # The shape is weight_shape's value (the source reads it when asked): packing pads the
    # last word, so the header alone cannot say it.
    return Logical(name[:-len("_packed")], None, parts, "packed", nbytes, args=tuple(bits))


def _mxfp4_logical(name, shape, dtype, header) -> Logical:
    base = name[:-len("_blocks")]
    scales = base + "_scales"
    if scales not in header:
        raise InputError(f"{name} is MXFP4 but its scales {scales} are missing")
    s_shape, s_dtype = header[scales]
    if dtype != "U8" or s_dtype != "U8":
        raise InputError(f"{name}: MXFP4 blocks and scales are uint8, got {dtype} / {s_dtype}")
    if len(shape) != 4 or shape[-1] != 16:
        raise InputError(f"{name}: MXFP4 blocks must be (experts, rows, groups, 16), got "
                         f"{shape}")
    if list(s_shape) != list(shape[:-1]):
        raise InputError(f"{scales} has shape {list(s_shape)}; the blocks {list(shape)} need "
                         f"{list(shape[:-1])}")
    e, rows, groups, _ = shape
    parts = {"weight": name, "scale": scales}
    return Logical(base, (e, groups * 32, rows), parts, "mxfp4",
                   _nbytes(shape, dtype) + _nbytes(s_shape, s_dtype))


# --------------------------------------------------------------------------- dequantize


def _row_steps(rows: int, cols: int, multiple: int = 1):
    step = max(multiple, (SLICE_ELEMENTS // max(1, cols)) // multiple * multiple)
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def _finite(out: torch.Tensor, name: str) -> None:
    if not torch.isfinite(out).all():
        raise InputError(f"{name} dequantizes to NaN or inf")


def _dequantize_scaled(lg: Logical, parts, device, dtype) -> torch.Tensor:
    """W = (q - z) * s over each scale's (rows x cols) cell, a slice of rows at a time."""
    q = parts["weight"].to(device)
    scale = parts["scale"].to(device, torch.float32)
    zero = parts.get("zero")
    zero = zero.to(device, torch.float32) if zero is not None else None
    out_f, in_f = q.shape
    br, bc = lg.args
    if scale.numel() == 1:  # per tensor
        scale = scale.reshape(1, 1)
        zero = zero.reshape(1, 1) if zero is not None else None
        br, bc = out_f, in_f
    out = torch.empty((out_f, in_f), dtype=dtype, device=device)
    for r0, r1 in _row_steps(out_f, in_f, min(br, out_f)):
        s = _cells(scale, r0, r1, br, bc, in_f)
        w = q[r0:r1].to(torch.float32)
        if zero is not None:
            w.sub_(_cells(zero, r0, r1, br, bc, in_f))
        w.mul_(s)
        _finite(w, lg.name)
        out[r0:r1].copy_(w)
    return out


def _cells(grid: torch.Tensor, r0: int, r1: int, br: int, bc: int, cols: int) -> torch.Tensor:
    """Rows r0..r1 of a per-cell tensor expanded to one value per weight."""
    part = grid[r0 // br: -(-r1 // br)]
    part = part.repeat_interleave(br, dim=0)[r0 - (r0 // br) * br:][:r1 - r0]
    return part.repeat_interleave(bc, dim=1)[:, :cols] if bc > 1 else part[:, :cols]


def _dequantize_packed(lg: Logical, parts, device, dtype) -> torch.Tensor:
    packed = parts["weight"]
    out_f, in_f = shape = [int(v) for v in parts["shape"].reshape(-1).tolist()]
    bits = packed_bits(lg, shape, list(packed.shape))
    scale = parts["scale"]
    n_groups = scale.shape[1]
    g_idx = parts.get("g_idx")
    if g_idx is not None and bool((g_idx < 0).any()):
        g_idx = None  # compressed-tensors' "not initialised": columns in order
    if g_idx is not None:
        if g_idx.numel() != in_f or int(g_idx.max()) >= n_groups:
            raise InputError(f"{lg.parts['g_idx']}: {g_idx.numel()} entries up to "
                             f"{int(g_idx.max())} for {in_f} columns in {n_groups} groups")
        group_size = -(-in_f // n_groups)
    else:
        if in_f % n_groups:
            raise InputError(f"{lg.parts['scale']}: {n_groups} groups do not divide "
                             f"{in_f} columns")
        group_size = -1 if n_groups == 1 else in_f // n_groups
    zero = parts.get("zero")
    if zero is not None and tuple(zero.shape) != (-(-out_f * bits // 32), n_groups):
        raise InputError(f"{lg.parts['zero']}: shape {list(zero.shape)}, expected "
                         f"{[-(-out_f * bits // 32), n_groups]} for {bits}-bit zero points")
    q = ct_unpack_linear(packed.to(device), scale.to(device), (out_f, in_f), bits,
                         group_size, None if zero is None else zero.to(device),
                         None if g_idx is None else g_idx.to(device, torch.int32))
    out = q.dequantize_to(torch.empty((out_f, in_f), dtype=dtype, device=device),
                          SLICE_ELEMENTS)
    _finite(out, lg.name)
    return out


def packed_bits(lg: Logical, shape: list[int], packed_shape: list[int]) -> int:
    """The bit width at which `packed_shape` int32 words hold a weight of `shape` (the value
    of its weight_shape tensor); refuses a weight_shape the words cannot hold."""
    fits = [b for b in lg.args if len(shape) == 2 and shape[0] == packed_shape[0]
            and -(-shape[1] * b // 32) == packed_shape[1]]
    if not fits:
        raise InputError(f"{lg.parts['shape']} says {shape}, which {lg.parts['weight']} "
                         f"{packed_shape} does not hold at {'/'.join(map(str, lg.args))} bits")
    return fits[0]


# FP4 e2m1 code -> value (code 8 is -0.0): the OCP microscaling spec's table.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _dequantize_mxfp4(lg: Logical, parts, device, dtype) -> torch.Tensor:
    """(E, rows, G, 16) codes + (E, rows, G) exponents -> (E, G*32, rows), one expert's rows
    at a time: value = e2m1(code) * 2^(exponent - 127), low nibble first."""
    blocks, scales = parts["weight"], parts["scale"]
    e, rows, groups, _ = blocks.shape
    lut = torch.tensor(E2M1, dtype=torch.float32, device=device)
    assert lg.shape is not None  # MXFP4 logicals know their shape from the header
    out = torch.empty(lg.shape, dtype=dtype, device=device)
    for x in range(e):
        for r0, r1 in _row_steps(rows, groups * 32):
            b = blocks[x, r0:r1].to(device, torch.int64)
            vals = torch.stack((lut[b & 0x0F], lut[b >> 4]), dim=-1).reshape(
                r1 - r0, groups, 32)
            exp = scales[x, r0:r1].to(device, torch.int32) - 127
            vals = torch.ldexp(vals, exp.unsqueeze(-1)).reshape(r1 - r0, groups * 32)
            _finite(vals, lg.name)
            out[x, :, r0:r1].copy_(vals.t())
    return out


def describe(fmt: OriginalFormat, quantized: int) -> str:
    """One line for the run's notes: what was found and how it is read."""
    return (f"original weights: {fmt.label}; {quantized} quantized tensors are dequantized on "
            f"the device one layer at a time (no full-precision copy is written)")
