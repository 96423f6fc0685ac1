"""Calibration text: sources, sampling, tokenization (installed as quantizer.calibration).

    texts = load_texts("builtin")                 # or a .txt/.jsonl path, pileval, wikitext2, c4
    batch = calibration_batch(tok, "builtin", samples=128, seqlen=512, seed=0)   # (128, 512)
    windows = eval_windows(tok, "wikitext2", seqlen=512, max_windows=16)          # (16, 512)

"builtin" is prose from the installed Python standard library's docstrings and reference topics;
"builtin-eval" is a disjoint held-out part of the same kind of text, for offline perplexity.
"""
from .builtin_text import builtin_documents
from .sampling import calibration_batch, eval_windows, token_stream, tokenizer_for
from .sources import available_sources, load_texts, local_wikitext, shared_data_dir

__all__ = [
    "available_sources",
    "builtin_documents",
    "calibration_batch",
    "eval_windows",
    "load_texts",
    "local_wikitext",
    "shared_data_dir",
    "token_stream",
    "tokenizer_for",
]
