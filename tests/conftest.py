"""Shared fixtures: generated checkpoints, the real data beside the checkout, the serving check
of every export, and seeding (tests/seeding.py: every test seeded, a failing test's report
names its seed). Plain helper functions the test files share are in tests/helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

# Triton's CPU interpreter is chosen when triton is imported: set it before any test module's
# imports can pull triton in (quantizer.methods imports the GPTQ Triton kernel module), not
# only in the kernel tests' own modules, which pytest collects after others. (As before, it
# holds for the whole run: collection finishes before any test runs.)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# every test seeded, the seed on a failing test's report (tests/seeding.py)
from seeding import pytest_fixture_setup, pytest_runtest_makereport, rng_seed  # noqa: E402,F401

from helpers import ROOT  # noqa: E402

pytest_plugins = ["pytester"]  # tests/test_seeding.py runs pytest on a failing test

SHARED = Path(os.environ.get("LAYERQUANT_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "data" / "stories260K" / "hf"
TINYSTORIES = SHARED / "data" / "tinystories-excerpt" / "TinyStories-valid.txt"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES / "config.json").is_file():
        pytest.skip("../shared/data/stories260K is not present")
    return STORIES


@pytest.fixture(scope="session")
def tinystories_text() -> Path:
    if not TINYSTORIES.is_file():
        pytest.skip("../shared/data/tinystories-excerpt is not present")
    return TINYSTORIES


@pytest.fixture(scope="session")
def prose_file(tmp_path_factory) -> Path:
    """A few KB of real English prose for tests that must not depend on ../shared."""
    import inspect
    import json
    import pathlib
    import textwrap
    parts = [inspect.getdoc(m) or "" for m in (json, pathlib, textwrap, inspect)]
    path = tmp_path_factory.mktemp("prose") / "prose.txt"
    path.write_text("\n\n".join(parts) * 3)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """factory(preset, **overrides) -> directory of a generated random checkpoint (cached)."""
    from quantizer.demo.synthetic import write_checkpoint

    cache = {}

    def make(preset: str = "tiny-llama", **overrides):
        key = (preset, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(preset)
            cache[key] = write_checkpoint(out, preset=preset, **overrides)
        return cache[key]

    return make


@pytest.fixture(autouse=True)
def serving_check_every_export(request, monkeypatch):
    """Every export a test publishes passes `quantize check` (vLLM's rules) with no error:
    the published directory is re-read from disk and checked, whatever --engine the run
    used. A test that writes an export vLLM refuses on purpose (to test --engine none) marks
    itself `serving_errors_expected` and gets the reports in `request.node.serving_reports`."""
    import quantizer.run.quantize as run
    from quantizer.export.serving import check_export

    real = run.publish
    expected = request.node.get_closest_marker("serving_errors_expected") is not None
    request.node.serving_reports = []

    def publish(staged, output):
        real(staged, output)
        report = check_export(output)
        request.node.serving_reports.append(report)
        if report.errors and not expected:
            raise AssertionError(f"export {output} fails the serving check:\n"
                                 + report.render())

    monkeypatch.setattr(run, "publish", publish)
    yield


def tested_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version
    parts = []
    for dist in ("torch", "transformers", "triton", "safetensors", "kernels", "numpy"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    return "layerquant tested with: " + ", ".join(parts)


def pytest_sessionstart(session):
    """The versions this run tested, first in the output even under -q (issue 17: a green run
    must say what it ran with)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(tested_versions())
