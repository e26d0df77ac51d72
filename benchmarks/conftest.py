"""pytest setup for the benchmarks: make `bench_kernels` importable from the test modules.

Nothing here touches TRITON_INTERPRET: these benchmarks time the real kernels on a GPU.
"""
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
