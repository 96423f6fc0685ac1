"""VRAM-budget benchmark (issue 6): our AWQ and GPTQ under --vram-budget 8G/16G/40G and
unconstrained, on a 70B-width model cut to 2 layers and a 7B-width model of 4 layers, 128×512
calibration tokens, bf16; plus an injected OOM (LAYERQUANT_INJECT_OOM) whose output must hash
the same as the run without it, and optionally llm-compressor on the 70B-width model.

    bash benchmarks/gpu_run.sh is for bench_speed.py; this one runs as
    python benchmarks/bench_budget.py --out $OUT/budget.json [--peer --peer-wheels .whl]
        [--time-budget 520] [--only 70b,gptq,8G,inject] [--quick]

Per run: predicted peak (the plan's, and its allocator part = predicted − CUDA context),
measured max reserved / allocated over layers (and the last NVML sample), wall time, s/layer,
the decisions each layer ran with, OOM retries and the export's hash. Checks: reserved +
context ≤ budget; |predicted allocator part − reserved| / reserved ≤ 15 %; budgeted s/layer
over the unconstrained run's. Every run is its own process with a timeout; the JSON is
rewritten after each; runs whose estimate no longer fits --time-budget are skipped, not
started. --quick: CPU smoke mode (tiny-llama, 4×32 tokens, float32) to prove the harness."""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import (ESTIMATES, PEER_DIR, Bench, base_env, failure_reason,  # noqa: E402
                         parse_report, run_process)
from bench_speed_report import GIB, PRED_TOLERANCE, summarize_ours, summarize_peer  # noqa: E402

MODEL_LAYERS = {"70b": 2, "7b": 4}
# Slower than unconstrained when hidden states / Hessians leave the GPU: a margin on top.
BUDGET_FACTOR = 1.5


def plan_cases(a) -> list[dict]:
    """In priority order: the issue's target first (70B-width under 8G beside its unconstrained
    reference), the OOM injection, the peer, then the other budgets and the 7B width."""
    cases = []

    def add(model, method, budget=None, inject=None, who="ours"):
        start, per_layer = (5, 3) if a.quick else ESTIMATES[(who, method, model)]
        est = start + per_layer * a.layers[model] * (BUDGET_FACTOR if budget else 1)
        tag = "-".join(str(x) for x in (who, model, method, budget or "free",
                                        f"inject{inject}" if inject else None) if x)
        cases.append(dict(id=tag, who=who, model=model, method=method, budget=budget,
                          inject=inject, est_s=est, layers=a.layers[model]))

    first, rest = a.budgets[0], a.budgets[1:]
    for model in a.models:
        for method in a.methods:
            add(model, method, first)
            if a.free:
                add(model, method)
        if model == a.models[0] and a.inject:
            # Unconstrained, the first retry moves hidden states off the GPU (no number
            # changes); under the budget they are already off and the chunk halves, which on
            # a GPU may round differently (cuBLAS picks kernels by batch size): both reported.
            if a.free:
                add(model, a.methods[0], inject="1")
            add(model, a.methods[0], first, inject="1")
        if a.peer and model == "70b":
            for method in a.methods:
                add(model, method, who="peer")
        for budget in rest:
            for method in a.methods:
                add(model, method, budget)
    if a.peer_only:
        cases = [c for c in cases if c["who"] == "peer"]
    return cases


def export_hash(folder: Path) -> str | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def summarize_budget(report: dict, budget: int | None) -> dict:
    """summarize_ours plus the budget-specific numbers, per layer and over the run."""
    s = summarize_ours(report, budget)
    plan = (report.get("extra") or {}).get("plan") or {}
    context = plan.get("cuda_context") or 0
    layers = report["layers"]
    s["per_layer"] = [{"index": l["index"], "seconds": l["seconds"],
                       "predicted": l.get("predicted_peak"), "peak": l.get("peak_bytes"),
                       "decisions": l.get("decisions"), "oom_retries": l.get("oom_retries")}
                      for l in layers]
    s["oom_retries"] = sum(len(l.get("oom_retries") or []) for l in layers)
    s["decisions"] = plan.get("decisions")
    s["nvml_used_max"] = max((l.get("peak_bytes", {}).get("nvml_used") or 0 for l in layers),
                             default=None) or None
    # the process's own driver-side memory beyond the allocator (context, workspaces): the
    # peak the budget must cover is peak reserved plus this
    outside = [l.get("peak_bytes", {}).get("outside_allocator") for l in layers]
    outside = [o for o in outside if o is not None]
    if outside and s.get("peak_reserved"):
        s["outside_allocator"] = max(outside)
        s["peak_process"] = s["peak_reserved"] + max(outside)
    if s.get("predicted_peak") is not None and s.get("peak_reserved"):
        s["predicted_allocator"] = s["predicted_peak"] - context
        s["pred_rel_error"] = abs(s["predicted_allocator"] - s["peak_reserved"]) / \
            s["peak_reserved"]
        s["pred_within_15pct"] = s["pred_rel_error"] <= PRED_TOLERANCE
    if budget is not None and s.get("peak_reserved") is not None:
        s["within_budget"] = s["peak_reserved"] + context <= budget
    return s


class BudgetBench(Bench):
    def execute_case(self, c: dict) -> None:
        a = self.a
        if self.left() < c["est_s"]:
            c.update(status="skipped", reason=f"time budget: ~{c['est_s']:.0f} s needed, "
                                              f"{self.left():.0f} s left")
            return
        needs = [self.checkpoint(c["model"]), self.calib_text()]
        if c["who"] == "peer":
            needs.append(self.peer_env())
        missing = [n for n in needs if isinstance(n, str)]
        if missing:
            c.update(status="skipped", reason=missing[0])
            return
        if self.left() < c["est_s"]:
            c.update(status="skipped", reason=f"time budget: ~{c['est_s']:.0f} s needed, "
                                              f"{self.left():.0f} s left")
            return
        ckpt, calib = needs[0], needs[1]
        work = self.scratch / "out" / c["id"]
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        env = dict(self.env)
        if c["who"] == "ours":
            cmd = [sys.executable, "-m", "quantizer.cli", ckpt, "-o", work / "model",
                   "--method", c["method"], "--bits", "4", "--group-size", "128",
                   "--calib-data", calib, "--calib-samples", a.calib_samples,
                   "--calib-seqlen", a.calib_seqlen, "--dtype", a.dtype, "--device", a.device,
                   "--json", "--no-progress", "--overwrite"]
            if c["budget"]:
                cmd += ["--vram-budget", c["budget"]]
            if c["inject"]:
                env["LAYERQUANT_INJECT_OOM"] = c["inject"]
        else:
            cmd = [sys.executable, PEER_DIR / "peer_llmcompressor.py", ckpt, c["method"], calib,
                   a.calib_samples, a.calib_seqlen, work / "peer.json"]
            env = dict(needs[2], DTYPE=a.dtype, TOKENIZER_DIR=str(Path(a.tokenizer).resolve()),
                       HF_HOME=str(self.scratch / "hf-home"))
        print(f"[budget] {c['id']}: start ({self.left():.0f} s left)", flush=True)
        res = run_process(cmd, min(a.run_timeout, self.left()),
                          self.scratch / "logs" / f"budget-{c['id']}.log", env=env, cwd=work)
        c.update(cmd=" ".join(map(str, cmd)), wall_s=res["wall_s"], rc=res["rc"],
                 stderr_tail=res["stderr_tail"])
        try:
            if res["rc"] != 0 or res["timed_out"]:
                raise RuntimeError(failure_reason(res))
            if c["who"] == "ours":
                from quantizer.plan.sizes import parse_size
                budget = parse_size(c["budget"]) if c["budget"] else None
                c["summary"] = summarize_budget(parse_report(res["stdout"]), budget)
                c["export_sha256"] = export_hash(work / "model")
            else:
                c["summary"] = summarize_peer(json.loads((work / "peer.json").read_text()))
            c["status"] = "ok"
        except Exception as e:  # recorded, never fatal
            c.update(status="failed", reason=str(e)[:500])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"[budget] {c['id']}: {c['status']} in {res['wall_s']:.1f} s "
              f"{c.get('reason', '')}", flush=True)

    def run_cases(self, cases: list[dict]) -> None:
        self.doc["cases"] = cases
        for c in cases:
            try:
                self.execute_case(c)
            except Exception as e:  # a harness bug costs one case, not the rest
                c.update(status="failed", reason=f"harness: {type(e).__name__}: {e}")
            check_injection(cases)
            self.doc["tables"] = format_budget_tables(cases)
            self.save()
        self.doc["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.save()


def check_injection(cases: list[dict]) -> None:
    """An injected run's export must hash the same as the run without the injection."""
    for c in cases:
        if not c.get("inject") or c.get("status") != "ok":
            continue
        ref = next((r for r in cases if r.get("status") == "ok" and not r.get("inject") and
                    r["who"] == "ours" and (r["model"], r["method"], r["budget"]) ==
                    (c["model"], c["method"], c["budget"])), None)
        c["identical_to"] = ref["id"] if ref else None
        c["identical"] = (ref["export_sha256"] == c["export_sha256"]) if ref else None


def _g(v) -> str:
    return f"{v / GIB:.2f}" if isinstance(v, (int, float)) else "-"


def _yes(v) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def format_budget_tables(cases: list[dict]) -> str:
    rows = ["| run | pred GiB | pred alloc GiB | resv GiB | alloc GiB | s/layer | x free | "
            "<= budget | pred 15% | retries | decisions L0 | status |",
            "|" + "---|" * 12]
    for c in cases:
        s = c.get("summary") or {}
        ref = next((r for r in cases if r["who"] == c["who"] and r["model"] == c["model"] and
                    r["method"] == c["method"] and not r["budget"] and not r.get("inject") and
                    r.get("status") == "ok"), None)
        x = "-"
        if ref and c.get("status") == "ok" and s.get("s_per_layer_median"):
            base = ref["summary"].get("s_per_layer_median") or ref["summary"].get(
                "e2e_s_per_layer")
            mine = s.get("s_per_layer_median") or s.get("e2e_s_per_layer")
            x = f"{mine / base:.2f}" if base and mine else "-"
        dec = ((s.get("per_layer") or [{}])[0].get("decisions") or {})
        dec_s = ",".join(f"{k}={v}" for k, v in dec.items()) or "-"
        spl = s.get("s_per_layer_median") or s.get("e2e_s_per_layer")
        cells = [c["id"], _g(s.get("predicted_peak")), _g(s.get("predicted_allocator")),
                 _g(s.get("peak_reserved")), _g(s.get("peak_allocated")),
                 f"{spl:.2f}" if spl else "-", x, _yes(s.get("within_budget")),
                 _yes(s.get("pred_within_15pct")), str(s.get("oom_retries", "-")), dec_s,
                 c.get("status", "-")]
        rows.append("| " + " | ".join(cells) + " |")
    for c in cases:
        if c.get("inject") and c.get("status") == "ok":
            rows.append(f"\ninjected OOM at layer {c['inject']} ({c['id']}): retries "
                        f"{(c.get('summary') or {}).get('oom_retries')}, export identical to "
                        f"{c.get('identical_to')}: {_yes(c.get('identical'))}")
    bad = [c for c in cases if c.get("status") not in ("ok", None)]
    for c in bad:
        rows.append(f"{c['id']}: {c['status']}: {(c.get('reason') or '')[:200]}")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", required=True, help="JSON results (rewritten after every run)")
    p.add_argument("--quick", action="store_true", help="CPU smoke mode: tiny-llama, 4×32 "
                   "calibration tokens, float32")
    p.add_argument("--only", default=None, help="comma list narrowing models (70b, 7b), "
                   "methods (awq, gptq), budgets (8G, ...); 'noinject' drops the injected-OOM "
                   "runs, 'nofree' the unconstrained references, 'peer' = --peer")
    p.add_argument("--budgets", default="8G,16G,40G")
    p.add_argument("--peer", action="store_true", help="llm-compressor on the 70B-width model")
    p.add_argument("--peer-wheels", default=None, help="folder of wheels for llm-compressor")
    p.add_argument("--tokenizer", default=str(PEER_DIR / "tokenizer"))
    p.add_argument("--scratch", default="/tmp/layerquant_bench")
    p.add_argument("--time-budget", type=float, default=520,
                   help="seconds for everything; runs that no longer fit are skipped")
    p.add_argument("--run-timeout", type=float, default=420, help="seconds per run")
    p.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --quick)")
    p.add_argument("--layers", dest="model_layers_arg", default=None,
                   help="decoder layers per model, e.g. 70b=3 (default 70b=2,7b=4): more "
                   "layers after layer 0 measure the steady state better")
    a = p.parse_args(argv)
    only = {t.strip() for t in (a.only or "").split(",") if t.strip()}
    a.budgets = [b.strip() for b in a.budgets.split(",") if b.strip()]
    a.models = [m for m in ("70b", "7b") if not only & {"70b", "7b"} or m in only]
    a.methods = [m for m in ("gptq", "awq") if not only & {"gptq", "awq"} or m in only]
    a.budgets = [b for b in a.budgets if not only & set(a.budgets) or b in only]
    a.inject = "noinject" not in only
    a.free = "nofree" not in only
    a.peer = a.peer or "peer" in only or "peeronly" in only
    a.peer_only = "peeronly" in only
    a.tiny = a.quick  # Bench's checkpoint/calibration switch
    a.layers = {m: (1 if a.quick else n) for m, n in MODEL_LAYERS.items()}
    for item in filter(None, (a.model_layers_arg or "").split(",")):
        model, _, n = item.partition("=")
        a.layers[model.strip()] = int(n)
    a.model_layers = a.layers
    a.calib_samples, a.calib_seqlen = (4, 32) if a.quick else (128, 512)
    a.dtype = a.dtype or ("float32" if a.quick else "bfloat16")
    a.device = "cpu" if a.quick else "auto"
    if a.quick:  # CPU: one model; the injected OOM needs two layers
        a.models = a.models[:1]
        a.layers = {m: 2 for m in a.layers}
        a.model_layers = a.layers
        a.peer = False
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    cases = plan_cases(a)
    print(f"[budget] {len(cases)} runs planned: " + ", ".join(c["id"] for c in cases),
          flush=True)
    bench = BudgetBench(a)
    bench.env = base_env()
    bench.run_cases(cases)
    print(bench.doc["tables"])
    print(f"\n[budget] results: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
