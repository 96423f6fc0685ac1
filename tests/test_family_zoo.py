"""The family zoo (tests/family_zoo.py): every causal-LM and image-text-to-text family of the
installed transformers, as a tiny random checkpoint transformers writes itself, either
quantizes (RTN, GPTQ, AWQ where it has scale groups) and reloads to transformers' own logits
with the source checkpoint's tensor names and exact AWQ folds -- or is refused before any
work with one line saying what is missing. The table (family, supported, why) is printed at
the end of the run.

`make test` runs every family the issue names (pass or refusal: about 45 s on 2 idle cores;
marked slow but for FAST, which `make test-fast` runs); every other family is marked
`zoo` (and slow) and runs under `make test-zoo` -- the whole zoo is hours on 2 cores and some
tiny configs need GBs. The Qwen2-VL seed case (a 14784-like MLP width
that splits badly at TP 2 and 4, padded by --pad-for-tp) is tests/test_vlm.py."""
from __future__ import annotations

import contextlib

import pytest

import family_zoo as zoo

# Families the issue names, and what they must do: pass, or be refused for the reason given.
NAMED = {
    "llama": "pass", "mistral": "pass", "qwen2": "pass", "qwen3": "pass",
    "gemma2": "pass", "gemma3_text": "pass", "phi3": "pass", "olmo2": "pass",
    "olmo3": "pass", "granite": "pass", "ernie4_5": "pass", "exaone4": "pass",
    "glm": "pass", "glm4": "pass", "mixtral": "pass", "qwen2_moe": "pass",
    "qwen3_moe": "pass", "deepseek_v3": "pass", "glm4_moe": "pass", "minimax_m2": "pass",
    "qwen2_vl": "pass", "qwen2_5_vl": "pass", "qwen3_vl": "pass", "gemma3": "pass",
    "mistral3": "pass", "kimi_k2": "pass", "gemma4_text(no per-layer inputs)": "pass",
    "gemma4_text": "per-layer token embeddings", "gemma3n_text": "per-layer token embeddings",
    "gpt_oss": "fused as 3-D tensors", "llama4_text": "fused as 3-D tensors",
    "llama4": "fused as 3-D tensors", "granitemoe": "fused 3-D tensors",
    "qwen3_next": "pass", "qwen3_5_text": "pass", "qwen3_5": "pass", "qwen3_5_moe_text": "pass",
    "deepseek_v2": "pass", "deepseek_v32": "pass", "hunyuan_v1_dense": "pass",
    "hunyuan_v1_moe": "pass", "ernie4_5_moe": "pass", "glm4v": "pass", "glm4_moe_lite": "pass",
    "ministral3": "pass", "phimoe": "pass", "exaone": "a module (attn.attention)",
}
# Run by `make test-fast` too (the rest of NAMED is slow, in `make test`): a dense family end
# to end. MoE end to end: tests/test_moe.py.
FAST = ("llama",)

RESULTS: dict[str, zoo.ZooResult] = {}


@contextlib.contextmanager
def _nothing():
    yield


def _families() -> list:
    from quantizer.arch.tiny import all_families
    out = []
    for fam in all_families() + list(zoo.VARIANTS):
        marks = ([] if fam in FAST else [pytest.mark.slow] if fam in NAMED
                 else [pytest.mark.slow, pytest.mark.zoo])
        out.append(pytest.param(fam, marks=marks, id=fam))
    return out


@pytest.fixture(scope="module", autouse=True)
def zoo_table(request):
    """Print the table of every family this run tried, whatever passed or failed."""
    yield
    if not RESULTS:
        return
    rows = [RESULTS[k] for k in sorted(RESULTS)]
    text = zoo.table(rows)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture else _nothing():
            reporter.write_line("\nfamily zoo:\n" + text)


@pytest.mark.parametrize("family", _families())
def test_family(family, tmp_path):
    res = zoo.run_family(family, tmp_path)
    RESULTS[family] = res
    assert not res.failure, f"{family}: {res.failure}"
    want = NAMED.get(family)
    if want == "pass":
        assert res.supported, f"{family} must be supported, was refused: {res.why}"
    elif want is not None:
        assert not res.supported and want in res.why, (family, res.why)
    if res.supported:
        assert set(res.methods) >= {"rtn", "gptq"}
        assert all(e < zoo.LOGIT_TOLERANCE for e in res.logit_error.values())
    else:
        assert res.why, f"{family} was refused without a reason"


@pytest.mark.slow
def test_at_least_30_families_pass():
    """Needs the whole zoo in this run (pytest -m slow tests/test_family_zoo.py)."""
    if len(RESULTS) < 100:
        pytest.skip("the whole zoo did not run in this session")
    passing = [k for k, r in RESULTS.items() if r.supported and not r.failure]
    assert len(passing) >= 30, passing
