"""AWQ's memory terms for the planner (plan/memory.py builds a layer's phases from them): the
per-channel statistics while calibrating, the scale search (every chunk's judge input and
float reference cached, a candidate's output, the group's original weights, fake-quantizing
by row slices) and the final quantization by row slices. methods/awq.py and awq_scales.py
allocate what these count, and take their slice sizes from here."""
from __future__ import annotations

from types import SimpleNamespace

from ..plan.shapes import InputGroup
from ..plan.terms import Decisions, LayerTerms, Phase, PlanJob, Term, alive_copies

# AWQ quantizes by row slices of this many elements (methods/awq.py), so its float32
# temporaries are bounded whatever the width ...
QUANTIZE_SLICE_ELEMENTS = 1 << 24
# ... and writes each search candidate's fake-quantized weights by row slices of this many
# (methods/awq_scales.py).
CANDIDATE_SLICE_ELEMENTS = 1 << 22


def codes_on_device(dec: Decisions) -> bool:
    return True


def calibrate_phase(t: LayerTerms, g: InputGroup) -> Phase:
    stats = g.in_features * g.copies * 4
    return (f"calibrate {g.name}", t.resident(g, True) + t.held + t.activations + [
        Term("stats", "AWQ per-channel activation statistics (fp32)", stats)])


def work_phases(t: LayerTerms, g: InputGroup) -> list[Phase]:
    """The search caches every chunk's judge input and fp reference output (on the device
    when hidden states are there, else two chunks at a time)."""
    job, dec = t.job, t.dec
    N, S, H, d, c, n = job.samples, job.seqlen, job.shapes.hidden, job.d, dec.chunk, \
        g.in_features
    cached = Term("reference", f"AWQ judge inputs + fp references of {g.name}, "
                  f"{N}×{S}×({n}+{H})", N * S * (n + H) * d)
    if not (t.hidden_local or job.on_host):  # in host RAM; the next chunk copied ahead
        cached = Term("reference", f"AWQ judge input + reference, 2 chunks of {c}",
                      2 * c * S * (n + H) * d)
    return [(f"AWQ search {g.name}", t.resident(g, True) + t.held + t.activations + [
        cached,
        Term("awq_scratch", f"candidate output and fp32 loss terms, chunk {c}",
             c * S * H * (d + 8)),
        Term("awq_backup", f"original weights of {g.name}",
             g.weight_elements(alive_copies(g, dec)) * d),
        Term("weight_fp32", f"fp32 temporaries of fake-quantizing by row slices of "
             f"{CANDIDATE_SLICE_ELEMENTS} elements", CANDIDATE_SLICE_ELEMENTS * 12)])]


def final_phases(t: LayerTerms) -> list[Phase]:
    """AWQ quantizes every linear at the end, by row slices."""
    return [("quantize the layer", t.whole + t.held + t.codes + [Term(
        "weight_fp32", f"fp32 temporaries of quantizing by row slices of "
        f"{QUANTIZE_SLICE_ELEMENTS} elements", QUANTIZE_SLICE_ELEMENTS * 12)])]


def host_terms(job: PlanJob, groups: tuple[InputGroup, ...], dec: Decisions) -> list[Term]:
    """Host RAM of a GPU run: the judge inputs and references when hidden states wait off the
    GPU (widest group)."""
    if dec.hidden not in ("cpu", "disk"):
        return []
    n = max(g.in_features for g in groups)
    return [Term("reference", "AWQ judge inputs + fp references (widest group)",
                 job.samples * job.seqlen * (n + job.shapes.hidden) * job.d)]


# awq-gptq's AWQ part (methods/awq_gptq.py): the statistics and the scale search; GPTQ then
# rounds, so no final quantization by row slices.
SMOOTH = SimpleNamespace(codes_on_device=codes_on_device, calibrate_phase=calibrate_phase,
                         work_phases=work_phases, final_phases=lambda t: [],
                         host_terms=host_terms)
