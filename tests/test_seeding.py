"""The seeding plugin (tests/seeding.py): each test starts from its seed, and a failing test's
report names the seed that reproduces it."""
import random

import numpy as np
import pytest
import torch

import seeding


def test_the_draws_are_those_of_the_tests_seed(rng_seed, request):
    assert rng_seed == seeding.seed_for(request.node.nodeid)
    assert random.random() == random.Random(rng_seed).random()
    assert np.random.rand() == np.random.RandomState(rng_seed).rand()
    expected = torch.rand(5, generator=torch.Generator().manual_seed(rng_seed))
    assert torch.equal(torch.rand(5), expected)


def test_the_seed_is_stable_and_differs_between_tests(monkeypatch):
    monkeypatch.delenv(seeding.ENV, raising=False)
    a = seeding.seed_for("tests/test_x.py::test_a")
    b = seeding.seed_for("tests/test_x.py::test_b")
    assert a == 1768327856  # CRC-32 of the node id: the same on every run and machine
    assert a != b and 0 <= a < 2**31
    monkeypatch.setenv(seeding.ENV, "1234")
    assert seeding.seed_for("tests/test_x.py::test_a") == seeding.seed_for("any::other") == 1234
    monkeypatch.setenv(seeding.ENV, "twelve")
    with pytest.raises(pytest.UsageError, match=seeding.ENV):
        seeding.seed_for("tests/test_x.py::test_a")


FAILING = """
import random
import pytest
import torch

@pytest.fixture(scope="module")
def shared():
    return random.random()

def test_draws(shared):
    assert False, f"draws {shared!r} {random.random()!r} {torch.rand(1).item()!r}"
"""


# the plugin alone (this process imported it already, so it is not assertion-rewritten again)
INNER = ("-p", "seeding", "-p", "no:cacheprovider",
         "-W", "ignore::pytest.PytestAssertRewriteWarning")


def _draws(result) -> str:
    line = next(ln for ln in result.outlines if "AssertionError: draws" in ln)
    return line.split("draws", 1)[1].strip()


def test_a_failing_test_names_its_seed_and_the_seed_reproduces_it(pytester, monkeypatch):
    monkeypatch.delenv(seeding.ENV, raising=False)
    pytester.makepyfile(test_fails=FAILING)
    first = pytester.runpytest_inprocess(*INNER)
    first.assert_outcomes(failed=1)
    seed = seeding.stable_seed("test_fails.py::test_draws")
    first.stdout.fnmatch_lines([f"*seed: {seed} (rerun with LAYERQUANT_TEST_SEED={seed})*"])
    # the same draws on a second run, and with the seed the report names
    again = pytester.runpytest_inprocess(*INNER)
    monkeypatch.setenv(seeding.ENV, str(seed))
    named = pytester.runpytest_inprocess(*INNER)
    assert _draws(first) == _draws(again) == _draws(named)
    # another seed draws other numbers in the test, the module fixture keeps its own seed
    monkeypatch.setenv(seeding.ENV, str(seed + 1))
    other = pytester.runpytest_inprocess(*INNER)
    other.stdout.fnmatch_lines([f"*seed: {seed + 1} (rerun with *={seed + 1})*"])
    fixture, *test = _draws(other).split()
    assert fixture == _draws(first).split()[0] and test != _draws(first).split()[1:]


def test_a_passing_test_has_no_seed_section(pytester, monkeypatch):
    monkeypatch.delenv(seeding.ENV, raising=False)
    pytester.makepyfile(test_passes="def test_ok():\n    print('hello')\n    assert True\n")
    result = pytester.runpytest_inprocess(*INNER, "-rA")
    result.assert_outcomes(passed=1)
    assert "rerun with LAYERQUANT_TEST_SEED" not in result.stdout.str()
