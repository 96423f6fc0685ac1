"""The result of a run: a per-layer table for terminals and notebooks, and JSON."""
from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field

from .meter import fmt_bytes


@dataclass
class LayerRecord:
    index: int
    weight_error: float  # max over linears of ||W - Wq|| / ||W||
    output_error: float | None  # ||Y - Yq|| / ||Y|| of the layer on calibration inputs
    seconds: float
    load_s: float = 0.0
    quantize_s: float = 0.0
    write_s: float = 0.0
    peak_bytes: dict = field(default_factory=dict)  # measured: allocated/reserved/nvml, or rss
    stats: dict = field(default_factory=dict)
    predicted_peak: int | None = None  # the memory plan's peak for this layer's device
    decisions: dict = field(default_factory=dict)  # the plan's choices this layer ran with
    oom_retries: list = field(default_factory=list)  # "error -> what was shrunk", per retry

    def error_str(self) -> str:
        return f"{self.output_error:.4f}" if self.output_error is not None else \
            f"w {self.weight_error:.4f}"

    def peak_str(self) -> str:
        p = self.peak_bytes
        return fmt_bytes(p.get("reserved", p.get("rss")))

    def predicted_str(self) -> str:
        return fmt_bytes(self.predicted_peak) if self.predicted_peak is not None else "-"


@dataclass
class QuantResult:
    model: str
    output: str
    settings: dict
    group_size: int
    export_format: str
    notes: list
    layers: list
    seconds: float
    extra: dict = field(default_factory=dict)

    HEADERS = ("layer", "out err", "weight err", "time s", "load s", "quant s", "write s",
               "peak mem", "predicted", "retries")

    def rows(self):
        for r in self.layers:
            yield (str(r.index), "-" if r.output_error is None else f"{r.output_error:.5f}",
                   f"{r.weight_error:.5f}", f"{r.seconds:.2f}", f"{r.load_s:.2f}",
                   f"{r.quantize_s:.2f}", f"{r.write_s:.2f}", r.peak_str(), r.predicted_str(),
                   str(len(r.oom_retries)))

    def summary(self) -> str:
        s = self.settings
        return (f"{s['method']} {s['bits']}-bit g{self.group_size} -> {self.export_format} "
                f"in {self.output} ({self.seconds:.1f} s, {len(self.layers)} layers)")

    def expert_coverage(self) -> dict[int, dict]:
        """MoE layers: calibration tokens routed to each expert (float pass) and the experts
        that fell back to RTN for having fewer than the threshold."""
        out = {}
        for r in self.layers:
            tokens = {int(k.split(".")[1]): int(v) for k, v in r.stats.items()
                      if k.startswith("expert_tokens.")}
            if tokens:
                out[r.index] = {
                    "tokens": [tokens[e] for e in sorted(tokens)],
                    "fallback_rtn": sorted(int(k.split(".")[1]) for k in r.stats
                                           if k.startswith("expert_fallback.")),
                    "min_tokens": r.stats.get("expert_min_tokens")}
        return out

    def expert_lines(self) -> list[str]:
        lines = []
        for i, c in self.expert_coverage().items():
            t = sorted(c["tokens"])
            line = (f"layer {i} experts: tokens min {t[0]} median {t[len(t) // 2]} "
                    f"max {t[-1]}")
            if c["fallback_rtn"]:
                line += (f"; RTN fallback (< {c['min_tokens']} tokens): " + ", ".join(
                    f"{e} ({c['tokens'][e]})" for e in c["fallback_rtn"]))
            lines.append(line)
        return lines

    def __str__(self) -> str:
        rows = [self.HEADERS] + list(self.rows())
        widths = [max(len(r[c]) for r in rows) for c in range(len(self.HEADERS))]
        lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        experts = self.expert_lines()
        return "\n".join([self.summary(), *self.notes, "", *lines]
                         + (["", *experts] if experts else []))

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in self.HEADERS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>"
                       for r in self.rows())
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return (f"<p><b>{html.escape(self.summary())}</b></p><ul>{notes}</ul>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def to_dict(self) -> dict:
        d = asdict(self)
        coverage = self.expert_coverage()
        if coverage:
            d["expert_coverage"] = {str(k): v for k, v in coverage.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)
