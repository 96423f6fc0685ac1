"""What a method sees of one decoder layer: the module on its device, the calibration inputs
entering it, and helpers to run it and watch its linears' inputs. Methods never touch files."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from quantizer.kernels.packing import QuantizedWeight

from ..arch import ArchSpec
from ..plan.terms import Decisions
from ..settings import QuantSettings
from ..stream.hidden_store import Singles, to_device_ahead
from ..stream.skeleton import layer_output


class _StopForward(Exception):
    pass


def run_module(module: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Call a captured submodule on `x` with its captured kwargs; first output if a tuple."""
    if "hidden_states" in kwargs:
        out = module(**{**kwargs, "hidden_states": x})
    else:
        out = module(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerContext:
    index: int
    layer: nn.Module  # transformers' decoder layer, float weights on `device`
    arch: ArchSpec
    model_config: object
    settings: QuantSettings
    inputs: list[torch.Tensor]  # hidden-state chunks (batch, seq, hidden) entering the layer
    layer_kwargs: dict  # position embeddings / mask / position ids for one chunk
    device: torch.device
    dtype: torch.dtype
    stats: dict = field(default_factory=dict)  # method-specific numbers for the report
    replaced: set = field(default_factory=set)  # linears whose weight set_quantized replaced
    # quantizer.parallel.shards.CalibLayout: the calibration shard of each of `inputs` and this
    # process's rank; None: one process, one shard.
    layout: object = None
    # The memory plan's decisions for this layer; a method carries out its own part of them
    # (GPTQ: where Hessians live, row slices of the solve). None: everything on `device`.
    decisions: Decisions | None = None
    # MoE: calibration tokens routed to each expert of this layer (summed over processes);
    # None for dense layers.
    expert_tokens: torch.Tensor | None = None
    last_mark: float = field(default_factory=time.perf_counter)  # when mark() last ran

    def mark(self, phase: str) -> None:
        """Record the layer's GPU peak so far (max allocated since the layer began) at the end
        of `phase`: the first phase that reaches the layer's peak is the one the memory plan
        must account for (the report keeps these beside the prediction). Also the seconds
        since the previous mark (the device's queued work included), which is where a budget's
        placements show up as time."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.stats.setdefault("peak_after", {})[phase] = torch.cuda.max_memory_allocated(
                self.device)
        now = time.perf_counter()
        times = self.stats.setdefault("phase_s", {})
        times[phase] = times.get(phase, 0.0) + now - self.last_mark
        self.last_mark = now

    def module(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    def full_name(self, name: str) -> str:
        return f"{self.arch.layer_prefix(self.index)}.{name}"

    def chunks(self) -> Iterator[torch.Tensor]:
        # host-resident chunks: the next one's copy overlaps this one's forward
        for (x,) in to_device_ahead(Singles(self.inputs), self.device, self.dtype):
            yield x

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_output(self.layer(x, **self.layer_kwargs))

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """The layer's output for every calibration chunk, on each chunk's storage device."""
        return [self.forward(x).to(src.device) for x, src in zip(self.chunks(), self.inputs)]

    @torch.no_grad()
    def capture(self, names: Sequence[str], with_kwargs: bool = False
                ) -> Iterator[dict[str, object]]:
        """For every calibration chunk, run the layer just far enough to see the inputs of the
        named submodules; yield {name: input tensor} (or {name: (input, kwargs)}).

        The forward stops as soon as the last named module has been reached, so capturing the
        inputs of q/k/v costs only the attention's input norm."""
        handles = []
        pending: set[str] = set()
        seen: dict[str, object] = {}

        def make_hook(name):
            def hook(mod, args, kwargs):
                x = args[0] if args else kwargs.get("hidden_states")
                seen[name] = (x, dict(kwargs)) if with_kwargs else x
                pending.discard(name)
                if not pending:
                    raise _StopForward
            return hook

        for name in names:
            handles.append(self.module(name).register_forward_pre_hook(make_hook(name),
                                                                       with_kwargs=True))
        try:
            for x in self.chunks():
                pending.clear()
                pending.update(names)
                seen.clear()
                try:
                    self.layer(x, **self.layer_kwargs)
                except _StopForward:
                    pass
                for name in pending:  # never called on this chunk: a MoE expert no token
                    empty = self._no_tokens(name, x)  # was routed to sees zero rows
                    seen[name] = (empty, {}) if with_kwargs else empty
                yield dict(seen)
        finally:
            for h in handles:
                h.remove()

    def _no_tokens(self, name: str, x: torch.Tensor) -> torch.Tensor:
        mod = self.module(name)
        width = getattr(mod, "in_features", None)
        if width is None:
            raise RuntimeError(f"layer {self.index}: {name} was not reached by the forward")
        return x.new_zeros((0, width))

    @torch.no_grad()
    def set_quantized(self, name: str, q: QuantizedWeight) -> None:
        """Replace a linear's float weight by its dequantized value (what the next modules and
        layers must see: errors propagate, as llm-compressor's propagate stage does)."""
        weight = self.module(name).weight
        assert isinstance(weight, torch.Tensor)
        weight.data = q.dequantize_to(torch.empty_like(weight.data))
        self.replaced.add(name)
