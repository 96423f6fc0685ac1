"""Error types and the exit codes the CLI maps them to (0 ok, 2 bad input, 3 OOM, 1 other;
130 after Ctrl-C, 143 after SIGTERM)."""


class QuantizerError(Exception):
    exit_code = 1


class InputError(QuantizerError, ValueError):
    """Something the user gave us is wrong: path, config, settings, weights. One line, said
    before anything is written; the CLI prints it and exits 2, the Python API raises it (a
    ValueError, so `except ValueError` catches a bad argument as it would anywhere else)."""

    exit_code = 2


class Unsupported(InputError):
    """The model has something this quantizer cannot handle (a layer structure discovery
    cannot read, experts of an unknown layout); the message says what."""


class OutOfMemory(QuantizerError):
    exit_code = 3


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop), raised where Ctrl-C's KeyboardInterrupt
    would be, so that a job stops the same way: finished layers saved, --resume continues."""

    exit_code = 143
