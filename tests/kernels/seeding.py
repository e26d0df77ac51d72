"""Reproducible seeds for the kernel tests, reported when a test fails.

A test's seed is zlib.crc32 of its id (file name :: test name with parameters): the same in every
process and on every machine, unlike hash() of a string, which Python salts per process. Rerun
the failing test id and the same inputs come back; the seed is also printed in the failure
report. Plain pytest and zlib only, so the plugin can be loaded on its own (`-p seeding`).
"""
from __future__ import annotations

import zlib

import pytest


def seed_of(test_id: str) -> int:
    return zlib.crc32(test_id.encode())


def test_id(node) -> str:
    return f"{node.path.name}::{node.name}"


@pytest.fixture
def seed(request) -> int:
    """This test's seed (an int in [0, 2**32)); use it for every random generator in the test."""
    return seed_of(test_id(request.node))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "funcargs", {}).get("seed")
    if report.failed and seed is not None:
        report.sections.append(
            ("seed", f"seed = {seed} = zlib.crc32({test_id(item)!r}); rerun this test id to get the same inputs")
        )
