"""Logging. Every module logs to `logging.getLogger(__name__)`, all under the "quantizer"
logger; the library configures nothing (Python's default shows warnings on stderr). The
command line configures one handler: plain lines on stderr, so that `--json` keeps stdout
for its report (a run killed by a time limit still shows its plan and any out-of-memory
retries)."""
from __future__ import annotations

import logging
import sys

ROOT = "quantizer"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a test's capture, a redirect)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure(level: int = logging.INFO) -> StderrHandler:
    """The command line's handler on the "quantizer" logger (replacing an earlier one)."""
    logger = logging.getLogger(ROOT)
    unconfigure()
    handler = StderrHandler()
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


def unconfigure() -> None:
    logger = logging.getLogger(ROOT)
    for h in [h for h in logger.handlers if isinstance(h, StderrHandler)]:
        logger.removeHandler(h)
    logger.setLevel(logging.NOTSET)


def configured_level() -> int | None:
    """The command line's level, None when it configured nothing (library use)."""
    logger = logging.getLogger(ROOT)
    if any(isinstance(h, StderrHandler) for h in logger.handlers):
        return logger.level
    return None
