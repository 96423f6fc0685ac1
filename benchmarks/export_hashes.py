"""Hashes of the exports of a fixed set of quantization runs: run it with one checkout's
quantizer, then another's, and compare the two JSON files (issue 19: discovery replacing the
hand-written specs must leave exports byte-identical).

    PYTHONPATH=/work/main python benchmarks/export_hashes.py --work /tmp/eh --out main.json
    PYTHONPATH=$PWD     python benchmarks/export_hashes.py --work /tmp/eh --out branch.json
    python benchmarks/export_hashes.py --compare main.json branch.json

The source checkpoints are written once into --work (synthetic ones by quantizer.demo.synthetic,
stories260K copied from ../shared) and reused, so both runs quantize the very same files.
Hashed: every .safetensors file and config.json of the export (layerquant.json holds the
source path and the notes, which are printed apart)."""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "data" / "stories260K" / "hf"
CALIB = ROOT / "tests" / "data" / "calibration.txt"

# (name, source, method, format, extra options)
RUNS = [
    ("stories-rtn-awq", "stories260K", "rtn", "awq", {}),
    ("stories-awq", "stories260K", "awq", "awq", {}),
    ("stories-gptq", "stories260K", "gptq", "gptq", {}),
    ("stories-gptq-actorder-ct", "stories260K", "gptq", "compressed-tensors",
     {"act_order": True, "static_groups": True}),
    ("llama-awq", "tiny-llama", "awq", "awq", {}),
    ("llama-mha-awq", "tiny-llama-mha", "awq", "awq", {}),
    ("llama-gptq", "tiny-llama", "gptq", "gptq", {}),
    ("qwen2-awq", "tiny-qwen2", "awq", "awq", {}),
    ("qwen3-gptq-ct", "tiny-qwen3", "gptq", "compressed-tensors", {}),
    ("mixtral-awq", "tiny-mixtral", "awq", "awq", {}),
    ("mixtral-gptq", "tiny-mixtral", "gptq", "gptq", {}),
    ("qwen2-moe-awq", "tiny-qwen2-moe", "awq", "awq", {}),
    ("qwen3-moe-gptq", "tiny-qwen3-moe", "gptq", "gptq", {}),
    ("deepseek-awq", "tiny-deepseek", "awq", "awq", {}),
    ("deepseek-gptq", "tiny-deepseek", "gptq", "gptq", {}),
    # the other method x format pairs, exports cut into several shards (issue 21: the shards
    # are written in place layer by layer), a vision-language model (vision tower kept in
    # the checkpoint's bfloat16, text tensors in float16)
    ("stories-rtn-ct", "stories260K", "rtn", "compressed-tensors", {}),
    ("stories-rtn-gptq", "stories260K", "rtn", "gptq", {}),
    ("stories-awq-ct", "stories260K", "awq", "compressed-tensors", {}),
    ("stories-gptq-ct", "stories260K", "gptq", "compressed-tensors", {}),
    ("stories-awq-shards", "stories260K", "awq", "awq", {"max_shard_bytes": 200_000}),
    ("llama-gptq-shards", "tiny-llama", "gptq", "gptq", {"max_shard_bytes": 60_000}),
    ("llama-rtn-ct-shards", "tiny-llama", "rtn", "compressed-tensors",
     {"max_shard_bytes": 60_000}),
    ("llama-awq-shards", "tiny-llama", "awq", "awq", {"max_shard_bytes": 60_000}),
    ("mixtral-gptq-ct-shards", "tiny-mixtral", "gptq", "compressed-tensors",
     {"max_shard_bytes": 100_000}),
    ("qwen2-vl-gptq-shards", "tiny-qwen2-vl", "gptq", "gptq",
     {"max_shard_bytes": 2_000_000, "pad_for_tp": 2}),
]

SYNTHETIC = {"tiny-llama": ("tiny-llama", {}), "tiny-llama-mha": ("tiny-llama",
                                                                  {"num_key_value_heads": 4}),
             "tiny-qwen2": ("tiny-qwen2", {}), "tiny-qwen3": ("tiny-qwen3", {}),
             "tiny-mixtral": ("tiny-mixtral", {}), "tiny-qwen2-moe": ("tiny-qwen2-moe", {}),
             "tiny-qwen3-moe": ("tiny-qwen3-moe", {}), "tiny-deepseek": ("tiny-deepseek", {})}


def source(work: Path, name: str) -> Path:
    path = work / "src" / name
    if (path / "config.json").is_file():
        return path
    if name == "stories260K":
        shutil.copytree(STORIES, path)
        return path
    if name == "tiny-qwen2-vl":  # tests/test_vlm.py's small Qwen2-VL, in bfloat16
        sys.path.append(str(ROOT / "tests"))
        from test_vlm import tiny_qwen2_vl
        return tiny_qwen2_vl(path)
    import torch

    from quantizer.demo.synthetic import write_checkpoint
    preset, overrides = SYNTHETIC[name]
    write_checkpoint(path, preset=preset, dtype=torch.float16, outlier_channels=4, **overrides)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_all(work: Path, only: list[str] | None) -> dict:
    from quantizer import quantize

    out = {}
    for name, src, method, fmt, extra in RUNS:
        if only and name not in only:
            continue
        if src == "stories260K" and not STORIES.is_dir():
            out[name] = {"skipped": f"{STORIES} not present"}
            continue
        model = source(work, src)
        dest = work / "out" / name
        t0 = time.perf_counter()
        quantize(str(model), str(dest), bits=4, group_size=32, method=method,
                 export_format=fmt, calib_data=str(CALIB), calib_samples=8, calib_seqlen=64,
                 overwrite=True, progress=False, min_expert_tokens=1, device="cpu", **extra)
        files = {f.name: digest(f) for f in sorted(dest.iterdir())
                 if f.suffix == ".safetensors" or f.name in ("config.json",
                                                              "model.safetensors.index.json")}
        notes = json.loads((dest / "layerquant.json").read_text()).get("notes", [])
        out[name] = {"files": files, "notes": notes,
                     "seconds": round(time.perf_counter() - t0, 2)}
        print(f"{name}: {len(files)} files hashed in {out[name]['seconds']} s", flush=True)
    return out


def compare(a: dict, b: dict) -> int:
    bad = 0
    for name in sorted(set(a) | set(b)):
        fa, fb = a.get(name, {}).get("files"), b.get(name, {}).get("files")
        if fa is None or fb is None:
            print(f"{name}: missing or skipped in one run")
            continue
        same = fa == fb
        bad += not same
        diff = [f for f in sorted(set(fa) | set(fb)) if fa.get(f) != fb.get(f)]
        print(f"{name}: {'identical' if same else 'DIFFERENT: ' + ', '.join(diff)}")
    print(f"{bad} of {len(set(a) | set(b))} runs differ")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="source checkpoints and exports go here")
    p.add_argument("--out", type=Path, help="JSON file of the hashes")
    p.add_argument("--only", nargs="*", help="run names (default: all)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    a = p.parse_args(argv)
    if a.compare:
        return 1 if compare(*(json.loads(f.read_text()) for f in a.compare)) else 0
    if not (a.work and a.out):
        p.error("--work and --out are needed (or --compare A B)")
    result = {"python_path": sys.path[0], "runs": run_all(a.work, a.only)}
    import quantizer
    result["quantizer"] = str(Path(quantizer.__file__).parent)
    a.out.write_text(json.dumps(result["runs"], indent=2, sort_keys=True))
    print(f"wrote {a.out} (quantizer from {result['quantizer']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
