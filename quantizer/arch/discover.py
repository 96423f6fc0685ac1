"""Structure discovery: a decoder layer's quantization structure read off transformers' own
layer by one forward on the meta device (real shapes, no memory, no arithmetic).

Hooks on every submodule record which tensor each module read and produced. A tensor is known
by its storage (a view or reshape of a tensor is the same tensor; a slice is not), so:
  - linears that read the very same tensor form one input group (one Hessian, one activation
    statistic), in the order the forward reached them;
  - the leaf module that produced that tensor (a norm, or a linear) is where AWQ folds the
    group's scales; other leaf readers of it (a MoE router) must take the fold too;
  - a group whose input no module produced (o_proj reads the attention's output, down_proj reads
    act(gate) * up) gets the last earlier linear of its block with the matching width as a
    candidate producer (v_proj, up_proj); whether folding across it is exact is for the
    runtime probe (quantizer/arch/folds.py) to say, on the real layer.
Fused experts (3-D parameters) are swapped for per-expert linears under their on-disk names
(transformers' own conversion rules say which) before the forward; while discovering, every
expert sees every token, so each expert linear is reached."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import Unsupported
from .experts import UnfusedExperts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearFound:
    name: str  # relative to the decoder layer (memory names; experts under on-disk leaves)
    in_features: int
    out_features: int
    bias: bool
    row: bool  # its output is its block's output (o_proj, down_proj): TP splits its input


@dataclass(frozen=True)
class InputFound:
    """One input tensor and the linears that read it."""

    linears: tuple[str, ...]
    producer: str | None  # the leaf module whose output this tensor is (norm or linear)
    producer_is_linear: bool = False
    candidate: str | None = None  # no producer module: a linear the fold may cross (probed)
    fold_only: tuple[str, ...] = ()  # other leaf readers that take the fold (routers, gates)
    blockers: tuple[str, ...] = ()  # leaf readers that cannot take a fold


@dataclass(frozen=True)
class SparseFound:
    """A mixture-of-experts block inside the layer."""

    block: str  # the block's path in the layer ("mlp", "feed_forward")
    experts: str  # the experts module's attribute in the block ("experts")
    num_experts: int
    width: int  # one expert's intermediate width
    leaves: tuple[str, str, str]  # per-expert (gate, up, down) linear names on disk
    router: str | None  # the router's path in the block ("gate")
    shared: str | None  # the shared expert MLP's path in the block
    shared_linears: tuple[str, ...] = ()  # its (gate, up, down) leaves
    shared_gate: str | None = None  # Linear(hidden, 1) scaling the shared expert


@dataclass(frozen=True)
class LayerFound:
    """What discovery found in one decoder layer."""

    linears: tuple[LinearFound, ...]  # execution order
    inputs: tuple[InputFound, ...]  # execution order of their first reader
    sparse: SparseFound | None
    norms: tuple[str, ...]  # leaf modules with a per-channel weight that produced an input
    kept: tuple[str, ...] = ()  # linears left in high precision (routers, gates)

    def linear(self, name: str) -> LinearFound:
        return next(lin for lin in self.linears if lin.name == name)


def _key(t: torch.Tensor) -> tuple:
    """A tensor's identity up to views: its storage, offset and size."""
    return (t.untyped_storage()._cdata, t.storage_offset(), t.numel())


def _first_tensor(obj):
    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        for o in obj.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _tensors(args, kwargs) -> list[torch.Tensor]:
    out = [a for a in args if torch.is_tensor(a) and a.is_floating_point()]
    out += [v for k, v in kwargs.items() if torch.is_tensor(v) and v.is_floating_point()
            and k not in ("attention_mask", "position_embeddings")]
    return out


class _Trace:
    """Per module call, in order: the tensors it read and the tensor it returned."""

    def __init__(self, layer: nn.Module):
        self.calls: list[tuple[str, str, list[tuple]]] = []  # (module, "in"/"out", keys)
        self.keep: list[torch.Tensor] = []  # alive, so storages are never reused
        self.handles = []
        for name, mod in layer.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(mod, args, kwargs):
            ts = _tensors(args, kwargs)
            self.keep += ts
            self.calls.append((name, "in", [_key(t) for t in ts]))
        return hook

    def _post(self, name):
        def hook(mod, args, out):
            t = _first_tensor(out)
            if t is not None:
                self.keep.append(t)
                self.calls.append((name, "out", [_key(t)]))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def common_parent(names) -> str:
    """The deepest module path containing every one of `names` (module names inside a layer):
    "self_attn" for q/k/v_proj, "" when they share nothing."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if all(p == level[0] for p in level):
            common.append(level[0])
        else:
            break
    return ".".join(common)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


@dataclass(frozen=True)
class _Reads:
    """Who read and who produced which tensor, from one trace of a layer."""

    order: list[str]  # linears, in the order of their first input
    first_in: dict[str, tuple]  # linear -> its first input tensor's key
    call_index: dict[str, int]  # linear -> its first call in the trace
    readers: dict[tuple, list[str]]  # tensor key -> the leaf modules that read it, in order
    produced: list[tuple[int, str, tuple]]  # (call, leaf module, its output's key)


def trace_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict,
                keep: tuple[str, ...] = ()) -> LayerFound:
    """Run `layer` once (meta tensors) and read its structure off the trace. Linears named in
    `keep` stay in high precision (they take their input's AWQ fold)."""
    linears = _linears(layer)
    trace = _run_traced(layer, hidden, kwargs)
    reads = _reads(trace, layer, linears)
    experts = {n: m for n, m in layer.named_modules() if isinstance(m, UnfusedExperts)}
    sparse = _sparse(layer, experts, linears, reads.readers, reads.first_in) if experts else None
    kept = _kept(sparse, linears, keep)
    outputs_of_blocks = _block_outputs(trace, layer)
    found_linears = tuple(LinearFound(n, linears[n].in_features, linears[n].out_features,
                                      linears[n].bias is not None,
                                      row=_is_row(n, trace, outputs_of_blocks))
                          for n in reads.order)
    inputs = _inputs(layer, linears, reads, kept)
    norms = tuple(g.producer for g in inputs if g.producer is not None
                  and not g.producer_is_linear)
    return LayerFound(found_linears, inputs, sparse, norms, tuple(sorted(kept)))


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The layer's nn.Linear modules by name; Unsupported when it has none."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        others = sorted({type(m).__name__ for m in layer.modules() if isinstance(
            w := getattr(m, "weight", None), torch.Tensor) and w.dim() == 2})
        raise Unsupported(f"{type(layer).__name__} has no nn.Linear to quantize (its "
                          f"projections are {', '.join(others) or 'not modules'})")
    return linears


def _run_traced(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> _Trace:
    """One forward of `layer` with every submodule's inputs and output recorded."""
    trace = _Trace(layer)
    try:
        with torch.no_grad(), _route_all(layer):
            layer(hidden, **kwargs)
    finally:
        trace.close()
    return trace


def _reads(trace: _Trace, layer: nn.Module, linears: dict) -> _Reads:
    """The trace as who read and produced what; Unsupported when a linear was never run."""
    leaves = {n for n, m in layer.named_modules() if not list(m.children())}
    reads = _Reads([], {}, {}, {}, [])
    for i, (name, kind, keys) in enumerate(trace.calls):
        if kind == "in":
            if name in linears:
                reads.call_index.setdefault(name, i)
                if name not in reads.first_in and keys:
                    reads.first_in[name] = keys[0]
                    reads.order.append(name)
            if name in leaves:
                for k in keys:
                    readers = reads.readers.setdefault(k, [])
                    if name not in readers:
                        readers.append(name)
        elif name in leaves:
            reads.produced.append((i, name, keys[0]))
    missing = [n for n in linears if n not in reads.first_in]
    if missing:
        raise Unsupported(f"the forward never reached linear(s) {missing[:3]} of "
                          f"{type(layer).__name__}")
    return reads


def _kept(sparse: SparseFound | None, linears: dict, keep: tuple[str, ...]) -> set[str]:
    """Linears left in high precision: a MoE block's router and shared-expert gate, those in
    `keep`, and any linear inside a norm (norms are never quantized, nor AXK2's low-rank norm
    adapters)."""
    return set(_kept_linears(sparse, linears)) | {n for n in linears if n in keep or any(
        "norm" in part for part in n.split(".")[:-1])}


def _inputs(layer: nn.Module, linears: dict, reads: _Reads, kept: set[str]
            ) -> tuple[InputFound, ...]:
    """The input groups (linears reading the very same tensor, kept ones left out) in the
    order of their first reader, each with where its AWQ fold goes."""
    groups: dict[tuple, list[str]] = {}
    for n in reads.order:
        if n not in kept:
            groups.setdefault(reads.first_in[n], []).append(n)
    return tuple(_input(layer, linears, reads, key, members) for key, members in groups.items())


def _input(layer: nn.Module, linears: dict, reads: _Reads, key: tuple, members: list[str]
           ) -> InputFound:
    """One input group: the leaf that produced its tensor before its first reader ran, or a
    candidate linear to fold across when none did; other readers take the fold or block it."""
    start = reads.call_index[members[0]]
    prod = [name for i, name, k in reads.produced if k == key and i < start]
    producer = prod[-1] if prod else None
    others = [r for r in reads.readers.get(key, []) if r not in members and r != producer]
    fold_only = tuple(r for r in others if _takes_column_fold(layer.get_submodule(r),
                                                             linears[members[0]]))
    blockers = tuple(r for r in others if r not in fold_only)
    candidate = (_candidate(members[0], reads.order, linears, reads.call_index)
                 if producer is None else None)
    return InputFound(tuple(members), producer, producer in linears, candidate, fold_only,
                      blockers)


def _candidate(first: str, order, linears, call_index) -> str | None:
    """The last linear of `first`'s block run before it (v_proj for o_proj, up_proj for
    down_proj): where AWQ may fold `first`'s scales if the widths allow (under GQA v_proj is
    narrower than o_proj's input: the group is then skipped and reported) and the probe
    finds the path between them linear per channel."""
    block = _parent(first)
    earlier = [n for n in order if call_index[n] < call_index[first] and _parent(n) == block]
    return earlier[-1] if earlier else None


def _takes_column_fold(mod: nn.Module, like: nn.Linear) -> bool:
    """A reader whose weight multiplies the input's channels (a router: (experts, hidden))."""
    w = getattr(mod, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 2
            and w.shape[-1] == like.in_features)


def _block_outputs(trace: _Trace, layer) -> dict[tuple, list[str]]:
    out: dict[tuple, list[str]] = {}
    for name, kind, keys in trace.calls:
        if kind == "out" and name and keys:
            out.setdefault(keys[0], []).append(name)
    return out


def _is_row(name: str, trace: _Trace, outputs: dict) -> bool:
    """True when a linear's output is also the output of a block containing it."""
    for n, kind, keys in trace.calls:
        if n == name and kind == "out":
            return any(b != name and name.startswith(b + ".") for b in outputs.get(keys[0], ()))
    return False


@contextlib.contextmanager
def _route_all(layer):
    """Every expert sees every token while discovering (no routing on meta tensors)."""
    mods = [m for m in layer.modules() if isinstance(m, UnfusedExperts)]
    for m in mods:
        m.route_all = True
    try:
        yield
    finally:
        for m in mods:
            m.route_all = False


def _sparse(layer, experts: dict, linears, readers, first_in) -> SparseFound:
    if len(experts) != 1:
        raise Unsupported(f"{len(experts)} expert containers in one layer")
    path, mod = next(iter(experts.items()))
    block, _, attr = path.rpartition(".")
    block_mod = layer.get_submodule(block)
    prefix = f"{block}." if block else ""
    expert0 = mod[0]
    # The block's input: what its experts read
    key = first_in[f"{path}.0.{expert0.names[0]}"]
    router = shared = shared_gate = None
    shared_linears: tuple[str, ...] = ()
    for r in readers.get(key, []):
        if not r.startswith(prefix) or r.startswith(f"{path}."):
            continue
        rel = r[len(prefix):]
        if r in linears and linears[r].out_features == 1:
            shared_gate = rel
        elif r not in linears or linears[r].out_features == len(mod):
            router = router or rel  # a router module, or a router's own linear
        elif "." in rel:
            owner = _parent(rel)
            if shared is None:
                shared = owner
    if shared is not None:
        shared_mod = block_mod.get_submodule(shared)
        names = [n for n, m in shared_mod.named_modules() if isinstance(m, nn.Linear)]
        shared_linears = tuple(names)
    return SparseFound(block, attr, len(mod), expert0.width, tuple(expert0.names), router,
                       shared, shared_linears, shared_gate)


def _kept_linears(sparse: SparseFound | None, linears) -> list[str]:
    """Linears never quantized: a MoE block's router and shared-expert gate (vLLM builds them
    unquantized)."""
    if sparse is None:
        return []
    prefix = f"{sparse.block}." if sparse.block else ""
    out = []
    for rel in (sparse.router, sparse.shared_gate):
        if rel and f"{prefix}{rel}" in linears:
            out.append(f"{prefix}{rel}")
    return out
