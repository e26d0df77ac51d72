"""Kernel tests: reproducible seeds, and which tests need the Triton interpreter.

tests/conftest.py turns the interpreter on only when no CUDA device is visible. The CPU kernel
tests check the Triton kernels through that interpreter; on a GPU machine, where the kernels
compile instead, they would silently test the reference, so they skip there with the command
that runs them.
"""
import os

import pytest
import torch

from .seeding import pytest_runtest_makereport, seed  # noqa: F401 - a hook and a fixture for this folder

# Modules that need no interpreter: the compiled CUDA tests and the checks of the test setup itself.
RUN_COMPILED = {"test_cuda.py", "test_setup.py"}


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A CPU generator seeded with this test's seed."""
    return torch.Generator().manual_seed(seed)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="checks the Triton kernels on the CPU through the interpreter: "
                                   "TRITON_INTERPRET=1 python -m pytest tests/kernels")
    here = os.path.dirname(__file__)
    for item in items:
        if os.path.dirname(str(item.path)) == here and item.path.name not in RUN_COMPILED:
            item.add_marker(skip)
