#!/usr/bin/env bash
# The accelerator suite (python -m atst_jax.bench gpu) on a bare CUDA machine whose image already has JAX
# with CUDA and PyTorch: only what the image lacks travels, as wheels.
#
#   launch/gpu_suite.sh fetch              # here, with PyPI: wheels into .whl/, the official code into
#                                          # .cache/audiossl (from ATST_OFFICIAL_MIRROR, a bare git mirror,
#                                          # or ATST_OFFICIAL_SRC, a checkout)
#   launch/gpu_suite.sh run [SUITE ARGS]   # there, from the repository root: installs .whl/*.whl into
#                                          # /tmp/site, runs the suite, writes $OUT/bench_gpu.json
#
# Environment: PYTHON (default python3), OUT (default .), ATST_WHEEL_PY (default 3.12, the image's Python),
# ATST_OFFICIAL (default .cache/audiossl when it exists: passed as --official).
set -euo pipefail

PYTHON=${PYTHON:-python3}
# What atst_jax.train imports that the CUDA image lacks (its own jax, flax, optax, orbax, torch, einops
# stay), at the versions of requirements.txt.
WHEELS=(grain array_record ml_collections portpicker soundfile soxr cffi pycparser)
OFFICIAL_FILES=(audiossl/__init__.py audiossl/methods/atstframe audiossl/modules audiossl/utils)

log() { printf '[gpu_suite] %s\n' "$*" >&2; }

pinned() { # NAME -> NAME==VERSION from requirements.txt
    local line
    line=$(grep -i -E "^$1==" requirements.txt) || {
        log "error: $1 is not pinned in requirements.txt"
        exit 2
    }
    printf '%s\n' "$line"
}

fetch() {
    local specs=() n
    for n in "${WHEELS[@]}"; do specs+=("$(pinned "$n")"); done
    mkdir -p .whl
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "${ATST_WHEEL_PY:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${specs[@]}"
    log "wheels in .whl/: $(find .whl -name '*.whl' | wc -l) files, $(du -sh .whl | cut -f1)"
    if [[ -n ${ATST_OFFICIAL_MIRROR:-} ]]; then
        rm -rf .cache/audiossl && mkdir -p .cache/audiossl
        git --git-dir="$ATST_OFFICIAL_MIRROR" archive --format=tar HEAD -- "${OFFICIAL_FILES[@]}" |
            tar -x -C .cache/audiossl
        log "official code in .cache/audiossl (from $ATST_OFFICIAL_MIRROR)"
    elif [[ -n ${ATST_OFFICIAL_SRC:-} ]]; then
        rm -rf .cache/audiossl && mkdir -p .cache/audiossl
        (cd "$ATST_OFFICIAL_SRC" && tar -c "${OFFICIAL_FILES[@]}") | tar -x -C .cache/audiossl
        log "official code in .cache/audiossl (from $ATST_OFFICIAL_SRC)"
    fi
}

run() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    local official=${ATST_OFFICIAL:-}
    if [[ -z $official && -f .cache/audiossl/audiossl/methods/atstframe/model.py ]]; then
        official=.cache/audiossl
    fi
    local out=${OUT:-.}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
    exec "$PYTHON" -m atst_jax.bench gpu ${official:+--official "$official"} --out "$out/bench_gpu.json" "$@"
}

case ${1:-} in
fetch) fetch ;;
run)
    shift
    run "$@"
    ;;
*)
    log "usage: launch/gpu_suite.sh fetch | run [SUITE ARGS]"
    exit 2
    ;;
esac
