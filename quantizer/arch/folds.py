"""Exact AWQ folds for every producer kind, and the probe that proves a fold exact.

AWQ divides a producer's output channels by s and multiplies its readers' input columns by s.
That leaves the float layer's output unchanged only when
  - the producer can take the division: a linear (rows and bias / s), a norm whose output is
    w·n(x) (+ b) ("scale": w / s, b / s) or n(x)·(1 + w) (+ b), as Gemma's ("offset":
    (1 + w) / s - 1, b / s); a norm that mixes its weight otherwise cannot;
  - every reader of the producer's output takes the multiplication, and for a producer whose
    output is not its readers' input (v_proj -> o_proj through attention, up_proj -> down_proj
    through act(gate) * up) the path between them is linear per channel.
`norm_fold_kind` decides the first on a float32 copy of the norm module (discovery, meta
layers); `probe` decides the whole question on the real layer: the producer's output divided
by s and the readers' inputs multiplied by s (hooks, no weight touched), with s a power of two
per channel -- exact in floating point on a linear path -- and the layer's output compared."""
from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import torch
from torch import nn

from .meta import layer_output

log = logging.getLogger(__name__)

# Relative change of the layer output a probe still calls unchanged (power-of-two scales on a
# linear path change nothing; a nonlinear path changes the output by O(1)).
PROBE_TOLERANCE = 1e-3


def _pow2_scales(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.pow(2.0, torch.randint(-2, 3, (n,), generator=gen).float())


def _tensor(mod: nn.Module, name: str) -> torch.Tensor:
    """mod's parameter or buffer `name`."""
    t = getattr(mod, name)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{type(mod).__name__}.{name} is not a tensor")
    return t


def _call(mod: nn.Module, x: torch.Tensor, extra: list[torch.Tensor]):
    out = mod(x, *extra)
    return out[0] if isinstance(out, (tuple, list)) else out


def _extra_inputs(mod: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Random tensors for further required positional inputs (a gated norm's gate)."""
    params = [p for p in inspect.signature(mod.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
              and p.default is inspect.Parameter.empty][1:]
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(x.shape, generator=gen) for _ in params]


@torch.no_grad()
def norm_fold_kind(norm: nn.Module) -> str | None:
    """"scale", "offset" or None (cannot take a fold): tried on a float32 copy of `norm`
    (meta or real) with random weights, bias and inputs."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    mod = copy.deepcopy(norm)
    if any(t.is_meta for t in list(mod.parameters()) + list(mod.buffers())):
        mod = mod.to_empty(device="cpu")
        for name, buf in list(mod.named_buffers()):  # e.g. an eps kept as a buffer
            buf.fill_(1e-6)
    mod = mod.float()
    n = weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, n, generator=gen)
    try:
        extra = _extra_inputs(mod, x)
    except (TypeError, ValueError):
        extra = []
    w0 = 0.5 + torch.rand(n, generator=gen)
    bias = getattr(mod, "bias", None)
    b0 = torch.randn(n, generator=gen) * 0.1 if isinstance(bias, torch.Tensor) else None
    s = _pow2_scales(n, gen)

    def run(w, b):
        _tensor(mod, "weight").data.copy_(w)
        if b is not None:
            _tensor(mod, "bias").data.copy_(b)
        return _call(mod, x, extra).float()

    try:
        ref = run(w0, b0)
        b1 = None if b0 is None else b0 / s
        if torch.allclose(run(w0 / s, b1) * s, ref, rtol=1e-4, atol=1e-5):
            return "scale"
        if torch.allclose(run((1 + w0) / s - 1, b1) * s, ref, rtol=1e-4, atol=1e-5):
            return "offset"
    except Exception as e:  # noqa: BLE001 -- a module we cannot run alone
        log.debug("norm probe of %s failed: %s", type(norm).__name__, e)
    return None


def fold_into(prev: nn.Module, kind: str | None, s: torch.Tensor) -> None:
    """Divide `prev`'s output channels by `s` (float32 arithmetic, stored in its dtype)."""
    weight = _tensor(prev, "weight")
    w = weight.data
    sf = s.float().to(w.device)
    if w.dim() == 1:
        if kind == "offset":
            weight.data = ((1 + w.float()) / sf - 1).to(w.dtype)
        else:
            weight.data = (w.float() / sf).to(w.dtype)
    else:
        weight.data = (w.float() / sf.unsqueeze(1)).to(w.dtype)
    if getattr(prev, "bias", None) is not None:
        bias = _tensor(prev, "bias")
        bias.data = (bias.data.float() / sf).to(bias.dtype)


def folded_weight(prev: nn.Module, kind: str | None, s: torch.Tensor) -> list[torch.Tensor]:
    """What fold_into would store (float32 values), without storing it: for overflow checks."""
    w = _tensor(prev, "weight").data.float()
    sf = s.float().to(w.device)
    if w.dim() == 1:
        out = [(1 + w) / sf - 1 if kind == "offset" else w / sf]
    else:
        out = [w / sf.unsqueeze(1)]
    if getattr(prev, "bias", None) is not None:
        out.append(_tensor(prev, "bias").data.float() / sf)
    return out


def group_signature(group) -> tuple:
    """Groups of one shape in every layer of a kind (every expert's up -> down) share a
    probe result."""
    def strip(n):
        return ".".join("#" if p.isdigit() else p for p in n.split("."))
    return (strip(group.prev), tuple(strip(n) for n in group.linears),
            tuple(strip(n) for n in group.also_scale))


@torch.no_grad()
def probe(layer: nn.Module, group, x: torch.Tensor, kwargs: dict) -> str | None:
    """None when folding scales across `group` leaves `layer`'s output on `x` unchanged, else
    why not. Runs the layer twice with hooks; no weight is changed."""
    prev = layer.get_submodule(group.prev)
    readers = list(group.linears) + list(group.also_scale)
    width = _out_width(prev)
    if width is None:
        return f"{group.prev} has no per-channel output to divide"
    gen = torch.Generator().manual_seed(0)
    s = _pow2_scales(width, gen).to(x.device)
    ref = layer_output(layer(x, **kwargs)).float()
    hit: dict[str, Any] = {"prev": 0, "readers": set()}

    def divide(mod, args, out):
        hit["prev"] += 1
        if isinstance(out, (tuple, list)):
            return type(out)([out[0] / s.to(out[0].dtype)] + list(out[1:]))
        return out / s.to(out.dtype)

    def multiply(name):
        def hook(mod, args):
            hit["readers"].add(name)
            return (args[0] * s.to(args[0].dtype),) + tuple(args[1:])
        return hook

    handles = [prev.register_forward_hook(divide)]
    handles += [layer.get_submodule(n).register_forward_pre_hook(multiply(n)) for n in readers]
    try:
        out = layer_output(layer(x, **kwargs)).float()
    finally:
        for h in handles:
            h.remove()
    if not hit["prev"]:
        return f"the forward never reached {group.prev}"
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    if not torch.isfinite(out).all() or err > PROBE_TOLERANCE:
        return (f"not exact: scaling {group.prev}'s output channels changes the layer output "
                f"by {err:.2g} (relative) -- the path to {group.linears[0]} is not linear per "
                f"channel, or another module reads it")
    return None


def _out_width(mod: nn.Module) -> int | None:
    if isinstance(mod, nn.Linear):
        return mod.out_features
    w = getattr(mod, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 1 else None


def fold_problem(ctx, group) -> str | None:
    """Why folding `group`'s scales would change the float layer's output (None: it would
    not), probed once per group shape and layer class on the real layer (ctx: a
    quantizer.methods.context.LayerContext) with a seeded random input of the calibration
    shape; the result is shared by every later layer of the model."""
    key = (type(ctx.layer).__name__,) + group_signature(group)
    checks = ctx.arch.fold_checks
    if key not in checks:
        shape = (1,) + tuple(ctx.inputs[0].shape[1:]) if ctx.inputs else None
        if shape is None:
            return None  # nothing to fold without calibration data
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).to(ctx.device, ctx.dtype)
        checks[key] = probe(ctx.layer, group, x, ctx.layer_kwargs)
        if checks[key]:
            log.info("layer %d: scale group %s -> %s: %s", ctx.index, group.prev,
                     ",".join(group.linears), checks[key])
    return checks[key]
