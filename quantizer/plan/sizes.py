"""Memory sizes as people type them ("40G", "12GiB", "0:20G,1:40G") and as we print them.

Every unit is binary: K/KB/KiB = 2**10, M/MB/MiB = 2**20, G/GB/GiB = 2**30, T/TB/TiB = 2**40.
"40G" and "40GiB" mean the same 40 × 2**30 bytes, because GPU memory is reported in binary
units (an "80 GB" H100 has 80 GiB) and a budget that silently shrinks by 7% when written
"GB" would surprise more than it would help. A bare number is a count of bytes."""
from __future__ import annotations

import math
import re

from ..errors import InputError

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

_UNITS = {
    "": 1, "b": 1,
    "k": KIB, "kb": KIB, "kib": KIB,
    "m": MIB, "mb": MIB, "mib": MIB,
    "g": GIB, "gb": GIB, "gib": GIB,
    "t": TIB, "tb": TIB, "tib": TIB,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'40G' -> 42949672960. Integers pass through. Raises InputError on anything else."""
    if isinstance(text, bool):
        raise InputError(f"not a memory size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise InputError(f"memory size must not be negative, got {text}")
        return text
    if not isinstance(text, str):
        raise InputError(f"not a memory size: {text!r}")
    m = _SIZE.match(text)
    if not m:
        raise InputError(f"not a memory size: {text!r} (expected e.g. 40G, 12GiB, 512M, 1.5T)")
    number, unit = m.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise InputError(f"unknown unit {unit!r} in memory size {text!r}; "
                         f"use B, K, M, G or T (all binary: G = GiB = 2**30 bytes)")
    value = float(number) * factor
    if not math.isfinite(value):
        raise InputError(f"memory size out of range: {text!r}")
    return int(value)


def parse_budgets(text: str) -> dict[int | None, int]:
    """'40G' -> {None: the same budget for every device}; '0:20G,1:40G' -> one budget per
    device index (which devices a run uses is checked by settings.Budgets)."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"empty memory budget: {text!r}")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 1 and ":" not in parts[0]:
        return {None: parse_size(parts[0])}
    budgets: dict[int | None, int] = {}
    for part in parts:
        dev, sep, size = part.partition(":")
        if not sep:
            raise InputError(f"budget entry {part!r} in {text!r}: mix of per-device and global "
                             f"budgets; write every entry as DEVICE:SIZE")
        try:
            index = int(dev.strip())
        except ValueError:
            raise InputError(f"budget entry {part!r}: device {dev!r} is not an index") from None
        if index < 0:
            raise InputError(f"budget entry {part!r}: device index must not be negative")
        if index in budgets:
            raise InputError(f"device {index} has two budgets in {text!r}")
        budgets[index] = parse_size(size)
    return budgets


def format_size(n: int | float) -> str:
    """Binary units, one decimal: 8589934592 -> '8.0 GiB'."""
    n = float(n)
    for unit, factor in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"


def format_size_up(n: int | float) -> str:
    """Like format_size but rounded up, for a 'needs at least' message: never understates."""
    for unit, factor in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB)):
        if n >= factor:
            return f"{math.ceil(n / factor * 10) / 10:.1f} {unit}"
    return f"{math.ceil(n / KIB)} KiB"
