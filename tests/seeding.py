"""Every test starts from a known seed, and a failing test's report names it.

A pytest plugin (tests/conftest.py imports its fixture and hooks). Before each test the
autouse fixture `rng_seed` seeds Python's `random`, NumPy's global generator and torch (every
device) with the test's seed and returns it, for tests that build their own generators:
`random.Random(rng_seed)`, `torch.Generator().manual_seed(rng_seed)`.

The seed is fixed: a stable hash (CRC-32) of the test's node id, so a rerun draws the same
numbers, or LAYERQUANT_TEST_SEED=N for every test (to reproduce a failure, or to explore
other draws). A failing test's report ends with a section `seed: N (rerun with
LAYERQUANT_TEST_SEED=N)`. Fixtures of a wider scope (module, session) are seeded from their
own name on setup, whichever test sets them up first, and leave the test's stream as it was:
a test rerun alone sees the same fixture values as in the whole suite.
"""
from __future__ import annotations

import os
import random
import zlib

import numpy as np
import pytest
import torch

ENV = "LAYERQUANT_TEST_SEED"


def stable_seed(text: str) -> int:
    """A seed from a text that is the same on every run, machine and Python (no hash salt)."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def seed_for(nodeid: str) -> int:
    """The seed of the test `nodeid`: LAYERQUANT_TEST_SEED when set, else from the node id."""
    value = os.environ.get(ENV, "").strip()
    if value:
        try:
            return int(value, 0)
        except ValueError:
            raise pytest.UsageError(f"{ENV}={value!r} is not an integer") from None
    return stable_seed(nodeid)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> tuple:
    return random.getstate(), np.random.get_state(), torch.random.get_rng_state()


def restore_rng_states(states: tuple) -> None:
    # torch's CUDA generators are left as the fixture left them: no CPU test draws from them
    py, npy, cpu = states
    random.setstate(py)
    np.random.set_state(npy)
    torch.random.set_rng_state(cpu)


def seed_line(seed: int) -> str:
    return f"seed: {seed} (rerun with {ENV}={seed})"


@pytest.fixture(autouse=True)
def rng_seed(request) -> int:
    """The test's seed, with random, numpy and torch seeded by it."""
    seed = seed_for(request.node.nodeid)
    seed_all(seed)
    return seed


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    if fixturedef.scope == "function":
        return (yield)
    states = rng_states()
    seed_all(stable_seed(f"{fixturedef.baseid}::{fixturedef.argname}"))
    try:
        return (yield)
    finally:
        restore_rng_states(states)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        report.sections.append(("seed", seed_line(seed_for(item.nodeid))))
    return report
