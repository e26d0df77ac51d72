"""Every Triton kernel, as its launcher launches it, compiles for an H100/H200 (sm_90) and fits an
SM's shared memory: checked on the CPU with Triton's own compiler and bundled ptxas
(hopper_compile.py), which the interpreter-based tests never reach."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("hopper_compile.py")


def _ptxas() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def _kernels_in_source() -> set[str]:
    names = set()
    for folder in (ROOT / "kernels", ROOT / "atlas_fast" / "rollout" / "engine"):
        for path in folder.glob("*.py"):
            names |= set(re.findall(r"^def (_\w+_kernel)\(", path.read_text(), re.M))
    return names


@pytest.mark.skipif(not _ptxas(), reason="this Triton has no bundled NVIDIA backend / ptxas")
def test_every_kernel_compiles_for_hopper_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [f"{r['kernel']} {r['constexprs']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    compiled = {r["kernel"].rsplit(".", 1)[-1] for r in rows}
    missing = _kernels_in_source() - compiled
    assert not missing, f"kernels no launcher reached (add them to hopper_compile.py): {sorted(missing)}"
    assert len(rows) >= 40  # the option combinations that change code, not one variant per kernel
