"""The test setup itself: where the kernels run, and reproducible seeds."""
import ast
import importlib.util
import os
import subprocess
import sys
import zlib
from pathlib import Path

import torch

from .seeding import seed_of

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent


def _run_pytest(tmp_path: Path, *args: str, env_drop=("TRITON_INTERPRET",), pythonpath: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return proc.stdout + proc.stderr


def test_interpreter_only_without_cuda():
    spec = importlib.util.spec_from_file_location("_session_conftest", TESTS / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.interpreter_setting({}, cuda_available=False) == "1"
    assert mod.interpreter_setting({}, cuda_available=True) is None
    assert mod.interpreter_setting({"TRITON_INTERPRET": "0"}, cuda_available=False) == "0"
    assert mod.interpreter_setting({"TRITON_INTERPRET": "1"}, cuda_available=True) == "1"


def test_this_session_interprets_only_without_cuda():
    from atlas_kernels.logprobs import _logprobs_fwd_kernel

    interpreted = type(_logprobs_fwd_kernel).__name__ == "InterpretedFunction"
    assert interpreted == (os.environ.get("TRITON_INTERPRET") == "1")
    if not torch.cuda.is_available():
        assert interpreted


def test_a_cuda_machine_compiles_the_kernels_with_no_variable_set(tmp_path):
    # The session conftest, a plugin that makes CUDA look present (loaded before any conftest),
    # and a probe: the kernels must be compiled JIT functions and the CUDA tests must not skip.
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "fakecuda.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    (tmp_path / "test_probe.py").write_text(
        "import os\n"
        "def test_probe():\n"
        "    assert 'TRITON_INTERPRET' not in os.environ\n"
        "    from atlas_kernels.logprobs import _logprobs_fwd_kernel\n"
        "    assert type(_logprobs_fwd_kernel).__name__ == 'JITFunction', type(_logprobs_fwd_kernel)\n"
    )
    out = _run_pytest(tmp_path, "-p", "fakecuda", "test_probe.py", pythonpath=str(tmp_path))
    assert "1 passed" in out, out


def test_no_hash_seeds_in_kernel_tests():
    # hash() of a str is salted per process (PYTHONHASHSEED): a failure could not be rerun.
    for path in sorted(HERE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hash":
                raise AssertionError(f"{path.name}:{node.lineno} seeds with hash(); use the `seed` fixture")


def test_seed_is_stable_and_printed_on_failure(tmp_path):
    assert seed_of("test_x.py::test_y[a-1]") == zlib.crc32(b"test_x.py::test_y[a-1]")
    (tmp_path / "test_fails.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('k', [3])\n"
        "def test_fails(seed, k):\n"
        "    assert seed < 0\n"
    )
    out = _run_pytest(tmp_path, "-p", "seeding", "test_fails.py", pythonpath=str(HERE))
    expected = zlib.crc32(b"test_fails.py::test_fails[3]")
    assert "1 failed" in out and f"seed = {expected}" in out, out
