# Copied from ../shared/peers/peer_llmcompressor.py (the project's peer harness for llm-compressor 0.14),
# so that it travels with the working tree to the GPU box. Changes: the result also records
# torch.cuda.max_memory_reserved (peak_reserved_gib), the number our budget table compares; and
# a fallback for building the calibration Dataset where datasets' fingerprint hashing fails
# (seen with dill 0.4.1 + pyarrow 24-26 on Python 3.11; outside the timed region); the count of
# modules that were given a quantization scheme (untimed: shows whether MoE experts were).
# Run by benchmarks/bench_speed.py in its own process with the peer wheels on PYTHONPATH.
"""Peer anchor: time llm-compressor (AWQ or GPTQ, W4A16 g128) on a checkpoint with a fixed tokenized calibration set.
peer_llmcompressor.py MODEL_DIR {awq,gptq} TEXT_FILE [nsamples] [seqlen] [out_json]"""
import json, os, sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.awq import AWQModifier
from llmcompressor.modifiers.quantization import GPTQModifier

d, method, text = sys.argv[1], sys.argv[2], sys.argv[3]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 128
L = int(sys.argv[5]) if len(sys.argv) > 5 else 512
out_json = sys.argv[6] if len(sys.argv) > 6 else None
cfg = json.load(open(f"{d}/config.json"))
V = cfg["vocab_size"]
# Token ids from raw bytes of real text, folded into the vocab: the peer's speed does not depend on token identity.
raw = torch.tensor(list(open(text, "rb").read()), dtype=torch.long)
need = n * L
ids = raw.repeat(need // raw.numel() + 1)[:need].remainder(V).view(n, L)
columns = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
try:
    ds = Dataset.from_dict(columns)
except Exception:  # some dill/pyarrow pairs cannot hash a new dataset: name it ourselves (untimed)
    from datasets.table import InMemoryTable
    ds = Dataset(InMemoryTable.from_pydict(columns), fingerprint="peer-calibration")
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, os.environ.get("DTYPE", "float16")))
t_load = time.time() - t0
if method == "awq":
    recipe = [AWQModifier(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head"])]
else:
    recipe = [GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])]
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
t1 = time.time()
tok = AutoTokenizer.from_pretrained(os.environ.get("TOKENIZER_DIR", d))  # any tokenizer: the set is pre-tokenized
oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, max_seq_length=L, num_calibration_samples=n)
t_q = time.time() - t1
# untimed: how many modules got a quantization scheme (MoE: whether the experts were quantized)
quantized = sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)
peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
peak_reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
res = dict(peer="llmcompressor", method=method, model=d, layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
           nsamples=n, seqlen=L, load_s=round(t_load, 1), quantize_s=round(t_q, 1),
           per_layer_s=round(t_q / cfg["num_hidden_layers"], 2), peak_alloc_gib=peak, peak_reserved_gib=peak_reserved,
           device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           quantized_modules=quantized)
print(json.dumps(res))
if out_json:
    json.dump(res, open(out_json, "w"))
