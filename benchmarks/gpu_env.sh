# Source this on a GPU machine whose image has torch + triton + transformers but not trl, datasets,
# liger-kernel, cut-cross-entropy or hydra: they travel as pure-Python wheels in .whl/ (git ignores
# it; fill it with `make wheels`). Afterwards `python` imports atlas_fast, atlas_kernels and peers.
#
#   source benchmarks/gpu_env.sh && python benchmarks/bench_generation.py --quick
#
# Through the device tool: carry [".whl"].
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
SITE=/tmp/site
rm -rf "$SITE" && mkdir -p "$SITE"
shopt -s nullglob
wheels=("$REPO"/.whl/*.whl)
if ((${#wheels[@]})); then
    # No resolver and no network there: install exactly the carried files.
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}"; then
        echo "pip unavailable or failed; unpacking the wheels instead" >&2
        for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$SITE"; done
    fi
else
    echo "no wheels in .whl/: peer rows (TRL, Liger, CCE) will read n/a" >&2
fi
shopt -u nullglob
# The repo maps folder kernels/ to package atlas_kernels (setup.py package_dir). Link it under its
# package name rather than putting the repo root on the path: a top-level `kernels` module would
# shadow Hugging Face's `kernels` package, which transformers probes on import.
PKGS=/tmp/pkgs
mkdir -p "$PKGS"
ln -sfn "$REPO/kernels" "$PKGS/atlas_kernels"
ln -sfn "$REPO/atlas_fast" "$PKGS/atlas_fast"
export PYTHONPATH="$PKGS:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1
export ATLAS_FAST_COMMIT="${ATLAS_FAST_COMMIT:-$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
