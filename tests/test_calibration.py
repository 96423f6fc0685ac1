"""Calibration sources, the built-in stdlib prose, deterministic sampling and eval windows."""
from __future__ import annotations

import json
import random
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from quantizer.calibration.builtin_text import builtin_documents
from quantizer.calibration.sampling import calibration_batch, eval_windows, token_stream, tokenizer_for
from quantizer.calibration.sources import load_texts
from quantizer.calibration import builtin_text, sampling, sources
from quantizer.errors import InputError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES_HF = SHARED / "stories260K" / "hf"
WORDS = (
    "the cat sat on a mat while rain fell over quiet hills and old roads wound toward the sea "
    "where small boats waited for morning light to carry fish back to town"
).split()


@pytest.fixture(scope="module")
def tokenizer():
    if not STORIES_HF.is_dir():
        pytest.skip(f"real tokenizer not available ({STORIES_HF})")
    return tokenizer_for(STORIES_HF)


def random_prose(rng: random.Random, documents: int, words: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "." for _ in range(documents)]


@pytest.fixture
def text_file(tmp_path, rng_seed):
    rng = random.Random(rng_seed)
    docs = random_prose(rng, 40, 60)
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path, docs


# ---- sources ----------------------------------------------------------------------------------
def test_txt_source_splits_on_blank_lines_and_normalises_crlf(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"First doc, line one.\r\nLine two.\r\n\r\n\r\nSecond doc.\r\n  \r\nThird\rdoc.\r\n")
    assert load_texts(str(path)) == ["First doc, line one.\nLine two.", "Second doc.", "Third\ndoc."]


def test_jsonl_source_reads_text_field(tmp_path, rng_seed):
    rng = random.Random(rng_seed)
    docs = random_prose(rng, 5, 12)
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    assert load_texts(str(path)) == docs
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(InputError, match=r"calib.jsonl:2"):
        load_texts(str(path))
    path.write_text("{not json\n")
    with pytest.raises(InputError, match=r"calib.jsonl:1: invalid JSON"):
        load_texts(str(path))


def test_unknown_source_and_missing_file_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="unknown calibration source 'no-such-dataset'.*builtin"):
        load_texts("no-such-dataset")
    with pytest.raises(InputError, match="not found"):
        load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(InputError, match="no text"):
        load_texts(str(tmp_path / "empty.txt"))


def test_hf_source_without_datasets_names_local_alternative(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(InputError) as err:
        load_texts("pileval")
    message = str(err.value)
    assert "--calib-data path/to/file.txt" in message and "datasets" in message and "\n" not in message


def test_hf_source_offline_is_one_line_input_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(InputError) as err:
        load_texts("c4")
    message = str(err.value)
    assert "Couldn't reach" in message and "--calib-data" in message and "\n" not in message


def test_wikitext2_prefers_local_copy(tmp_path, monkeypatch):
    rows = [" = Heading = ", " Some text , with @-@ tokens .", " More text ."]
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(("\r\n".join(rows) + "\r\n").encode())
    monkeypatch.setenv(sources.WIKITEXT_ENV, str(path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # proves the hub path is never taken
    assert load_texts("wikitext2") == rows
    monkeypatch.setenv(sources.WIKITEXT_ENV, str(tmp_path / "absent.raw"))
    with pytest.raises(InputError, match="LAYERQUANT_WIKITEXT"):
        load_texts("wikitext2")


def test_wikitext2_tail_is_the_second_half_and_disjoint_from_the_first_windows(tmp_path,
                                                                             monkeypatch):
    rows = [f" row {i} : " + " ".join(f"w{i}_{j}" for j in range(i % 7 + 3)) for i in range(41)]
    path = tmp_path / "wiki.test.raw"
    path.write_text("\n".join(rows) + "\n")
    monkeypatch.setenv(sources.WIKITEXT_ENV, str(path))
    tail = load_texts("wikitext2-tail")
    assert tail == rows[20:]
    # the evaluation's first windows (the first half of the text) share no row with it
    head_text = "\n\n".join(rows[:20])
    assert not any(row in head_text for row in tail)
    assert "wikitext2-tail" in sources.available_sources()


def test_wikitext2_found_in_shared_data(monkeypatch):
    if not (SHARED / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip("shared WikiText-2 copy not available")
    monkeypatch.delenv(sources.WIKITEXT_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    rows = load_texts("wikitext2")
    assert rows[0] == " = Robert Boulter = " and len(rows) == 2891
    assert not any("\r" in row for row in rows[:100])


# ---- built-in text ----------------------------------------------------------------------------
CODE_LINE = re.compile(r"(>>>|def \w+\(|class \w+[(:]|import \w+\s*$|from \S+ import|\w+ = \w+\()")
COMMON = {"the", "of", "and", "to", "a", "is", "in", "it", "that", "for", "be", "or", "this", "if", "an", "by", "with"}


@pytest.mark.slow
def test_builtin_text_is_large_real_prose():
    docs = builtin_documents("calibration")
    text = "\n\n".join(docs)
    words = re.findall(r"[A-Za-z]+", text.lower())
    assert len(text) > 800_000 and len(words) > 130_000, (len(text), len(words))
    common_share = sum(w in COMMON for w in words) / len(words)
    assert common_share > 0.2, common_share  # English prose runs at ~25-30% for these words
    for paragraph in text.split("\n\n"):
        visible = re.sub(r"\s", "", paragraph)
        letters = sum(c.isalpha() for c in visible)
        assert letters >= 0.6 * len(visible), paragraph
        assert not CODE_LINE.match(paragraph), paragraph
        assert len(re.findall(r"[A-Za-z]+", paragraph)) >= builtin_text.MIN_SENTENCE_WORDS, paragraph
    assert load_texts("builtin") == docs


def test_builtin_eval_part_is_disjoint_held_out_prose():
    calib = {p for d in builtin_documents("calibration") for p in d.split("\n\n")}
    held_out = [p for d in builtin_documents("eval") for p in d.split("\n\n")]
    assert sum(len(p) for p in held_out) > 100_000
    # generic sentences ("Initialize a new instance.") occur in both; anything more is a leak
    shared_chars = sum(len(p) for p in held_out if p in calib)
    assert shared_chars < 0.01 * sum(len(p) for p in held_out), shared_chars
    assert not set(builtin_text.EVAL_MODULES).intersection(builtin_text.CALIBRATION_MODULES)


def test_builtin_collection_is_deterministic():
    root = builtin_text._stdlib_root()
    modules = ("argparse", "json", "textwrap")
    first = builtin_text._documents(builtin_text._module_texts(root, modules))
    assert first and first == builtin_text._documents(builtin_text._module_texts(root, modules))


def test_prose_filter_drops_code_keeps_sentences():
    doc = (
        "Return the sum of the values, skipping any that are missing.\n"
        "The result is always a float.\n\n"
        ">>> total([1, 2])\n3.0\n\n"
        "Example::\n\n    x = total(values)\n\n"
        "* A bullet that wraps onto\n  a second line is still prose.\n\n"
        "|  a  |  b  |\n\n"
        "with open(path) as f:\n"
    )
    assert builtin_text.prose_paragraphs(doc) == [
        "Return the sum of the values, skipping any that are missing. The result is always a float.",
        "* A bullet that wraps onto a second line is still prose.",
    ]


# ---- sampling -----------------------------------------------------------------------------------
def test_calibration_batch_deterministic_per_seed(tokenizer, text_file):
    path, _ = text_file
    seed = random.randrange(1 << 30)
    a = calibration_batch(tokenizer, str(path), samples=8, seqlen=64, seed=seed)
    b = calibration_batch(tokenizer, str(path), samples=8, seqlen=64, seed=seed)
    c = calibration_batch(tokenizer, str(path), samples=8, seqlen=64, seed=seed + 1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < len(tokenizer) and int(a.min()) >= 0
    # every row is a real window of the token stream, not a recombination
    stream = token_stream(tokenizer, load_texts(str(path)), 8 * 64 * sampling.CALIBRATION_POOL_FACTOR, spread=True)
    windows = stream.unfold(0, 64, 1)
    assert all((windows == row).all(dim=1).any() for row in a)


def test_builtin_calibration_batch(tokenizer):
    batch = calibration_batch(tokenizer, "builtin", samples=4, seqlen=128, seed=0)
    assert batch.shape == (4, 128)
    assert torch.equal(batch, calibration_batch(tokenizer, "builtin", samples=4, seqlen=128, seed=0))
    assert re.search(r"\bthe\b", tokenizer.decode(batch.flatten()))


def test_calibration_batch_too_little_text(tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("A few words only.")
    with pytest.raises(InputError, match=r"only \d+ tokens.*seqlen 512"):
        calibration_batch(tokenizer, str(path), samples=2, seqlen=512)
    with pytest.raises(InputError, match="samples >= 1"):
        calibration_batch(tokenizer, str(path), samples=0, seqlen=8)


def test_eval_windows_consecutive_non_overlapping(tokenizer, text_file):
    path, docs = text_file
    stream = torch.tensor(tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"])
    windows = eval_windows(tokenizer, str(path), seqlen=32, max_windows=5)
    assert windows.shape == (5, 32)
    assert torch.equal(windows.flatten(), stream[: 5 * 32])
    everything = eval_windows(tokenizer, str(path), seqlen=32)
    assert everything.shape == (len(stream) // 32, 32)
    assert torch.equal(everything.flatten(), stream[: everything.numel()])


def test_pieces_cover_text_exactly_and_cut_at_newlines(monkeypatch, rng_seed):
    monkeypatch.setattr(sampling, "PIECE_CHARS", 200)
    rng = random.Random(rng_seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(300))
    bounds = sampling._piece_bounds(text)
    assert "".join(text[s:e] for s, e in bounds) == text
    assert all(text[e - 1] == "\n" for s, e in bounds[:-1])
    assert all(e - s <= 200 for s, e in bounds)


def test_spread_sampling_reaches_the_whole_corpus(tokenizer, monkeypatch, rng_seed):
    monkeypatch.setattr(sampling, "PIECE_CHARS", 2_000)
    rng = random.Random(rng_seed)
    docs = random_prose(rng, 100, 40)
    docs[-1] = "Zebra zebra zebra zebra zebra zebra zebra zebra."
    ids = token_stream(tokenizer, docs, max_tokens=3_000, spread=True)
    full = token_stream(tokenizer, docs)
    assert 3_000 <= len(ids) < len(full)
    assert "zebra" in tokenizer.decode(ids[-40:]).lower()  # the last piece is among those chosen


def test_tokenizer_for_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        tokenizer_for(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match=re.escape(str(tmp_path))):
        tokenizer_for(tmp_path)
