"""llm-compressor (0.14) on exactly our calibration tokens, its export written to disk, for the
quality table (benchmarks/quality_matrix.py; issue 20). Runs in its own process with the peer's
wheels on PYTHONPATH; imports nothing of layerquant.

    DTYPE=float16 python peer_quality.py MODEL_DIR RECIPE TOKENS.pt OUT_DIR [GROUP_SIZE]

RECIPE (all W4A16, `ignore=["lm_head"]`, group GROUP_SIZE, default 64):
- awq: AWQModifier + asymmetric groups (its README's W4A16_ASYM recipe, at our group size);
- awq-gptq: AWQModifier then GPTQModifier (its defaults) on asymmetric groups;
- gptq: GPTQModifier with its defaults: symmetric groups, actorder static, dampening 0.01,
  block 128 (the W4A16 preset's scheme at our group size);
- gptq-imatrix: the same with the imatrix_mse weight observer (importance-weighted grid);
- rtn: QuantizationModifier, asymmetric min-max groups (round to nearest, no calibration);
- rtn-imatrix: QuantizationModifier with the imatrix_mse observer (calibrated).

TOKENS.pt: a (samples, seqlen) LongTensor, our calibration windows. Writes OUT_DIR (the
compressed-tensors checkpoint + tokenizer) and OUT_DIR/peer_run.json (seconds, versions)."""
import json
import os
import sys
import time

import torch


def scheme(symmetric: bool, group: int, observer: str | None = None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    args = dict(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group,
                dynamic=False)
    if observer:
        args["observer"] = observer
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))


def recipe(name: str, group: int):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    if name in ("awq", "awq-gptq"):
        from llmcompressor.modifiers.transform import AWQModifier
        then = QuantizationModifier if name == "awq" else GPTQModifier
        return [AWQModifier(), then(config_groups={"group_0": scheme(False, group)},
                                    ignore=["lm_head"])]
    if name in ("gptq", "gptq-imatrix"):
        obs = "imatrix_mse" if name.endswith("imatrix") else None
        return [GPTQModifier(config_groups={"group_0": scheme(True, group, obs)},
                             ignore=["lm_head"])]
    if name in ("rtn", "rtn-imatrix"):
        obs = "imatrix_mse" if name.endswith("imatrix") else None
        return [QuantizationModifier(config_groups={"group_0": scheme(False, group, obs)},
                                     ignore=["lm_head"])]
    raise SystemExit(f"unknown recipe {name!r}")


def dataset(tokens: torch.Tensor):
    from datasets import Dataset
    columns = {"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()}
    try:
        return Dataset.from_dict(columns)
    except Exception:  # some dill/pyarrow pairs cannot hash a new dataset: name it ourselves
        from datasets.table import InMemoryTable
        return Dataset(InMemoryTable.from_pydict(columns), fingerprint="peer-calibration")


def main(argv) -> int:
    model_dir, name, tokens_file, out = argv[:4]
    group = int(argv[4]) if len(argv) > 4 else 64
    import llmcompressor
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokens = torch.load(tokens_file)
    dtype = os.environ.get("DTYPE", "float16")
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(model_dir)
    t1 = time.time()
    oneshot(model=model, processor=tok, dataset=dataset(tokens), recipe=recipe(name, group),
            max_seq_length=tokens.shape[1], num_calibration_samples=tokens.shape[0])
    t2 = time.time()
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    res = {"peer": "llmcompressor", "version": llmcompressor.__version__, "recipe": name,
           "dtype": dtype, "group_size": group, "samples": tokens.shape[0],
           "seqlen": tokens.shape[1], "load_s": round(t1 - t0, 1),
           "quantize_s": round(t2 - t1, 1), "save_s": round(time.time() - t2, 1),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    with open(os.path.join(out, "peer_run.json"), "w") as f:
        json.dump(res, f)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
