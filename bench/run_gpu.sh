#!/usr/bin/env bash
# The one prepared GPU script: GPU-only tests (bf16 and TF32 natively, large shapes, CUDA graphs), then the
# benchmarks against their peers, in one call. Results go to bench/results/ and, on the device machine, to $OUT.
#
# The device image has torch, triton, pytest, hypothesis, mpmath, scipy, matplotlib but not diffusers (the sampler
# benchmark's peer, and the diffusers tests). Carry it as wheels (device README): here, once,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#       diffusers==0.42.1 importlib_metadata
# and name .whl in `carry`; this script installs them when present. Without them the diffusers rows read n/a.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=bench/results
mkdir -p "$RESULTS"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 3
if ls .whl/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv > "$RESULTS/device.txt" 2>&1
python -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$RESULTS/gpu_tests.log"
python -m pytest -q -p no:cacheprovider tests/test_kernels_sampler_step.py tests/test_kernels_noising.py \
    tests/test_kernels_attention.py tests/test_rng.py 2>&1 | tee "$RESULTS/kernel_tests_native.log"
python bench/sampler_step.py --out "$RESULTS" 2>&1 | tee "$RESULTS/sampler_step.log"
python bench/attention.py --out "$RESULTS" 2>&1 | tee "$RESULTS/attention.log"
if python -c "import torch, sys; sys.exit(torch.cuda.device_count() < 2)"; then
    python bench/distributed_attention.py --out "$RESULTS" 2>&1 | tee "$RESULTS/distributed_attention.log"
else
    echo "one GPU: sequence-parallel attention not benchmarked (needs 2+)" | tee "$RESULTS/distributed_attention.log"
fi
if [ -n "${OUT:-}" ]; then cp -r "$RESULTS"/. "$OUT"/; fi
