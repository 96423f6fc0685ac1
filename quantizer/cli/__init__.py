"""`quantize` command line. Exit codes: 0 ok, 2 bad input (one line on stderr, nothing
written), 3 out of memory, 130 Ctrl-C, 143 SIGTERM (both: finished layers kept for --resume),
1 other. Log lines go to stderr (logs.py), so `--json` keeps stdout for the report.

One module per subcommand (quantize, measure, eval, plan, check, demo), each with `run(args)`.
`main` parses with cli/args.py and checks the model path first; only then does it import the
subcommand's module, which imports torch: a typo answers at once."""
from __future__ import annotations

import faulthandler
import importlib
import os
import signal
import sys
import threading

from .. import logs
from ..errors import InputError, OutOfMemory, QuantizerError, Terminated
from ..run.caches import configure_caches
from ..run.outputs import local_model_path
from .args import PARSERS, SUBCOMMANDS

RESUMABLE = ("quantize", "measure")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "quantize"
    debug = bool(os.environ.get("LAYERQUANT_DEBUG"))
    configure_caches()  # before anything imports triton
    previous = _stop_on_sigterm()
    logs.configure()
    try:
        _dump_stacks_every(os.environ.get("LAYERQUANT_DUMP_STACKS"))
        args = PARSERS[name]().parse_args(argv)
        _check_paths(name, args)
        return importlib.import_module(f"{__name__}.{name}").run(args)
    except BaseException as e:
        code = _exit_code(e, name in RESUMABLE, debug)
        if code is None:
            raise
        return code
    finally:
        logs.unconfigure()
        _restore_sigterm(previous)


def _check_paths(name: str, args) -> None:
    """The model path, before torch is imported (a hub id of the form org/name may pass)."""
    if name in RESUMABLE:
        local_model_path(args.model)
    elif name in ("eval", "plan"):
        _existing(args.model, "model")
        if getattr(args, "base", None) is not None:
            _existing(args.base, "--base")


def _existing(path: str, what: str) -> None:
    if not os.path.exists(os.path.expanduser(path)):
        raise InputError(f"{what} path does not exist: {path}")


def _exit_code(e: BaseException, resumable: bool, debug: bool) -> int | None:
    """The exit code for `e`, its one line said on stderr; None: re-raise it."""
    if isinstance(e, SystemExit):
        return None  # --help
    if isinstance(e, InputError):
        return _say(f"error: {_one_line(e)}", e.exit_code)
    if isinstance(e, (OutOfMemory, MemoryError)):
        return _say(f"error: out of memory: {_one_line(e)}", 3)
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (Terminated)
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        hint = (": finished layers are saved; rerun the same command with --resume"
                if resumable else "")
        return _say(what + hint, Terminated.exit_code if isinstance(e, Terminated) else 130)
    if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return _say(f"error: out of GPU memory: {str(e).splitlines()[0]}", 3)
    if debug or not isinstance(e, Exception):
        return None
    code = e.exit_code if isinstance(e, QuantizerError) else 1
    return _say(f"error: {type(e).__name__}: {_one_line(e)} (set LAYERQUANT_DEBUG=1 for a "
                f"traceback)", code)


def _say(line: str, code: int) -> int:
    print(line, file=sys.stderr)
    return code


def _one_line(error: BaseException) -> str:
    """An error's message on one line (a refusal is one line on stderr, whatever raised it)."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def _dump_stacks_every(seconds: str | None) -> None:
    """LAYERQUANT_DUMP_STACKS=60: every 60 s, every thread's Python stack to stderr. A run
    that is killed for time (a benchmark's limit) then shows where it spent it."""
    if not seconds:
        return
    try:
        every = float(seconds)
    except ValueError:
        raise InputError(f"LAYERQUANT_DUMP_STACKS must be seconds, got {seconds!r}") from None
    if every > 0:
        faulthandler.dump_traceback_later(every, repeat=True, file=sys.stderr)


def _stop_on_sigterm():
    """SIGTERM (kill, a scheduler's stop) stops a run as Ctrl-C does: the job directory is
    unlocked and kept, and the --resume hint is printed. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise Terminated()
    try:
        return signal.signal(signal.SIGTERM, stop)
    except (ValueError, OSError):
        return None


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
