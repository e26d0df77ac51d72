#!/usr/bin/env bash
# Run the kernel benchmarks on a GPU machine whose image has torch + triton + transformers but
# not trl / liger-kernel (they travel as wheels in .whl/, which git ignores).
#
#   bash benchmarks/run_on_gpu.sh [--quick] [--no-compile] [other bench_kernels.py options]
#
# Through the device tool: command "bash benchmarks/run_on_gpu.sh", carry [".whl"].
# Leaves in $OUT (default /tmp/bench_out): RESULTS.md (benchmarks/RESULTS.md with this script's
# section replaced; copy it back over benchmarks/RESULTS.md), bench_kernels.log, env.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
OUT="${OUT:-/tmp/bench_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

# 1-2. Carried peers and the two import packages.
source benchmarks/gpu_env.sh

# 3. What ran where (read-only queries).
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,utilization.gpu --format=csv || true
    "$PY" - <<'EOF'
import importlib.metadata as md, sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__)
for d in ("trl", "liger-kernel", "transformers"):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, "not installed")
import atlas_kernels
print("atlas_kernels from", atlas_kernels.__file__)
EOF
} 2>&1 | tee "$OUT/env.txt"

# 4. The benchmark updates a copy of RESULTS.md so other sections of that file survive.
if [[ -f benchmarks/RESULTS.md ]]; then cp benchmarks/RESULTS.md "$OUT/RESULTS.md"; fi
"$PY" benchmarks/bench_kernels.py --out "$OUT/RESULTS.md" "$@" 2>&1 | tee "$OUT/bench_kernels.log"
