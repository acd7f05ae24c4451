#!/usr/bin/env bash
# The GPU measurement of every backend in one command, on a machine with an NVIDIA GPU and PyTorch and/or
# JAX but no TensorFlow and no network (the project's lent H100), run from the repository root:
#
#   bash bench/gpu.sh prepare   # here, with the package registry: Keras's wheels -> .whl/,
#                               # GPU_PHOTOS photos of ../shared/data/cats_vs_dogs -> .gpu-data/
#   bash bench/gpu.sh           # there: `make bench` under JAX, then PyTorch, in mixed precision
#                               # (PRECISION=auto picks mixed_float16 on a GPU), with nvidia-smi's
#                               # utilisation logged alongside -> bench/gpu-results/ (and $OUT)
#
# .whl/ and .gpu-data/ are git-ignored (.git/info/exclude); with the device tool, name both in
# `carry`. What bench.py measures is in bench/README.md (figures 1-4 and 7); the naive way there
# is torchvision's ImageFolder + DataLoader + VGG16, since the Keras naive way needs TensorFlow.
set -euo pipefail
cd "$(dirname "$0")/.."
PHOTOS=${GPU_PHOTOS:-1000}          # ~45 MB of JPEGs: the device tool carries 64 MiB in all
PY=${PYTHON:-python3}

if [[ ${1:-} == prepare ]]; then
    for path in /.whl/ /.gpu-data/; do
        grep -qxF "$path" .git/info/exclude || echo "$path" >> .git/info/exclude
    done
    rm -rf .whl .gpu-data && mkdir -p .whl
    # Keras and what it needs that the GPU image lacks, for its Python (3.12, manylinux x86-64)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        "keras==$(sed -n 's/^keras==\([^ ]*\).*/\1/p' requirements.txt)" namex optree
    half=$((PHOTOS / 4))  # the first PHOTOS/4 of each class folder of train/ and validation/
    for split in train validation; do
        for class in cats dogs; do
            mkdir -p ".gpu-data/cats_vs_dogs/$split/$class"
            find "../shared/data/cats_vs_dogs/$split/$class" -type f | sort | head -n "$half" |
                xargs -I{} cp {} ".gpu-data/cats_vs_dogs/$split/$class/"
        done
    done
    du -sh .whl .gpu-data
    exit 0
fi

[[ -d .gpu-data/cats_vs_dogs ]] || { echo "no .gpu-data/: run 'bash bench/gpu.sh prepare' first" >&2; exit 2; }
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX: take GPU memory as needed, like the others
export BENCH_DATA=.gpu-data/cats_vs_dogs BENCH_N=$PHOTOS PYTHONUNBUFFERED=1
RESULTS=bench/gpu-results
mkdir -p "$RESULTS"
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true

for backend in jax torch; do
    if ! $PY -c "import $backend" 2> /dev/null; then
        echo "$backend is not installed: skipped" | tee "$RESULTS/$backend.skipped"
        continue
    fi
    # GPU utilisation (%) and memory once a second while the bench runs
    nvidia-smi dmon -s um -d 1 > "$RESULTS/utilisation-$backend.log" 2>&1 &
    monitor=$!
    BACKEND=$backend $PY bench/bench.py 2>&1 | tee "$RESULTS/bench-$backend.log" || true
    kill "$monitor" 2> /dev/null || true
    cp bench/results.json "$RESULTS/results-$backend.json" 2> /dev/null || true
done
[[ -n ${OUT:-} ]] && cp "$RESULTS"/* "$OUT"/ 2> /dev/null || true
echo "wrote $RESULTS/"
