"""The main job (experiments/failover.py) on a GPU host, with every worker its own process on the
GPU and a model large enough (1.1 GB of weights) that the baseline's restart reloads and
recompiles for real:

  JAX_PLATFORMS=cpu python -m experiments.failover --config=configs/failover_gpu.py \
    --config.devices=<GPUs on the host>

The driver computes nothing on the GPU (JAX_PLATFORMS=cpu: its local-runtime comparison needs 8
CPU devices). It also makes the weights and runs that comparison on the CPU, which is why the
model is float32: XLA's CPU matmuls run bf16 several times slower, and in bf16 those two take most
of the time. One repetition and a short workload, sized for scripts/device_check.sh's 150 s.
"""

import ml_collections

from configs import failover_tiny
from experiments.launch_config import model_dict


def get_config() -> ml_collections.ConfigDict:
  c = failover_tiny.get_config()
  c.model = model_dict(
      family="mixtral",
      vocab_size=32_000,
      hidden_size=1024,
      num_layers=4,
      num_heads=8,
      num_kv_heads=4,
      head_dim=128,
      num_experts=8,
      top_k=2,
      expert_hidden=2048,
      rope_theta=1e6,
      rms_eps=1e-5,
      max_seq_len=512,
      dtype="float32",
  )
  c.workdir = "runs/failover_gpu"
  c.runtime = "process"
  c.platform = "cuda"
  c.devices = 1  # GPUs the 8 worker slots share (pass the host's count)
  c.warm_all_buckets = False  # decode and one prefill bucket up front; the rest on first use
  c.fault_at_s = 1.5
  c.workload.num_requests = 16
  c.workload.output_len = 64
  c.throughput_requests = 8
  c.throughput_output_len = 32
  c.reps = 1
  c.rebuild_every = 0  # rebuilding would respawn every worker process
  return c
