"""GPU speed and memory benchmark: our AWQ/GPTQ beside llm-compressor, and the VRAM-budget table.

    python benchmarks/bench_speed.py --out results.json [--quick] [--only awq,gptq,peer,budget]
        [--layers 4] [--dtypes float16,bfloat16] [--peer-wheels .whl] [--time-budget 520]

Every sub-run (checkpoint build, each quantization, the peer) is its own process with a timeout;
a failure is recorded in the JSON and the next run goes on. The JSON is rewritten after every
sub-run, so a run cut off by the device's time limit still leaves everything measured so far.
The tables are printed last because the device reply shows only the end of the output.

This process never imports torch or llm-compressor: our runs use `python -m quantizer.cli`, the
peer runs benchmarks/peer/peer_llmcompressor.py with the peer wheels on its PYTHONPATH only.
`--only` names methods (awq, gptq) and parts (main, peer, budget), see benchmarks/README.md."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed_report import format_tables, summarize_ours, summarize_peer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PEER_DIR = REPO / "benchmarks" / "peer"
# Checkpoint slots -> synthetic presets (--tiny: the tiny preset of the same family).
MODELS = {"7b": "llama2-7b", "70b": "llama2-70b", "qwen3moe": "qwen3-30b-a3b",
          "mixtral": "mixtral-8x7b"}
TINY_MODELS = {"7b": "tiny-llama", "70b": "tiny-llama", "qwen3moe": "tiny-qwen3-moe",
               "mixtral": "tiny-mixtral"}
# Rough seconds for the time-budget guard: (start-up incl. model load, per layer). From the
# peer README's H100 numbers and the estimates; a run is skipped, not started, when less
# time than its estimate is left, so that the device limit never kills a run half way.
ESTIMATES = {("ours", "awq", "7b"): (20, 3.2), ("ours", "gptq", "7b"): (20, 1.2),
             ("ours", "awq", "70b"): (40, 25), ("ours", "gptq", "70b"): (40, 15),
             ("peer", "awq", "7b"): (25, 5), ("peer", "gptq", "7b"): (25, 2.1),
             ("peer", "awq", "70b"): (90, 15), ("peer", "gptq", "70b"): (90, 12.5),
             ("ours", "rtn", "7b"): (25, 1.5), ("ours", "rtn", "70b"): (40, 4),
             # MoE (H200, session 3: ours GPTQ 5-7 s/layer, AWQ 28 s + 58 s for layer 0; the
             # peer's MoE numbers are not known yet: generous)
             ("ours", "gptq", "qwen3moe"): (30, 10), ("ours", "awq", "qwen3moe"): (60, 35),
             ("peer", "gptq", "qwen3moe"): (60, 45), ("peer", "awq", "qwen3moe"): (60, 70),
             ("ours", "gptq", "mixtral"): (30, 9), ("ours", "awq", "mixtral"): (30, 12),
             ("peer", "gptq", "mixtral"): (60, 25), ("peer", "awq", "mixtral"): (60, 35)}
METHODS = ("awq", "gptq", "rtn")  # rtn: not compared, the floor of streaming + packing alone
# seconds per layer to write a checkpoint (weights drawn on the GPU), plus 15 s
BUILD_ESTIMATE = {"7b": 1.5, "70b": 8, "qwen3moe": 6, "mixtral": 8}
# The issue-21 suite (--suite issue21), in priority order: the main table at 8 layers, GPTQ at
# 32, the MoE width, then what takes longest. --rows picks some.
SUITE_ROWS = ("8L", "32L-gptq", "startup", "moe-gptq", "moe-awq", "32L-awq", "mixtral")
TAIL_CHARS = 2000


@dataclass
class RunSpec:
    id: str
    table: str  # "main" or "budget"
    who: str  # "ours" or "peer"
    method: str
    dtype: str
    model: str  # a MODELS slot: "7b", "70b", "qwen3moe", "mixtral"
    layers: int = 0
    budget: str | None = None  # --vram-budget value, None = unconstrained
    est_s: float = 60.0
    result: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- what to run
def selection(only: str | None) -> tuple[list[str], bool, bool, bool]:
    """(methods, main, budget, peer) from --only. Methods default to awq and gptq; naming one or
    `main` selects the main table; `budget` the budget table; `peer` adds llm-compressor beside
    whichever tables run. No --only: everything."""
    if not only:
        return ["awq", "gptq"], True, True, True
    tokens = {t.strip() for t in only.split(",") if t.strip()}
    unknown = tokens - {*METHODS, "main", "budget", "peer"}
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}; use {', '.join(METHODS)}, main, "
                         "budget, peer")
    methods = [m for m in METHODS if m in tokens] or ["awq", "gptq"]
    main = bool(tokens & {*METHODS, "main"}) or "budget" not in tokens
    return methods, main, "budget" in tokens, "peer" in tokens


def _estimate(a, who: str, method: str, model: str, layers: int) -> float:
    start, per_layer = (10, 5) if a.tiny else ESTIMATES[(who, method, model)]
    return start + per_layer * layers


def suite_runs(a) -> list[RunSpec]:
    """Issue 21's measurements (--suite issue21): ours and llm-compressor one after the other
    on the same checkpoints, bf16, 4-bit g128, 128 × 512 tokens, rows in SUITE_ROWS order."""
    dtype = a.dtypes[0]
    small, large = a.suite_layers
    peer = not a.tiny or "peer" in (a.only or "")
    runs: list[RunSpec] = []

    def pair(model: str, method: str, layers: int, row: str):
        for who in ("ours", "peer") if peer else ("ours",):
            runs.append(RunSpec(f"{row}-{who}-{method}-{model}-{layers}L", "issue21", who,
                                method, dtype, model, layers,
                                est_s=_estimate(a, who, method, model, layers)))

    for row in a.rows:
        if row == "8L":
            pair("7b", "gptq", small, row)
            pair("7b", "awq", small, row)
        elif row in ("32L-gptq", "32L-awq"):
            pair("7b", row.split("-")[1], large, row)
        elif row in ("moe-gptq", "moe-awq"):
            pair("qwen3moe", row.split("-")[1], a.moe_layers, row)
        elif row == "mixtral":
            pair("mixtral", "gptq", a.moe_layers, row)
            pair("mixtral", "awq", a.moe_layers, row)
        elif row == "startup":
            runs.append(RunSpec("startup-probe", "issue21", "probe", "-", dtype, "-", 0,
                                est_s=40))
    return runs


def plan_runs(a) -> list[RunSpec]:
    """The sub-runs in priority order: what the issues compare first, so that a time budget
    that runs out drops the least important runs."""
    if a.suite:
        return suite_runs(a)
    methods, main, budget, peer = selection(a.only)
    peer = peer and (not a.tiny or "peer" in (a.only or ""))  # tiny: only when asked by name
    peer_methods = [m for m in methods if m != "rtn"]  # llm-compressor's peers of ours
    dtypes = sorted(a.dtypes, key=lambda d: d != "bfloat16")  # peer numbers exist for bf16
    runs: list[RunSpec] = []

    def add(table, who, method, dtype, model, budget_value=None):
        tag = f"{table}-{who}-{method}-{dtype}-{model}" + (f"-{budget_value}" if budget_value else "")
        layers = a.model_layers[model]
        runs.append(RunSpec(tag, table, who, method, dtype, model, layers, budget_value,
                            est_s=_estimate(a, who, method, model, layers)))

    if main:
        for dtype in dtypes:
            for method in methods:
                add("main", "ours", method, dtype, "7b")
                if peer and method in peer_methods and (dtype == "bfloat16" or not a.quick) \
                        and (method, dtype) != ("awq", "float16"):
                    add("main", "peer", method, dtype, "7b")
        if peer and not a.quick and "float16" in dtypes and "awq" in methods:
            add("main", "peer", "awq", "float16", "7b")  # known to fail (NaN grid search): last
    if budget:
        dtype = dtypes[0]
        budgets = a.budgets[:1] if a.quick else a.budgets
        for model in (("70b",) if a.quick or a.tiny else ("70b", "7b")):
            for method in methods:
                if model == "70b" or not any(r.table == "main" and r.who == "ours" and
                                             r.method == method and r.dtype == dtype for r in runs):
                    add("budget", "ours", method, dtype, model)  # the unconstrained reference
                add("budget", "ours", method, dtype, model, budgets[0])
            if peer and model == "70b":
                for method in peer_methods:
                    add("budget", "peer", method, dtype, model)
            for value in budgets[1:]:
                for method in methods:
                    add("budget", "ours", method, dtype, model, value)
    return runs


# ---------------------------------------------------------------------------- subprocesses
def run_process(cmd, timeout: float, log_path: Path, env=None, cwd=None) -> dict:
    """Run `cmd` in its own process group; kill the group on timeout. stdout is returned whole,
    stderr goes to `log_path` and its tail into the result."""
    t0 = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env, cwd=cwd, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=max(timeout, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the group we started: the child and its workers
            out, _ = proc.communicate()
            timed_out = True
    stderr = log_path.read_text(errors="replace")
    return {"rc": proc.returncode, "timed_out": timed_out, "wall_s": time.perf_counter() - t0,
            "stdout": out or "", "stderr_tail": stderr[-TAIL_CHARS:]}


def base_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def parse_report(stdout: str) -> dict:
    """The JSON object printed by `quantize --json` (the first '{' that starts a line)."""
    for i, line in enumerate(stdout.splitlines(keepends=True)):
        if line.startswith("{"):
            start = sum(len(x) for x in stdout.splitlines(keepends=True)[:i])
            return json.JSONDecoder().raw_decode(stdout[start:])[0]
    raise ValueError("no JSON report on stdout")


def failure_reason(res: dict) -> str:
    if res["timed_out"]:
        return f"timeout after {res['wall_s']:.0f} s"
    lines = [l for l in res["stderr_tail"].splitlines() if l.strip()]
    return f"exit {res['rc']}: " + (lines[-1][:300] if lines else "no stderr")


def supports_vram_budget(env) -> bool:
    try:
        res = subprocess.run([sys.executable, "-m", "quantizer.cli", "--help"], env=env,
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--vram-budget" in res.stdout


# ---------------------------------------------------------------------------- the run
class Bench:
    """Builds what runs need on first use (checkpoints, calibration text, peer packages) and
    records every step in one JSON document, rewritten after each step."""

    def __init__(self, a):
        self.a = a
        self.scratch = Path(a.scratch)
        self.deadline = time.monotonic() + a.time_budget if a.time_budget else None
        self.env = base_env()
        self.doc = {"args": {k: v for k, v in vars(a).items() if k != "model_layers"},
                    "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "python": sys.version.split()[0], "git": _git_head(),
                    "gpu": _gpu_name(), "setup": {},
                    "runs": []}
        self.ready: dict[str, object] = {}  # step name -> path, or an error string
        # the peer's set-up (wheel install, import check) runs in a thread beside our own
        # set-up; its records wait here until join_background() puts them into the document
        self._background: threading.Thread | None = None
        self._background_records: list[tuple[str, dict]] = []

    def save(self) -> None:
        out = Path(self.a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        os.replace(tmp, out)

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def step(self, name: str, cmd, est: float, env=None, cwd=None, timeout: float = 900) -> dict:
        """One set-up subprocess, recorded under setup[name] (by join_background() when it
        ran in the background thread)."""
        if self.left() < est:
            res = {"status": "skipped", "reason": f"time budget: ~{est:.0f} s needed, "
                                                  f"{self.left():.0f} s left"}
        else:
            res = run_process(cmd, min(timeout, self.left()), self.scratch / "logs" / f"{name}.log",
                              env=env or self.env, cwd=cwd)
            res["status"] = "ok" if res["rc"] == 0 and not res["timed_out"] else "failed"
            if res["status"] != "ok":
                res["reason"] = failure_reason(res)
        if threading.current_thread() is self._background:
            self._background_records.append((name, res))
        else:
            self.doc["setup"][name] = res
            self.save()
        return res

    def start_background(self, runs: list[RunSpec]) -> None:
        """Start the peer's set-up (wheels installed, llm-compressor imported once) in a thread
        while the checkpoints are written: in a short device call its ~20 s would otherwise
        come on top. It only overlaps set-up steps: every timed run joins it first."""
        if any(r.who == "peer" for r in runs) and "peer" not in self.ready:
            self._background = threading.Thread(target=self.peer_env, name="peer-setup",
                                                daemon=True)
            self._background.start()

    def join_background(self) -> None:
        thread = self._background
        if thread is None:
            return
        t0 = time.perf_counter()
        thread.join()
        self._background = None
        for name, res in self._background_records:
            res["background"] = True
            self.doc["setup"][name] = res
        self._background_records.clear()
        self.doc["setup"]["background_wait_s"] = round(time.perf_counter() - t0, 2)
        self.save()

    def checkpoint(self, model: str, layers: int | None = None):
        layers = layers or self.a.model_layers[model]
        key = f"checkpoint-{model}" + ("" if layers == self.a.model_layers.get(model)
                                       else f"-{layers}L")
        if key in self.ready:
            return self.ready[key]
        preset = TINY_MODELS[model] if self.a.tiny else MODELS[model]
        path = self.scratch / f"ckpt-{preset}-{layers}L"
        # weights drawn on the GPU where there is one (a 32-layer 7B in seconds, not minutes)
        spec = {"preset": preset, "num_hidden_layers": layers, "dtype": "float16", "seed": 0,
                "draw": "cuda-if-available"}
        marker = path / "bench_spec.json"
        if marker.is_file() and json.loads(marker.read_text()) == spec:
            self.doc["setup"][key] = {"status": "ok", "reused": str(path)}
        else:
            shutil.rmtree(path, ignore_errors=True)
            code = ("import json, sys, torch; from quantizer.demo.synthetic import write_checkpoint; "
                    f"write_checkpoint({str(path)!r}, preset={preset!r}, num_hidden_layers={layers}, "
                    "dtype=torch.float16, seed=0, "
                    "device='cuda' if torch.cuda.is_available() else 'cpu'); "
                    f"open({str(marker)!r}, 'w').write(json.dumps({spec!r}))")
            res = self.step(key, [sys.executable, "-c", code],
                            est=10 if self.a.tiny else 15 + BUILD_ESTIMATE[model] * layers)
            if res["status"] != "ok":
                self.ready[key] = f"checkpoint build {res['status']}: {res.get('reason')}"
                return self.ready[key]
        self.doc["setup"][key]["path"] = str(path)
        self.ready[key] = path
        return path

    def calib_text(self):
        """One text file for both tools: the project's built-in calibration prose (stdlib
        docstrings), so no network is needed. --tiny uses a few module docstrings instead."""
        if "calib" in self.ready:
            return self.ready["calib"]
        path = self.scratch / ("calib-tiny.txt" if self.a.tiny else "calib.txt")
        if self.a.tiny:
            docs = [m.__doc__ for m in (argparse, json, subprocess, statistics, shutil) if m.__doc__]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n\n".join(docs))
        elif not path.is_file() or path.stat().st_size < 100_000:
            code = ("from quantizer.calibration.builtin_text import builtin_documents; "
                    f"open({str(path)!r}, 'w').write('\\n\\n'.join(builtin_documents('calibration')))")
            res = self.step("calib-text", [sys.executable, "-c", code], est=20, timeout=300)
            if res["status"] != "ok":
                self.ready["calib"] = f"calibration text {res['status']}: {res.get('reason')}"
                return self.ready["calib"]
        self.doc["setup"]["calib-text"] = {"status": "ok", "path": str(path),
                                           "bytes": path.stat().st_size}
        self.ready["calib"] = path
        return path

    def peer_env(self):
        """The environment for peer runs: wheels installed into a private --target directory
        that only the peer's PYTHONPATH sees; then one import check."""
        if "peer" in self.ready:
            return self.ready["peer"]
        env = dict(self.env)
        # Not the repository: its top-level `kernels` folder would shadow the PyPI package of
        # that name, which transformers probes for.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in env["PYTHONPATH"].split(os.pathsep) if p and Path(p).resolve() != REPO)
        if self.a.peer_wheels:
            wheels = sorted(str(p) for p in Path(self.a.peer_wheels).glob("*.whl"))
            site = self.scratch / "peer-site"
            if not wheels:
                self.ready["peer"] = f"no wheels in {self.a.peer_wheels}"
                return self.ready["peer"]
            if not (site / "llmcompressor").is_dir():
                res = self.step("peer-install", [sys.executable, "-m", "pip", "install", "-q",
                                                 "--no-index", "--no-deps", "--no-compile",
                                                 "--no-cache-dir", "--target", site, *wheels],
                                est=30, timeout=300)
                if res["status"] != "ok":
                    self.ready["peer"] = f"peer install {res['status']}: {res.get('reason')}"
                    return self.ready["peer"]
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env["PYTHONPATH"]) if p)
        res = self.step("peer-import", [sys.executable, "-c", "import datasets, llmcompressor; "
                                        "print(llmcompressor.__version__)"], est=20,
                        env=env, timeout=300)
        self.ready["peer"] = env if res["status"] == "ok" else \
            f"llm-compressor not importable ({res.get('reason')}); pass --peer-wheels DIR"
        return self.ready["peer"]

    def execute(self, spec: RunSpec, vram_flag: bool) -> None:
        if spec.budget and not vram_flag:
            spec.result = {"status": "skipped", "reason": "quantize has no --vram-budget option yet"}
            return
        if self.left() < spec.est_s:  # before building anything for it
            spec.result = {"status": "skipped", "reason": f"time budget: ~{spec.est_s:.0f} s "
                                                          f"needed, {self.left():.0f} s left"}
            return
        if spec.who == "probe":
            self.probe(spec)
            return
        needs = [self.checkpoint(spec.model, spec.layers), self.calib_text()]
        self.join_background()  # nothing else runs beside a timed run
        if spec.who == "peer":
            needs.append(self.peer_env())
        missing = [n for n in needs if isinstance(n, str)]
        if missing:
            spec.result = {"status": "skipped", "reason": missing[0]}
            return
        if self.left() < spec.est_s:
            spec.result = {"status": "skipped", "reason": f"time budget: ~{spec.est_s:.0f} s "
                                                          f"needed, {self.left():.0f} s left"}
            return
        ckpt, calib = needs[0], needs[1]
        work = self.scratch / "out" / spec.id
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        a = self.a
        if spec.who == "ours":
            cmd = [sys.executable, "-m", "quantizer.cli", ckpt, "-o", work / "model",
                   "--method", spec.method, "--bits", "4",
                   "--group-size", "auto" if a.tiny else "128",
                   "--calib-data", calib, "--calib-samples", a.calib_samples,
                   "--calib-seqlen", a.calib_seqlen, "--dtype", spec.dtype, "--device", a.device,
                   "--json", "--no-progress", "--overwrite"]
            if spec.budget:
                cmd += ["--vram-budget", spec.budget]
            env = self.env
        else:
            cmd = [sys.executable, PEER_DIR / "peer_llmcompressor.py", ckpt, spec.method, calib,
                   a.calib_samples, a.calib_seqlen, work / "peer.json"]
            env = dict(needs[2], DTYPE=spec.dtype, TOKENIZER_DIR=str(Path(a.tokenizer).resolve()),
                       HF_HOME=str(self.scratch / "hf-home"))
        print(f"[bench] {spec.id}: start ({self.left():.0f} s left)", flush=True)
        res = run_process(cmd, min(a.run_timeout, self.left()),
                          self.scratch / "logs" / f"{spec.id}.log", env=env, cwd=work)
        spec.result = {"cmd": " ".join(map(str, cmd)), "wall_s": res["wall_s"], "rc": res["rc"],
                       "stderr_tail": res["stderr_tail"]}
        try:
            if res["rc"] != 0 or res["timed_out"]:
                raise RuntimeError(failure_reason(res))
            if spec.who == "ours":
                budget = _parse_size(spec.budget) if spec.budget else None
                spec.result["summary"] = summarize_ours(parse_report(res["stdout"]), budget)
            else:
                spec.result["summary"] = summarize_peer(json.loads((work / "peer.json").read_text()))
            spec.result["status"] = "ok"
        except Exception as e:  # recorded, never fatal: the next run goes on
            spec.result.update(status="failed", reason=str(e)[:500])
        finally:
            shutil.rmtree(work, ignore_errors=True)  # quantized outputs: GBs the disk may need
        print(f"[bench] {spec.id}: {spec.result['status']} in {res['wall_s']:.1f} s "
              f"{spec.result.get('reason', '')}", flush=True)

    def probe(self, spec: RunSpec) -> None:
        """The fixed cost's parts measured alone (benchmarks/startup_probe.py)."""
        ckpt = self.checkpoint("7b", self.a.suite_layers[0] if self.a.suite else None)
        self.join_background()
        if isinstance(ckpt, str):
            spec.result = {"status": "skipped", "reason": ckpt}
            return
        print(f"[bench] {spec.id}: start ({self.left():.0f} s left)", flush=True)
        res = run_process([sys.executable, REPO / "benchmarks" / "startup_probe.py", ckpt,
                           "--device", self.a.device], min(120, self.left()),
                          self.scratch / "logs" / f"{spec.id}.log", env=self.env)
        spec.result = {"wall_s": res["wall_s"], "rc": res["rc"],
                       "stderr_tail": res["stderr_tail"]}
        try:
            if res["rc"] != 0 or res["timed_out"]:
                raise RuntimeError(failure_reason(res))
            spec.result["summary"] = parse_report(res["stdout"])
            spec.result["status"] = "ok"
        except Exception as e:  # recorded, never fatal
            spec.result.update(status="failed", reason=str(e)[:500])
        print(f"[bench] {spec.id}: {spec.result['status']} in {res['wall_s']:.1f} s", flush=True)

    def run(self, runs: list[RunSpec]) -> None:
        vram_flag = any(r.budget for r in runs) and supports_vram_budget(self.env)
        self.doc["setup"]["vram_budget_flag"] = vram_flag
        self.start_background(runs)
        for spec in runs:
            try:
                self.execute(spec, vram_flag)
            except Exception as e:  # a harness bug costs one run, not the rest
                spec.result = {"status": "failed", "reason": f"harness: {type(e).__name__}: {e}"}
            if spec.result.get("status") == "skipped":
                print(f"[bench] {spec.id}: skipped: {spec.result.get('reason')}", flush=True)
            self.doc["runs"] = [record(r) for r in runs if r.result]
            self.save()
        self.join_background()
        self.doc["tables"] = format_tables(self.doc["runs"])
        self.doc["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.save()


def record(spec: RunSpec) -> dict:
    d = asdict(spec)
    d.update(d.pop("result"))
    return d


def _parse_size(text: str) -> int:
    from quantizer.plan.sizes import parse_size  # the CLI's own parser: "8G" = 8 GiB
    return parse_size(text)


def _gpu_name() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", required=True, help="JSON results path (rewritten after every run)")
    p.add_argument("--quick", action="store_true", help="peer in bf16 only; budget table: "
                   "70B-width at the first budget only")
    p.add_argument("--only", default=None, help="comma list of awq, gptq, main, peer, budget")
    p.add_argument("--layers", type=int, default=None, help="7B-width layers (default 4)")
    p.add_argument("--layers-70b", type=int, default=None, help="70B-width layers (default 2)")
    p.add_argument("--dtypes", default=None, help="default float16,bfloat16")
    p.add_argument("--budgets", default="8G,16G,40G")
    p.add_argument("--peer-wheels", default=None, help="folder of wheels for llm-compressor")
    p.add_argument("--tokenizer", default=str(PEER_DIR / "tokenizer"),
                   help="tokenizer directory for the peer (its calibration is pre-tokenized)")
    p.add_argument("--scratch", default="/tmp/layerquant_bench",
                   help="checkpoints, calibration text, logs (reused between calls)")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds for everything; runs that no longer fit are skipped")
    p.add_argument("--run-timeout", type=float, default=600, help="seconds per sub-run")
    p.add_argument("--calib-samples", type=int, default=None)
    p.add_argument("--calib-seqlen", type=int, default=None)
    p.add_argument("--device", default=None, help="for our runs (default auto)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny-llama, 4x32 "
                   "calibration, float32, no peer")
    p.add_argument("--suite", choices=("issue21",), default=None,
                   help="issue 21's table: ours and llm-compressor per row of --rows")
    p.add_argument("--rows", default=",".join(SUITE_ROWS),
                   help=f"suite rows in order (default all: {','.join(SUITE_ROWS)})")
    p.add_argument("--suite-layers", default=None, help="7B-width layer counts of the suite "
                   "(default 8,32; --tiny 2,3)")
    p.add_argument("--moe-layers", type=int, default=None, help="MoE-width layers (default 2)")
    a = p.parse_args(argv)
    tiny = a.tiny
    a.layers = a.layers or (1 if tiny else 4)
    a.layers_70b = a.layers_70b or (1 if tiny else 2)
    a.moe_layers = a.moe_layers or (1 if tiny else 2)
    a.model_layers = {"7b": a.layers, "70b": a.layers_70b, "qwen3moe": a.moe_layers,
                      "mixtral": a.moe_layers}
    a.suite_layers = [int(x) for x in (a.suite_layers or ("2,3" if tiny else "8,32")).split(",")]
    if len(a.suite_layers) != 2:
        raise SystemExit("--suite-layers takes two counts, e.g. 8,32")
    a.rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in a.rows if r not in SUITE_ROWS]
    if bad:
        raise SystemExit(f"--rows: unknown {bad}; use {', '.join(SUITE_ROWS)}")
    default_dtypes = "float32" if tiny else ("bfloat16" if a.suite else "float16,bfloat16")
    a.dtypes = [d.strip() for d in (a.dtypes or default_dtypes).split(",") if d.strip()]
    a.budgets = [b.strip() for b in a.budgets.split(",") if b.strip()]
    a.calib_samples = a.calib_samples or (4 if tiny else 128)
    a.calib_seqlen = a.calib_seqlen or (32 if tiny else 512)
    a.device = a.device or ("cpu" if tiny else "auto")
    selection(a.only)  # fail early on unknown names
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    runs = plan_runs(a)
    print(f"[bench] {len(runs)} runs planned: " + ", ".join(r.id for r in runs), flush=True)
    bench = Bench(a)
    bench.run(runs)
    print(bench.doc["tables"])
    print(f"\n[bench] results: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
