"""Error types and the exit codes the CLI maps them to (0 ok, 2 bad input, 3 OOM, 1 other)."""


class QuantizerError(Exception):
    exit_code = 1


class InputError(QuantizerError):
    """Something the user gave us is wrong: path, config, settings, weights."""

    exit_code = 2


class OutOfMemory(QuantizerError):
    exit_code = 3
