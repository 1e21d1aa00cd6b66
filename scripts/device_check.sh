#!/usr/bin/env bash
# GPU check on a lent GPU host: the GPU-marked tests, then a small main job (experiments.failover)
# with every worker its own process on the GPU (sharing it when the host has fewer GPUs than
# workers; faults are SIGKILL). JAX with CUDA is installed there and nothing can be downloaded:
# the packages it lacks travel as wheels in .whl/ (made here, where pip works):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl pyzmq==27.3.0 ml_collections==1.1.0
# Run from the repository root there; results go to $OUT (or /tmp/device_check).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/device_check}"
mkdir -p "$out"
gpus=$(python3 -c "import jax; print(len(jax.devices('gpu')))")
echo "jax $(python3 -c 'import jax; print(jax.__version__)'), $gpus GPU(s)"
JAX_PLATFORMS=cuda,cpu python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
  2>&1 | tee "$out/pytest_gpu.log"
# The driver computes nothing on the GPU (and its local-runtime comparison needs 8 CPU devices).
JAX_PLATFORMS=cpu python3 -m experiments.failover --config.runtime=process \
  --config.platform=cuda --config.devices="$gpus" --config.reps=1 --config.fault_at_s=1.5 \
  --config.workload.num_requests=16 --config.workload.output_len=64 \
  --config.throughput_requests=8 --config.warm_all_buckets=False \
  --compile_cache=/tmp/tarragon_jax_cache --workdir="$out/failover" 2>&1 \
  | grep -v "^[IW][0-9]" | tee "$out/failover.log"
