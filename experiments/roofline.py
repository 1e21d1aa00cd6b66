"""The memory-bandwidth roofline of MoE decode: bytes a step must read, the device's bandwidth,
random weights made on the device, and the expert-kernel variants the model benchmark times.

Bytes a decode step must read at batch B with S cached positions per row (`step_bytes`):
  * every weight outside the experts, once (attention, norms, router, shared expert, final norm,
    lm_head), plus the embedding rows of the step's distinct tokens;
  * the experts the step activates: with each of the B tokens picking top_k of E experts
    uniformly at random and independently of the other tokens, an expert is missed by one token
    with probability 1 - k/E, so the expected number of distinct experts per layer is
    E * (1 - (1 - k/E)^B) (1 token: k; many tokens: -> E). Random weights route close to
    uniformly; a trained router is more skewed, which only lowers this count;
  * the KV cache: B * S * layers * 2 (k and v) * kv_heads * head_dim * bytes per element.
Writes (one token's KV, the logits) are a rounding error at decode and are not counted. The
fraction of bandwidth a kernel reaches is these bytes / step time / the device's bandwidth. A
kernel that reads more than it must (the capacity kernel runs every expert's buffer, a dense
lowering of ragged_dot multiplies by every expert) is charged only for what it must read: its
fraction is the share of the roofline it reaches, not its own traffic; `dense_total` is what a
kernel that reads every expert moves.
"""

from __future__ import annotations

import math
import re
import time

import jax
import jax.numpy as jnp
import ml_collections

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.params import ModelParams, ParamSpec, param_specs

# Peak memory bandwidth from the vendors' datasheets, bytes/s, by device kind (a regex on
# `device.device_kind`, first match wins). What a copy reaches is lower, hence the measured
# bandwidth beside it.
DATASHEET_BANDWIDTH = (
    (r"\bH200\b", 4.8e12, "H200 SXM, HBM3e"),
    (r"\bH100 PCIe\b", 2.0e12, "H100 PCIe, HBM2e"),
    (r"\bH100 NVL\b", 3.9e12, "H100 NVL, HBM3"),
    (r"\bH100\b", 3.35e12, "H100 SXM, HBM3"),
    (r"\bA100.*80GB\b", 2.039e12, "A100 80GB SXM, HBM2e"),
)

# The expert kernels the benchmark times: name -> (ModelConfig changes, JAX config flags set
# while tracing, XLA compiler options). The ragged_* variants are other lowerings of the same
# `jax.lax.ragged_dot`: by default XLA:GPU expands it into a dense dot over every expert.
KERNEL_VARIANTS = {
    "ragged": (dict(expert_kernel="ragged"), {}, {}),
    "capacity": (dict(expert_kernel="capacity"), {}, {}),
    # Sort-and-pad with buffers twice the default: fewer layers overflow into the exact branch.
    "capacity_x4": (dict(expert_kernel="capacity", capacity_factor=4.0), {}, {}),
    # The layer scan slices each layer's stacked weights; XLA copies that slice (every expert,
    # every step) before a GEMM reads it, unless it may run the GEMM in place on the slice.
    "capacity_dsf": (dict(expert_kernel="capacity"), {},
                     {"xla_gpu_enable_dynamic_slice_fusion": True}),
    # cuDNN's grouped GEMM for forward-shaped ragged dots (XLA needs cuDNN >= 9.22, Ampere+).
    "ragged_cudnn": (dict(expert_kernel="ragged"), {},
                     {"xla_gpu_experimental_use_ragged_dot_fusion": True}),
    # JAX's own Pallas/Triton lowering (only in JAX builds that ship its module).
    "ragged_pallas": (dict(expert_kernel="ragged"),
                      {"jax_ragged_dot_use_gpu_pallas_triton_lowering": True}, {}),
}


def add_fields(c: ml_collections.ConfigDict, *, batches=(1, 16), kernels=("ragged", "capacity"),
               context_len: int = 256, steps: int = 8, reps: int = 3, bandwidth_mib: int = 256):
  """Adds the fields of the benchmark's roofline mode (`baseline = "none"`) to a config."""
  c.baseline = "none"  # "hf": compare with Hugging Face on CPU; "none": the roofline table
  c.decode_batches = tuple(batches)  # batch 1, and a serving batch
  c.kernels = tuple(kernels)  # names in roofline.KERNEL_VARIANTS
  # Each timed run starts every row at context_len cached positions (its length is set; the KV
  # is zeros, which reads like any other) and decodes `decode_steps` random tokens; `reps` runs
  # per kernel, kernels interleaved, after one untimed run; the median run gives ms/step.
  c.context_len = context_len
  c.decode_steps = steps
  c.reps = reps
  # The measured bandwidth: the best of `bandwidth_reps` sums over, and in-place scalings of, an
  # f32 array of this many MiB (larger than any cache).
  c.bandwidth_mib = bandwidth_mib
  c.bandwidth_reps = 10


def _bytes(spec: ParamSpec, itemsize: int) -> int:
  return math.prod(spec.shape) * itemsize


def _leaves(tree) -> list[ParamSpec]:
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, ParamSpec))


def param_bytes(cfg: ModelConfig) -> int:
  """Bytes of every weight of `cfg`'s model in its dtype."""
  itemsize = jnp.dtype(cfg.dtype).itemsize
  return sum(_bytes(s, itemsize) for s in _leaves(param_specs(cfg)))


def expected_experts(num_experts: int, top_k: int, tokens: int) -> float:
  """Expected distinct experts that `tokens` tokens activate in one layer, each picking `top_k`
  of `num_experts` uniformly and independently: E * (1 - (1 - k/E)^tokens)."""
  return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def step_bytes(cfg: ModelConfig, batch: int, kv_positions: float) -> dict:
  """Bytes one decode step of `batch` rows must read (the module docstring's model).

  Args:
    cfg: the model.
    batch: rows decoded together, one new token each.
    kv_positions: cached positions each row attends over (mean over the timed steps).
  Returns:
    {"weights", "kv", "total": bytes that must be read; "dense_total": the same with every
    expert read; "active_experts": expected distinct experts per layer}.
  """
  itemsize = jnp.dtype(cfg.dtype).itemsize
  specs = param_specs(cfg)
  L, E, V = cfg.num_layers, cfg.num_experts, cfg.vocab_size
  experts = sum(_bytes(s, itemsize) for s in _leaves(specs.layers.moe.experts))
  embed = _bytes(specs.embed, itemsize)
  rest = param_bytes(cfg) - experts - embed  # read whole every step
  active = expected_experts(E, cfg.top_k, batch)
  rows = expected_experts(V, 1, batch) * embed / V  # the distinct tokens' embedding rows
  weights = rest + rows + experts * active / E
  kv = batch * kv_positions * L * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize
  return dict(weights=weights, kv=kv, total=weights + kv, dense_total=rest + rows + experts + kv,
              active_experts=active)


def capacity_overflow(cfg: ModelConfig, batch: int) -> float:
  """Probability that one layer of the capacity kernel overflows at decode batch `batch`, so
  that its exact branch (every expert over every token) runs instead: some expert gets more than
  C = ceil(capacity_factor * B * k / E) tokens. One expert's load is Binomial(B, k/E) under the
  routing model above; experts are treated as independent, an approximation."""
  M, E = batch * cfg.top_k, cfg.num_experts
  capacity = min(M, max(1, math.ceil(cfg.capacity_factor * M / E)))
  if capacity >= batch:  # an expert sees each token at most once
    return 0.0
  p = cfg.top_k / E
  fits = sum(math.comb(batch, j) * p**j * (1 - p) ** (batch - j) for j in range(capacity + 1))
  return 1.0 - fits**E


def datasheet_bandwidth(device) -> tuple[float, str] | None:
  """(bytes/s, what) from the vendor's datasheet for `device`'s kind, or None if unknown."""
  for pattern, bw, what in DATASHEET_BANDWIDTH:
    if re.search(pattern, device.device_kind):
      return bw, what
  return None


def measure_bandwidth(nbytes: int, reps: int, device=None) -> dict:
  """The device's memory bandwidth, measured: the best of `reps` timings of a jitted sum over an
  f32 array of `nbytes` (bytes read / s) and of an in-place scaling of it (read + written / s);
  "bandwidth" is the higher of the two.

  Best, not median: a roofline is the most the memory delivers. Each timing covers 4
  back-to-back calls, so that dispatch overlaps the previous call instead of being timed. The
  scaling donates its input, so that it writes memory already touched (on CPU a fresh buffer
  costs page faults, not bandwidth).
  """
  device = device or jax.devices()[0]
  x = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), device).block_until_ready()
  read, scale = jax.jit(jnp.sum), jax.jit(lambda a: a * 0.5, donate_argnums=0)
  read(x).block_until_ready()  # compile both
  x = scale(x).block_until_ready()
  times = {"read": [], "read_write": []}
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready([read(x) for _ in range(4)])
    times["read"].append((time.perf_counter() - t0) / 4)
    t0 = time.perf_counter()
    for _ in range(4):
      x = scale(x)
    x.block_until_ready()
    times["read_write"].append((time.perf_counter() - t0) / 4)
  moved = x.nbytes
  x.delete()
  out = {"read": moved / min(times["read"]), "read_write": 2 * moved / min(times["read_write"])}
  # The roofline is the higher: XLA:CPU sums on one thread but scales on all of them.
  return dict(out, bandwidth=max(out.values()))


def random_params(cfg: ModelConfig, key: jax.Array, device=None) -> ModelParams:
  """Random weights (normal(0, 1/sqrt(fan_in)), unit norms, zero biases) made on `device` in
  `cfg.dtype`: nothing passes through host memory or float32.

  Each layer-stacked weight is drawn one layer at a time (`lax.map`): drawing a whole stacked
  expert weight at once needs its random bits as one uint32 temporary, as large as the weight
  itself in float32 (38 GB for one of Qwen3-30B-A3B's), which does not fit beside the model.
  """
  device = device or jax.devices()[0]
  specs = _leaves(param_specs(cfg))
  treedef = jax.tree.structure(param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))
  dtype = jnp.dtype(cfg.dtype)

  def make(spec: ParamSpec, k):
    if spec.init in ("ones", "zeros"):
      return (jnp.ones if spec.init == "ones" else jnp.zeros)(spec.shape, dtype)
    std = 1.0 / math.sqrt(spec.fan_in)
    if spec.axes[0] == "layers":
      return jax.lax.map(lambda kk: std * jax.random.normal(kk, spec.shape[1:], dtype),
                         jax.random.split(k, spec.shape[0]))
    return std * jax.random.normal(k, spec.shape, dtype)

  def init(key):
    keys = jax.random.split(key, len(specs))
    return jax.tree.unflatten(treedef, [make(s, keys[i]) for i, s in enumerate(specs)])

  sharding = jax.sharding.SingleDeviceSharding(device)
  return jax.jit(init, out_shardings=sharding)(key)


def variant_config(cfg: ModelConfig, name: str) -> ModelConfig:
  """`cfg` with kernel variant `name`'s expert kernel (and capacity factor).

  Raises:
    ValueError: `name` is not a variant.
  """
  if name not in KERNEL_VARIANTS:
    raise ValueError(f"kernel {name!r}; the variants are {sorted(KERNEL_VARIANTS)}")
  return cfg.replace(**KERNEL_VARIANTS[name][0])


def compile_variant(fn, name: str, args: tuple, cfg: ModelConfig):
  """`fn` (a jitted function whose second argument is the static ModelConfig) lowered and
  compiled for kernel variant `name`, with the variant's JAX flags and XLA options.

  Returns:
    (the compiled function, called with `args` less the config; the library calls in its
    compiled HLO, which show whether a lowering other than the default engaged).
  Raises:
    ValueError: `name` is not a variant. Anything the lowering raises where the variant is not
    available (an unknown flag or option, a missing module, an unsupported device).
  """
  cfg = variant_config(cfg, name)
  _, flags, options = KERNEL_VARIANTS[name]
  old = {flag: getattr(jax.config, flag) for flag in flags}
  try:
    for flag, value in flags.items():
      jax.config.update(flag, value)
    lowered = fn.lower(args[0], cfg, *args[1:])
  finally:
    for flag, value in old.items():
      jax.config.update(flag, value)
  compiled = lowered.compile(compiler_options=options or None)
  # Library calls (cuBLAS, cuDNN, Triton: custom-call targets, custom fusions' kinds).
  found = re.findall(r'custom_call_target="([^"]+)"|"kind":"(__[^"]+)"', compiled.as_text() or "")
  return compiled, sorted({a or b for a, b in found})
