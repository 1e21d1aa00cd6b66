#!/usr/bin/env bash
# GPU check on a lent GPU host, in at most ~6 minutes: the GPU-marked tests; the model benchmark at
# a real shape (experiments.bench_model: decode tokens/s and the fraction of the memory bandwidth
# per expert kernel, batch 1 and 64) with the largest config the card holds (Mixtral-8x7B on
# >= 110 GB, Qwen3-30B-A3B on an 80 GB card); then the main job (experiments.failover) on a 1.1 GB
# model with every worker its own process on the GPU (sharing it when the host has fewer GPUs
# than workers; faults are SIGKILL), so that the baseline's restart reloads weights for real.
# Each step has a time limit (60, 150 and 150 s: it and its worker processes are killed past it,
# and the next step runs); each prints what it measured, and its whole log goes to
# $OUT/<step>.log; the end repeats what each measured.
# JAX with CUDA is installed there and nothing can be downloaded: the packages it lacks travel as
# wheels in .whl/ (made here, where pip works):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl pyzmq==27.3.0 ml_collections==1.1.0
# Run from the repository root there; results go to $OUT (or /tmp/device_check).
set -uo pipefail  # no -e: a step that fails or runs out of time is reported, and the next one runs
cd "$(dirname "$0")/.." || exit 1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/device_check}"
cache=/tmp/tarragon_jax_cache
mkdir -p "$out"
results=()
absl='^[IW][0-9]\{4\} '  # absl's info and warning lines (all kept in the logs)

# step NAME LIMIT_S COMMAND...: runs COMMAND for at most LIMIT_S seconds (then SIGTERM to it and
# its children, SIGKILL 10 s later); its output whole in $out/NAME.log, on the console without
# absl's info and warning lines.
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "=== $name (at most $limit s)"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep --line-buffered -v "$absl"
  rc=${PIPESTATUS[0]}
  results+=("$name: exit $rc after $((SECONDS - start)) s$( ((rc == 124 || rc == 137)) \
    && echo ' (time limit: cut short)')")
  echo "=== ${results[-1]}"
}

# JAX's version, the GPUs, and the memory JAX may take of the first (bytes_limit: 95% of it, as
# the benchmark runs with; nothing is preallocated for the question).
read -r version gpus limit kind < <(XLA_PYTHON_CLIENT_PREALLOCATE=false \
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python3 -c "import jax; d = jax.devices('gpu'); \
print(jax.__version__, len(d), d[0].memory_stats()['bytes_limit'], d[0].device_kind)")
if [[ -z "${kind:-}" ]]; then
  echo "no GPU that JAX can use"
  exit 1
fi
echo "jax $version, $gpus x $kind; JAX may use $((limit / 1000000000)) GB of the first"

step gpu_tests 60 env JAX_PLATFORMS=cuda,cpu python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_gpu.py

# Weights + the batch-64 KV cache: Mixtral-8x7B 93.4 + 8.6 GB, Qwen3-30B-A3B 61.1 + 6.5 GB (bf16).
if ((limit >= 110000000000)); then
  model=mixtral_8x7b
elif ((limit >= 70000000000)); then
  model=qwen3_moe
else
  model=""
  results+=("bench_model: skipped, $((limit / 1000000000)) GB is too little for a real shape")
fi
if [[ -n "$model" ]]; then
  echo "model benchmark: configs/$model.py (the largest real shape this card holds)"
  step bench_model 150 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python3 -m experiments.bench_model \
    --config="configs/$model.py" --compile_cache="$cache" --workdir="$out/bench_model"
fi

# The driver computes nothing on the GPU (and its local-runtime comparison needs 8 CPU devices).
# Its workdir holds the model's weights too (1.1 GB): only its result files are copied to $out.
rm -rf /tmp/device_check_failover  # (a checkpoint is not saved over an earlier run's)
step failover 150 env JAX_PLATFORMS=cpu python3 -m experiments.failover \
  --config=configs/failover_gpu.py --config.devices="$gpus" --compile_cache="$cache" \
  --workdir=/tmp/device_check_failover
mkdir -p "$out/failover"
find /tmp/device_check_failover -maxdepth 1 -type f -exec cp {} "$out/failover/" \;

# What each step measured, again at the end (the console shows only the tail of a long run).
echo "=== device check, $SECONDS s in all:"
printf '  %s\n' "${results[@]}"
if [[ -f "$out/gpu_tests.log" ]]; then
  echo "--- GPU tests:"
  grep -E "passed|failed|error|skipped" "$out/gpu_tests.log" | tail -n 3
fi
if [[ -f "$out/bench_model.log" ]]; then
  echo "--- model benchmark (configs/$model.py):"
  sed -n '/bandwidth measured/,$p' "$out/bench_model.log" | grep -v "$absl"
fi
if [[ -f "$out/failover.log" ]]; then
  echo "--- failover (configs/failover_gpu.py):"
  sed -n '/^mode /,$p' "$out/failover.log" | grep -v "$absl"
fi
