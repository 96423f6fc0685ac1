"""Issue 20's quality table in one run: our methods beside llm-compressor 0.14's on the same
checkpoint, the same calibration tokens and group size, every export evaluated by one
harness that uses none of our code (benchmarks/eval_independent.py), in fp16 and bf16, with
two calibration texts.

    python benchmarks/quality_matrix.py --out $OUT/quality_matrix.json \\
        [--peer-site /tmp/peer_site] [--wikitext wiki.test.raw] [--time-budget 480]
    python benchmarks/quality_matrix.py --quick --out /tmp/qm.json   # stories260K on the CPU

Per (calibration text, working dtype) one *batch*: our rows quantized in one process
(`ours` subcommand, the public API), each peer recipe in its own process with the peer's wheels
on PYTHONPATH (benchmarks/peer/peer_quality.py), then one eval_independent process over every
export of the batch (perplexity on the first W x L tokens of WikiText-2 test, KL to the float
model evaluated in fp16). Batches run concurrently (a SmolLM2 run leaves an H100 mostly idle),
in priority order; with --time-budget a task that would not finish in time is skipped and
listed, never killed half way. The JSON is rewritten as results arrive; the Markdown table
(beside it) gives per row ppl, KL, bpw and the row's perplexity gap to the float model as a
fraction of our RTN row's gap, and checks issue 20's targets.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "data" / "stories260K" / "hf"

# Our rows: name -> quantize() arguments (beyond model, calibration, group size, dtype).
OURS: dict[str, dict] = {
    "rtn": dict(method="rtn", bits=4),
    "rtn-imatrix": dict(method="rtn", bits=4, scale_search="imatrix"),
    "awq": dict(method="awq", bits=4),
    "gptq": dict(method="gptq", bits=4),  # the defaults, whatever they are
    "gptq-imatrix": dict(method="gptq", bits=4, scale_search="imatrix"),
    "gptq-minmax": dict(method="gptq", bits=4, scale_search="minmax"),  # before issue 20
    "gptq-sym-act-static": dict(method="gptq", bits=4, symmetric=True, act_order=True,
                                static_groups=True),
    # issue 20's old GPTQ defaults (before #26): asymmetric, no act-order
    "gptq-asym": dict(method="gptq", bits=4, symmetric=False, act_order=False,
                      static_groups=False, scale_search="minmax"),
    "awq-imatrix": dict(method="awq", bits=4, scale_search="imatrix"),
    "gptq-asym-act-static": dict(method="gptq", bits=4, symmetric=False, act_order=True,
                                 static_groups=True),
    "awq-gptq": dict(method="awq-gptq", bits=4),
    "awq-gptq-imatrix": dict(method="awq-gptq", bits=4, scale_search="imatrix"),
    "adaptive-4.31": dict(method="gptq", bits=4.31, adaptive=True),
    "adaptive-3.5": dict(method="gptq", bits=3.5, adaptive=True),
    "adaptive-3.0": dict(method="gptq", bits=3.0, adaptive=True),
}
# llm-compressor recipes (benchmarks/peer/peer_quality.py); "gptq" is its defaults
PEER = ("awq", "gptq", "gptq-imatrix", "rtn", "awq-gptq")
# Our row each peer row is held against (same method, bits, group size): ours <= theirs
SAME_METHOD = {"awq": "awq", "gptq": "gptq", "gptq-imatrix": "gptq", "rtn": "rtn",
               "awq-gptq": "awq-gptq"}

FULL = dict(model="smollm2", samples=128, seqlen=512, windows=40, group_size=64,
            calibs=("wikitext2-tail", "builtin"), dtypes=("float16", "bfloat16"),
            eval_dtype="float16")
QUICK = dict(model="stories260K", samples=4, seqlen=64, windows=4, group_size=4,
             calibs=("wikitext2-tail", "builtin"), dtypes=("float32",), eval_dtype="float32")
# SmolLM2 on a small shared CPU (no GPU time): fewer calibration and evaluation tokens, one
# calibration text, float32 quantization and evaluation
CPU = dict(model="smollm2", samples=32, seqlen=512, windows=20, group_size=64,
           calibs=("wikitext2-tail",), dtypes=("float32",), eval_dtype="float32")
SPECS = {"full": FULL, "quick": QUICK, "cpu": CPU}
# Seconds per task on one H100 for SmolLM2-135M, a first guess the run's own timings replace
# (the JSON keeps them): a batch of our rows, one peer recipe, one evaluation of a batch.
ESTIMATE = {"ours": 150.0, "peer": 60.0, "eval": 90.0}


@dataclass
class Task:
    name: str
    kind: str  # ours | peer | eval
    cmd: list[str]
    env: dict = field(default_factory=dict)
    after: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)


def model_dir(spec: dict) -> Path:
    if spec["model"] == "stories260K":
        return STORIES
    from quantizer.demo.smollm2 import smollm2_checkpoint
    return smollm2_checkpoint()


def wikitext_file(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from quantizer.calibration.sources import local_wikitext
    path = local_wikitext()
    if path is None:
        raise SystemExit("no WikiText-2 test file: pass --wikitext or set LAYERQUANT_WIKITEXT")
    return path


def save_tokens(base: Path, calib: str, spec: dict, path: Path) -> None:
    """The calibration windows our quantize() draws (the same function, arguments and
    seed), saved for the peer so both tools calibrate on identical tokens."""
    import torch
    from quantizer.stream.source import CheckpointSource
    from quantizer.stream.tokens import calibration_batch, tokenizer_or_bytes
    tok, _ = tokenizer_or_bytes(CheckpointSource(base))
    torch.save(calibration_batch(tok, calib, spec["samples"], spec["seqlen"], 0), path)


# ---------------------------------------------------------------- our rows (one process)
def run_ours(base: Path, work: Path, calib: str, dtype: str, rows: list[str], spec: dict,
             out_json: Path, deadline: float | None = None) -> int:
    """Quantize `rows` for one (calibration, dtype) batch, exports under `work`; adaptive rows
    share one measurement (it does not depend on the target). A row is skipped when the
    slowest row so far would not end before `deadline` (epoch seconds)."""
    from quantizer import quantize
    records = {}
    measurement = None
    slowest = 0.0
    for row in rows:
        if deadline is not None and time.time() + slowest > deadline:
            records[row] = {"row": row, "status": "skipped",
                            "reason": "would not finish in the time budget"}
            out_json.write_text(json.dumps(records, indent=1))
            continue
        opts = dict(OURS[row])
        method, bits = opts.pop("method"), opts.pop("bits")
        out = work / row
        adaptive = bool(opts.get("adaptive"))
        if adaptive and measurement is not None:
            opts["measurement"] = str(measurement)
        t0 = time.perf_counter()
        try:
            res = quantize(str(base), str(out), bits=bits, group_size=spec["group_size"],
                           method=method, calib_data=calib, calib_samples=spec["samples"],
                           calib_seqlen=spec["seqlen"], seed=0, dtype=dtype, progress=False,
                           overwrite=True, **opts)
            rec = {"status": "ok", "export_format": res.export_format,
                   "max_output_error": max((r.output_error or 0.0) for r in res.layers),
                   # per layer: ||y_q - y|| / ||y|| of the layer output on calibration tokens
                   "output_errors": [round(r.output_error or 0.0, 5) for r in res.layers]}
            if adaptive and measurement is None and (out / "measurement.json").is_file():
                measurement = work / "measurement.json"
                shutil.copy2(out / "measurement.json", measurement)
        except Exception as e:  # recorded; the other rows still run
            rec = {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
        rec.update(row=row, method=method, bits=bits, options=opts,
                   seconds=round(time.perf_counter() - t0, 1), dir=str(out))
        slowest = max(slowest, rec["seconds"])
        shutil.rmtree(Path(str(out) + ".job"), ignore_errors=True)
        records[row] = rec
        print(json.dumps(rec), flush=True)
        out_json.write_text(json.dumps(records, indent=1))
    return 0


# ---------------------------------------------------------------- the schedule
def tasks_for(base: Path, work: Path, wiki: Path, spec: dict, rows: list[str],
              peers: list[str], peer_site: str | None, spec_name: str,
              deadline: float | None = None) -> list[Task]:
    """In priority order: our batches (the first calibration text and dtype first), then the
    peer's recipes in the order given (each over every batch), then one evaluation per batch
    (it waits for its batch's tasks)."""
    py = sys.executable
    batches = [(calib, dtype) for calib in spec["calibs"] for dtype in spec["dtypes"]]
    ours, peer, evals = [], [], []
    deps: dict[str, list[str]] = {}
    for calib, dtype in batches:
        b = f"{calib}-{dtype}"
        bdir = work / b
        ours.append(Task(f"ours:{b}", "ours", [
            py, str(BENCH / "quality_matrix.py"), "ours", "--base", str(base),
            "--work", str(bdir / "ours"), "--calib", calib, "--dtype", dtype,
            "--rows", ",".join(rows), "--json", str(bdir / "ours.json")]
            + ["--spec", spec_name] + ["--samples", str(spec["samples"])]
            + (["--deadline", str(deadline)] if deadline is not None else [])))
        deps[b] = [ours[-1].name]
    for recipe in (peers if peer_site else []):
        for calib, dtype in batches:
            b = f"{calib}-{dtype}"
            env = {"PYTHONPATH": peer_site, "DTYPE": dtype, "TOKENIZERS_PARALLELISM": "false"}
            peer.append(Task(f"peer:{b}:{recipe}", "peer", [
                py, str(BENCH / "peer" / "peer_quality.py"), str(base), recipe,
                str(work / f"tokens-{calib}.pt"), str(work / b / "peer" / recipe),
                str(spec["group_size"])], env=env))
            deps[b].append(peer[-1].name)
    for calib, dtype in batches:
        b = f"{calib}-{dtype}"
        evals.append(Task(f"eval:{b}", "eval", [
            py, str(BENCH / "eval_independent.py"), "--base", str(base), "--wikitext",
            str(wiki), "--windows", str(spec["windows"]), "--seqlen", str(spec["seqlen"]),
            "--dtype", spec["eval_dtype"],
            "--out", str(work / b / "eval.json")], after=deps[b]))
    return ours + peer + evals


def exports_of(batch_dir: Path) -> list[str]:
    """NAME=DIR for every finished export of a batch (ours: rows with status ok; peer: dirs
    holding peer_run.json)."""
    specs = []
    ours = batch_dir / "ours.json"
    if ours.is_file():
        for row, rec in json.loads(ours.read_text()).items():
            if rec.get("status") == "ok":
                specs.append(f"ours:{row}={rec['dir']}")
    for d in sorted((batch_dir / "peer").glob("*")):
        if (d / "peer_run.json").is_file():
            specs.append(f"peer:{d.name}={d}")
    return specs


class Runner:
    """Runs tasks in list order, up to `jobs` at once; a task starts once the tasks it waits
    for have ended, and only if its estimate still fits the time budget."""

    def __init__(self, tasks: list[Task], jobs: int, budget: float | None, logs: Path,
                 on_done):
        self.tasks, self.jobs, self.budget, self.logs = tasks, jobs, budget, logs
        self.on_done = on_done
        self.t0 = time.monotonic()
        self.done: dict[str, Task] = {}
        self.lock = threading.Lock()

    def _estimate(self, kind: str) -> float:
        seen = [t.record["seconds"] for t in self.done.values()
                if t.kind == kind and t.record.get("status") == "ok"]
        return max(seen) if seen else ESTIMATE[kind]

    def _run(self, task: Task) -> None:
        for dep in task.after:
            while dep not in self.done:
                time.sleep(0.5)
        elapsed = time.monotonic() - self.t0
        # evaluations may use the whole budget; other tasks leave room for them
        limit = None if self.budget is None else (
            self.budget if task.kind == "eval" else self.budget - ESTIMATE["eval"])
        if limit is not None and elapsed + self._estimate(task.kind) > limit:
            task.record = {"status": "skipped", "reason": f"would not finish in the time "
                           f"budget ({elapsed:.0f} s used of {self.budget:.0f} s)"}
        else:
            if task.kind == "eval":
                task.cmd = task.cmd + exports_of(Path(task.cmd[task.cmd.index("--out") + 1])
                                                 .parent)
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", "4")  # several processes share the host
            for k, v in task.env.items():
                env[k] = v if k != "PYTHONPATH" else v + os.pathsep + env.get("PYTHONPATH", "")
            log = self.logs / (task.name.replace(":", "_") + ".log")
            t = time.monotonic()
            with open(log, "w") as f:
                rc = subprocess.run(task.cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    cwd=str(ROOT)).returncode
            tail = log.read_text(errors="replace")[-1500:]
            task.record = {"status": "ok" if rc == 0 else "failed", "rc": rc,
                           "seconds": round(time.monotonic() - t, 1),
                           "started_s": round(t - self.t0, 1)}
            if rc:
                task.record["tail"] = tail
        print(f"[{time.monotonic() - self.t0:6.0f}s] {task.name}: {task.record['status']}"
              f" {task.record.get('seconds', '')}", flush=True)
        with self.lock:
            self.done[task.name] = task
            self.on_done(task)

    def run(self) -> None:
        with ThreadPoolExecutor(self.jobs) as pool:
            # a waiting task holds a worker: submit in order, so dependencies start first
            list(pool.map(self._run, self.tasks))


# ---------------------------------------------------------------- the table
def collect(work: Path, spec: dict, tasks: dict | None = None) -> dict:
    """{batch: {"fp": {...}, "rows": {name: {...}}}} from the batches' JSON files; peer tasks
    that failed or were skipped (`tasks`: name -> record) are rows too."""
    out = {}
    for calib in spec["calibs"]:
        for dtype in spec["dtypes"]:
            b = f"{calib}-{dtype}"
            bdir = work / b
            ours = json.loads((bdir / "ours.json").read_text()) if (
                bdir / "ours.json").is_file() else {}
            ev = json.loads((bdir / "eval.json").read_text())["rows"] if (
                bdir / "eval.json").is_file() else {}
            rows = {}
            for row, rec in ours.items():
                rows[f"ours:{row}"] = {**rec, **ev.get(f"ours:{row}", {})}
            for d in sorted((bdir / "peer").glob("*")) if (bdir / "peer").is_dir() else []:
                run = d / "peer_run.json"
                rec = json.loads(run.read_text()) if run.is_file() else {
                    "status": "failed"}
                rec.setdefault("status", "ok")
                rows[f"peer:{d.name}"] = {**rec, **ev.get(f"peer:{d.name}", {})}
            for name, rec in (tasks or {}).items():
                kind, _, rest = name.partition(":")
                batch, _, recipe = rest.rpartition(":")
                if kind == "peer" and batch == b and f"peer:{recipe}" not in rows:
                    rows[f"peer:{recipe}"] = {"status": rec.get("status"), "reason": rec.get(
                        "reason") or _last_error(rec.get("tail", ""))}
            for name, r in rows.items():
                if r.get("dir") and Path(r["dir"]).is_dir() and r.get("ppl") is not None:
                    r["bpw"] = bpw(Path(r["dir"]))
            out[b] = {"calib": calib, "dtype": dtype, "fp": ev.get("fp"), "rows": rows}
    return out


def _last_error(tail: str) -> str:
    """The last line of a log tail that names an error (else its last line)."""
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or [""])[-1][:300]


def bpw(export: Path) -> float | None:
    """Bits per weight of the quantized linears: packed weights + scales + zero points + g_idx
    per weight (AWQ / GPTQ: weights from qweight's packing; compressed-tensors: weight_shape)."""
    from safetensors import safe_open
    sizes = {"I32": 32, "F16": 16, "BF16": 16, "F32": 32, "I64": 64, "I8": 8, "U8": 8}
    data_leaves = ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale",
                   "weight_zero_point", "weight_g_idx")
    cfg = json.loads((export / "config.json").read_text()).get("quantization_config", {})
    data = weights = 0
    for f in export.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                leaf = k.rpartition(".")[2]
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                if leaf in data_leaves:
                    data += n * sizes.get(sl.get_dtype(), 32)
                if leaf == "qweight":
                    weights += n * 32 // int(cfg.get("bits", 4))
                elif leaf == "weight_shape":
                    shape = st.get_tensor(k).tolist()
                    weights += int(shape[0]) * int(shape[1])
    return data / weights if weights else None


def gap_table(doc: dict) -> str:
    lines = ["# Issue 20: quality beside llm-compressor", "",
             f"`{doc['command']}` — {doc['date']}; {doc.get('gpu') or 'CPU'}; torch "
             f"{doc['torch']}, transformers {doc['transformers']}.", "",
             f"Model {doc['model']}; 4-bit, group {doc['spec']['group_size']}; calibration "
             f"{doc['spec']['samples']} x {doc['spec']['seqlen']} tokens (seed 0, the same "
             f"windows for both tools); evaluation: benchmarks/eval_independent.py, first "
             f"{doc['spec']['windows']} x {doc['spec']['seqlen']} tokens of WikiText-2 test, "
             f"KL to the float model. gap/RTN: (ppl - fp ppl) / (our RTN's ppl - fp ppl) in "
             f"the same batch.", ""]
    for b, batch in doc["batches"].items():
        fp = (batch.get("fp") or {}).get("ppl")
        rtn = batch["rows"].get("ours:rtn", {}).get("ppl")
        lines += [f"## calibration {batch['calib']}, working dtype {batch['dtype']}", "",
                  f"fp: ppl {fp:.3f}" if fp else "fp: not evaluated", "",
                  "| row | ppl | KL | bpw | gap / RTN | seconds | status |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in batch["rows"].items():
            ppl, kl = r.get("ppl"), r.get("kl")
            gap = ((ppl - fp) / (rtn - fp) if ppl and fp and rtn and rtn != fp else None)
            status = r.get("status", "?")
            if status != "ok":
                status += ": " + str(r.get("reason") or r.get("tail", ""))[-120:].replace(
                    "\n", " ").replace("|", "/")
            sec = r.get("seconds", r.get("quantize_s"))
            lines.append(f"| {name} | {_f(ppl)} | {_f(kl, 4)} | {_f(r.get('bpw'), 3)} | "
                         f"{_f(gap, 3)} | {_f(sec, 0)} | {status} |")
        lines.append("")
    checks = targets(doc)
    lines += ["## Targets (issue 20)", ""] + [
        f"- {c['claim']}: {'yes' if c['holds'] else 'NO' if c['holds'] is False else 'n/a'}"
        f" ({c['detail']})" for c in checks]
    return "\n".join(lines) + "\n"


def _f(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def targets(doc: dict) -> list[dict]:
    """Issue 20's targets, per batch where both sides exist."""
    out = []
    for b, batch in doc["batches"].items():
        rows = batch["rows"]
        fp = (batch.get("fp") or {}).get("ppl")
        rtn = rows.get("ours:rtn", {}).get("ppl")
        for peer, ours in SAME_METHOD.items():
            p, o = rows.get(f"peer:{peer}", {}), rows.get(f"ours:{ours}", {})
            if p.get("ppl") and o.get("ppl"):
                out.append({"claim": f"[{b}] ours {ours} <= llm-compressor {peer}",
                            "holds": o["ppl"] <= p["ppl"],
                            "detail": f"{o['ppl']:.3f} vs {p['ppl']:.3f}"})
            elif p:
                out.append({"claim": f"[{b}] ours {ours} <= llm-compressor {peer}",
                            "holds": None, "detail": f"peer {p.get('status')}"})
        for row in ("awq", "gptq", "awq-gptq"):
            o = rows.get(f"ours:{row}", {})
            if o.get("ppl") and fp and rtn:
                closed = 1 - (o["ppl"] - fp) / (rtn - fp)
                out.append({"claim": f"[{b}] ours {row} closes >= 50% of RTN's gap",
                            "holds": closed >= 0.5, "detail": f"{closed:.0%}"})
        a = rows.get("ours:adaptive-4.31", {})
        if a.get("ppl") and doc["spec"].get("model") == "smollm2":  # the number
            out.append({"claim": f"[{b}] adaptive 4.31 bpw <= 32.5 (SmolLM2 protocol)",
                        "holds": a["ppl"] <= 32.5, "detail": f"{a['ppl']:.3f}"})
    return out


def environment(argv) -> dict:
    import torch
    import transformers
    return {"command": " ".join(["python", "benchmarks/quality_matrix.py", *argv]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def save(doc: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(doc, indent=1)), (out.with_suffix(".md"),
                                                         gap_table(doc))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def _spec(name: str, samples: int | None = None) -> dict:
    spec = dict(SPECS[name])
    if samples:
        spec["samples"] = samples
    return spec


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "ours":
        p = argparse.ArgumentParser()
        for k in ("--base", "--work", "--calib", "--dtype", "--rows", "--json"):
            p.add_argument(k, required=True)
        p.add_argument("--spec", choices=tuple(SPECS), default="full")
        p.add_argument("--samples", type=int, default=None)
        p.add_argument("--deadline", type=float, default=None)
        a = p.parse_args(argv[1:])
        return run_ours(Path(a.base), Path(a.work), a.calib, a.dtype, a.rows.split(","),
                        _spec(a.spec, a.samples), Path(a.json), a.deadline)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/layerquant_qm"))
    p.add_argument("--wikitext", default=None)
    p.add_argument("--peer-site", default=None, help="folder with the peer's packages (pip "
                   "install --target); no peer rows without it")
    p.add_argument("--rows", default=",".join(OURS))
    p.add_argument("--peers", default=",".join(PEER))
    p.add_argument("--calibs", default=None, help="comma list (default: wikitext2-tail,builtin)")
    p.add_argument("--dtypes", default=None, help="comma list (default: float16,bfloat16)")
    p.add_argument("--jobs", type=int, default=6, help="tasks at once")
    p.add_argument("--time-budget", type=float, default=None, help="seconds")
    p.add_argument("--quick", action="store_true", help=f"stories260K, CPU, {QUICK}")
    p.add_argument("--cpu", action="store_true", help=f"SmolLM2 on the CPU, {CPU}")
    p.add_argument("--samples", type=int, default=None, help="calibration sequences")
    p.add_argument("--windows", type=int, default=None, help="evaluation windows")
    a = p.parse_args(argv)
    spec_name = "quick" if a.quick else "cpu" if a.cpu else "full"
    spec = _spec(spec_name, a.samples)
    if a.windows:
        spec["windows"] = a.windows
    if a.calibs:
        spec["calibs"] = tuple(a.calibs.split(","))
    if a.dtypes:
        spec["dtypes"] = tuple(a.dtypes.split(","))
    rows, peers = a.rows.split(","), [x for x in a.peers.split(",") if x]
    bad = [r for r in rows if r not in OURS] + [r for r in peers if r not in PEER]
    if bad:
        p.error(f"unknown rows {bad}; ours: {', '.join(OURS)}; peer: {', '.join(PEER)}")
    base, wiki = model_dir(spec), wikitext_file(a.wikitext)
    if a.work.exists():
        shutil.rmtree(a.work)
    logs = a.work / "logs"
    logs.mkdir(parents=True)
    for calib in spec["calibs"]:
        save_tokens(base, calib, spec, a.work / f"tokens-{calib}.pt")
    doc = {**environment(argv), "model": str(base), "spec": spec, "tasks": {}, "batches": {}}
    # our batches stop starting rows at the budget less one evaluation
    deadline = (time.time() + a.time_budget - ESTIMATE["eval"] if a.time_budget else None)
    tasks = tasks_for(base, a.work, wiki, spec, rows, peers, a.peer_site, spec_name, deadline)

    def on_done(task: Task) -> None:
        doc["tasks"][task.name] = task.record
        doc["batches"] = collect(a.work, spec, doc["tasks"])
        doc["targets"] = targets(doc)
        save(doc, a.out)

    Runner(tasks, a.jobs, a.time_budget, logs, on_done).run()
    print(gap_table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
