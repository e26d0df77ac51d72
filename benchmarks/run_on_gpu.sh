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

# 1. The carried wheels (pure python) into a scratch site dir; no resolver, no network.
SITE=/tmp/site
rm -rf "$SITE" && mkdir -p "$SITE"
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}"; then
        echo "pip unavailable or failed; unpacking the wheels instead" >&2
        for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$SITE"; done
    fi
else
    echo "no wheels in .whl/: the TRL and Liger rows will read n/a" >&2
fi

# 2. The repo maps folder kernels/ to package atlas_kernels (setup.py package_dir). Link it under
#    its package name instead of putting the repo root on the path: a top-level `kernels` module
#    would shadow Hugging Face's `kernels` package, which transformers probes on import.
PKGS=/tmp/pkgs
mkdir -p "$PKGS"
ln -sfn "$REPO/kernels" "$PKGS/atlas_kernels"
ln -sfn "$REPO/atlas_fast" "$PKGS/atlas_fast"
export PYTHONPATH="$PKGS:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

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
