"""A calibrated cost model of failure stalls: the paper's baseline formulas, and Tarragon's.

The paper (Baseline section, Table 1) models a MegaScale-like global restart with a few terms:
T_w (worker re-init: process start, runtime init, weight load, communication setup), t_pre and
t_dec (prefill and decode time per layer) and g_pre, g_dec (the compute they stand for):

  AW failure:  T_stall = T_w + L*t_pre + ((i-1)*L + l)*t_dec
  EW failure:  T_stall = T_w + t_dec
  recompute:   G = M*[L*g_pre + ((i-1)*L + l)*g_dec]   (AW failure, M requests in flight)

where the failure hits layer l of the i-th decode iteration (i >= 1: i-1 decode iterations
were complete). Tarragon repairs only what failed; its stall is estimated here as

  AW failure:  T_stall = t_detect + t_catchup + m*(r_0 + b_kv(P+i-1)*beta) + u*t_step
  EW failure:  T_stall = t_detect + t_layer

with m the failed AW's requests, each restored from its last committed token (r_0 per request
plus beta seconds per KV byte, b_kv(n) the KV of n positions), t_catchup the wait of the first
restore for the store to apply what it has queued (this library restores from everything the
AWs have logged; the paper's store restores from its last commit record, i.e. t_catchup = 0
and a larger u), u uncommitted tokens recomputed per request (0 here) and t_layer one layer's
AW->EW->AW exchange, which the AWs that used the dead EW replay to its shadows. Why
this form: survivors keep decoding, so there is no T_w (the replacement is built in the
background) and no replay from the prompt; the failed requests wait for their detection and
then for the orchestrator, which restores them one after the other. Detection and restores are
added, not overlapped: in this engine detection ends the failing step and the restores run at
the next step boundary, so the sum bounds the service's zero-output gap from above (the two
differ only when detection is not instant: a hang; a kill is declared at once).

`calibrate` measures the terms on this machine for one engine shape; `paper_terms` holds
Table 1 (Mixtral-8x7B, 8 AW + 8 EW on H200); `extrapolate` scales a calibrated setting to
another architecture (`deepseek_v3`) from weight bytes and FLOPs, with `Assumptions` stating
every number that is not measured. Legend: L layers, i failure token index, l layer, M
requests in flight, m requests on the failed AW, P prompt length, E experts, X top-k.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.params import abstract_params
from tarragon_jax.resilience.detector import DetectionConfig
from tarragon_jax.serving.engine import Engine
from tarragon_jax.worker.buckets import bucket
from tarragon_jax.worker.calls import wait
from tarragon_jax.worker.requests import Request


@dataclasses.dataclass(frozen=True)
class CostTerms:
  """The terms of the stall and recompute formulas for one setting (model, cluster, machine)."""

  name: str
  num_layers: int  # L
  T_w: float  # s, re-init of the workers in a global restart
  t_pre: float  # s, one prefill iteration of the in-flight prompts, per layer
  t_dec: float  # s, one decode iteration per layer (a whole step / L: step overheads included)
  g_pre: float  # FLOPs, one request's prompt (P tokens) through one layer
  g_dec: float  # FLOPs, one decoded token through one layer
  prompt_len: int  # P
  detect_s: float  # s, from the missing output to the worker declared failed
  restore_s: float  # s, fixed cost of restoring one request (r_0)
  restore_s_per_byte: float  # s per byte of KV a restore moves (beta)
  catchup_s: float  # s, once per AW failure: the store applies its queue before the first read
  kv_bytes_per_token: int  # bytes of KV per position, all layers
  t_layer: float  # s, one layer's AW->EW->AW exchange alone (what an EW failure replays)
  tail_tokens: float = 0.0  # u, uncommitted tokens recomputed per restored request

  def __post_init__(self):
    if not isinstance(self.num_layers, int) or self.num_layers < 1:
      raise ValueError(f"CostTerms {self.name}: num_layers={self.num_layers!r} must be an int "
                       f">= 1")
    for field in ("T_w", "t_pre", "t_dec", "g_pre", "g_dec", "detect_s", "restore_s",
                  "restore_s_per_byte", "catchup_s", "t_layer", "tail_tokens"):
      value = getattr(self, field)
      if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"CostTerms {self.name}: {field}={value!r} must be finite and >= 0")
    if self.prompt_len < 1 or self.kv_bytes_per_token < 0:
      raise ValueError(f"CostTerms {self.name}: prompt_len={self.prompt_len} must be >= 1 and "
                       f"kv_bytes_per_token={self.kv_bytes_per_token} >= 0")

  @property
  def t_step(self) -> float:
    """s, one decode iteration (every layer): the ordinary time between two tokens."""
    return self.num_layers * self.t_dec

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), t_step=self.t_step)


def _check(c: CostTerms, i, layer: int):
  if np.any(np.asarray(i) < 1):
    raise ValueError(f"failure token index i={i} must be >= 1 (the i-th decode iteration)")
  if not 0 <= layer < c.num_layers:
    raise ValueError(f"layer={layer} must be in [0, L={c.num_layers})")


def baseline_stall_aw(c: CostTerms, i, layer: int = 0):
  """s, global restart after an AW failure at layer `layer` of decode iteration i (array ok):
  re-init, re-prefill, re-decode (i-1) tokens and `layer` layers. T_w + L*t_pre + ((i-1)*L +
  l)*t_dec."""
  _check(c, i, layer)
  L = c.num_layers
  return c.T_w + L * c.t_pre + ((np.asarray(i) - 1) * L + layer) * c.t_dec


def baseline_stall_ew(c: CostTerms):
  """s, global restart after an EW failure, as the paper writes it: T_w + t_dec (the AWs keep
  their KV; only the interrupted layer is redone)."""
  return c.T_w + c.t_dec


def baseline_recompute(c: CostTerms, i, layer: int = 0, in_flight: int = 1):
  """FLOPs recomputed after an AW failure with restart: M*[L*g_pre + ((i-1)*L + l)*g_dec].

  With g_pre = P and g_dec = 1 (`dataclasses.replace`) it counts token-layers instead.
  """
  _check(c, i, layer)
  L = c.num_layers
  return in_flight * (L * c.g_pre + ((np.asarray(i) - 1) * L + layer) * c.g_dec)


def restore_time(c: CostTerms, kv_bytes):
  """s, restoring one request whose committed KV is `kv_bytes`: r_0 + beta*bytes."""
  return c.restore_s + c.restore_s_per_byte * np.asarray(kv_bytes)


def tarragon_stall_aw(c: CostTerms, i, failed_requests: int):
  """s, Tarragon after an AW failure in decode iteration i: detection, the store's catch-up,
  each of the failed AW's `failed_requests` restored from its committed KV (P + i - 1
  positions), then the uncommitted tail recomputed."""
  _check(c, i, 0)
  kv = c.kv_bytes_per_token * (c.prompt_len + np.asarray(i) - 1)
  return (c.detect_s + c.catchup_s + failed_requests * restore_time(c, kv)
          + c.tail_tokens * c.t_step)


def tarragon_stall_ew(c: CostTerms):
  """s, Tarragon after an EW failure: detection, then one layer replayed to the shadows."""
  return c.detect_s + c.t_layer


def tarragon_recompute(c: CostTerms, layer: int, failed_requests: int):
  """FLOPs recomputed by Tarragon after an AW failure at `layer`: the failed step's layers
  and the uncommitted tail, for the failed AW's requests only."""
  return failed_requests * (c.tail_tokens * c.num_layers + layer) * c.g_dec


# -- architectures: weight bytes and FLOPs --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What the extrapolation needs of a model: parameter counts by kind, KV size, weight bytes."""

  name: str
  num_layers: int  # L
  moe_layers: int  # layers with routed experts
  num_experts: int  # E routed experts per MoE layer
  top_k: int  # X
  expert_params: int  # one routed expert of one layer
  dense_params: int  # every other weight: attention, norms, routers, shared/dense MLPs, embeddings
  layer_dense_params: float  # non-routed weights a token passes through per layer (mean over L)
  kv_bytes_per_token_layer: int
  weight_bytes: float  # bytes per parameter as served

  @classmethod
  def from_config(cls, cfg: ModelConfig, name: str = "") -> Architecture:
    """Counts `cfg`'s weights from its parameter declaration (`abstract_params`)."""
    p = abstract_params(cfg)

    def size(tree) -> int:
      return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))

    routed = size(p.layers.moe.experts)
    layers = size(p.layers) - routed
    item = np.dtype(cfg.dtype).itemsize
    return cls(name or cfg.family, cfg.num_layers, cfg.num_layers, cfg.num_experts, cfg.top_k,
               routed // (cfg.num_layers * cfg.num_experts), size(p) - routed,
               layers / cfg.num_layers, 2 * cfg.num_kv_heads * cfg.head_dim * item, item)

  @property
  def params(self) -> int:
    return self.dense_params + self.moe_layers * self.num_experts * self.expert_params

  @property
  def active_params_per_layer(self) -> float:
    """Weights one token multiplies per layer (mean over layers): dense + its top-k experts."""
    return (self.layer_dense_params
            + self.top_k * self.expert_params * self.moe_layers / self.num_layers)

  @property
  def flops_per_token_layer(self) -> float:
    """2 FLOPs per active weight; attention scores over the context are left out (short
    contexts: the paper's Random workload has 10 + 128 tokens)."""
    return 2.0 * self.active_params_per_layer

  def worker_weight_bytes(self, num_ew: int) -> float:
    """Bytes the largest worker loads on a restart: an AW holds every non-routed weight, an EW
    its share of the routed experts (primaries; the baseline has no shadows)."""
    per_ew = math.ceil(self.num_experts / num_ew) * self.moe_layers * self.expert_params
    return self.weight_bytes * max(self.dense_params, per_ew)

  def decode_bytes_per_layer(self, num_ew: int) -> float:
    """Weight bytes the busiest worker reads per decode layer (every expert an EW holds is hit
    at serving batch sizes)."""
    per_ew = math.ceil(self.num_experts / num_ew) * self.expert_params
    return self.weight_bytes * max(self.layer_dense_params, per_ew)


def mixtral_8x7b() -> ModelConfig:
  """Mixtral-8x7B's shape, as configs/mixtral_8x7b.py states it (bf16)."""
  return ModelConfig(family="mixtral", vocab_size=32_000, hidden_size=4096, num_layers=32,
                     num_heads=32, num_kv_heads=8, head_dim=128, num_experts=8, top_k=2,
                     expert_hidden=14_336, rope_theta=1e6, max_seq_len=4096, dtype="bfloat16")


def deepseek_v3() -> Architecture:
  """A DeepSeek-V3-sized model from its published config (671B parameters, 37B active).

  61 layers (the first 3 dense), hidden 7168, 128 heads with multi-head latent attention
  (q rank 1536, kv rank 512, rope dims 64, head dims 128 + 64 for q/k and 128 for v), 256
  routed experts top-8 and one shared expert of width 2048, dense MLP width 18432, vocabulary
  129280. Weights are served in FP8 (1 byte); the KV cache (MLA: 512 + 64 values per token
  and layer) in bf16. Norm weights are left out (< 0.01%).
  """
  D, L, dense_layers, V = 7168, 61, 3, 129_280
  attention = (D * 1536 + 1536 * 128 * (128 + 64)  # q down, q up (nope + rope)
               + D * (512 + 64) + 512 * 128 * (128 + 128)  # kv down (+ rope k), k/v up
               + 128 * 128 * D)  # output
  expert = 3 * D * 2048  # gate, up, down
  router = D * 256
  dense_mlp = 3 * D * 18_432
  moe_layers = L - dense_layers
  dense = (L * attention + moe_layers * (expert + router) + dense_layers * dense_mlp
           + 2 * V * D)  # embedding and output head
  per_layer = (L * attention + moe_layers * (expert + router) + dense_layers * dense_mlp) / L
  return Architecture("deepseek_v3", L, moe_layers, 256, 8, expert, dense, per_layer,
                      (512 + 64) * 2, 1.0)


# -- settings beyond this machine -----------------------------------------------------------------

# Table 1 of the paper: Mixtral-8x7B, 8 AW + 8 EW on H200.
PAPER_T_W = 18.5
PAPER_T_PRE = 2.18e-3
PAPER_T_DEC = 0.85e-3
PAPER_NUM_AW = PAPER_NUM_EW = 8
PAPER_BASELINE_STALL_S = 64.0  # the measured zero-throughput window (Fig. 9)


@dataclasses.dataclass(frozen=True)
class Assumptions:
  """Every number of the paper setting and of the extrapolation that is not measured."""

  # Weight load per worker (local NVMe through host memory into the device): with it, T_w =
  # T_w0 + bytes/load_bw, and T_w0 (process start, runtime init, communication setup) is what
  # is left of Table 1's 18.5 s for Mixtral's largest worker (an EW, 11.3 GB).
  load_bw: float = 2e9  # bytes/s
  # A per-request restore: one orchestrator round trip and the store's one-sided write of the
  # KV into the new AW (the paper's RDMA path; one 200 Gb/s NIC per AW).
  restore_s: float = 1e-3
  restore_bw: float = 25e9  # bytes/s
  detect_s: float = 0.02  # two 10 ms probe intervals (the paper's evaluation probes every 10 ms)
  prompt_len: int = 10  # the paper's "Random" workload: 10 prompt tokens, 128 output tokens

  def __post_init__(self):
    for field in ("load_bw", "restore_bw"):
      if not getattr(self, field) > 0:
        raise ValueError(f"Assumptions: {field}={getattr(self, field)} must be > 0")


def paper_terms(assume: Assumptions = Assumptions()) -> CostTerms:
  """Table 1's terms (Mixtral-8x7B, 8 AW + 8 EW, H200); g from Mixtral's weights, Tarragon's
  terms from `assume`."""
  arch = Architecture.from_config(mixtral_8x7b(), "mixtral_8x7b")
  return CostTerms(
      name="paper: Mixtral-8x7B, 8 AW + 8 EW, H200", num_layers=arch.num_layers, T_w=PAPER_T_W,
      t_pre=PAPER_T_PRE, t_dec=PAPER_T_DEC,
      g_pre=assume.prompt_len * arch.flops_per_token_layer, g_dec=arch.flops_per_token_layer,
      prompt_len=assume.prompt_len, detect_s=assume.detect_s, restore_s=assume.restore_s,
      restore_s_per_byte=1 / assume.restore_bw, catchup_s=0.0,
      kv_bytes_per_token=arch.num_layers * arch.kv_bytes_per_token_layer, t_layer=PAPER_T_DEC)


def extrapolate(target: Architecture, *, ref: CostTerms, ref_arch: Architecture,
                num_ew: int = PAPER_NUM_EW, ref_num_ew: int = PAPER_NUM_EW,
                assume: Assumptions = Assumptions(), name: str = "") -> CostTerms:
  """`ref`'s terms scaled to `target` on the same kind of device and workers.

  - T_w = T_w0 + (largest worker's weight bytes) / load_bw, T_w0 = ref.T_w minus ref's load.
  - t_dec scales with the weight bytes the busiest worker reads per layer (decode is
    memory-bound), t_pre with FLOPs per token and layer (prefill is compute-bound; FP8's faster
    tensor cores are not credited). Both scale ref's fixed per-layer overheads (launches,
    transfers) too, so they err on the high side when those dominate.
  - g_pre, g_dec: 2 FLOPs per active weight; Tarragon's terms from `assume`.

  Raises:
    ValueError: `assume.load_bw` is so low that ref's load alone exceeds ref.T_w.
  """
  ref_load = ref_arch.worker_weight_bytes(ref_num_ew) / assume.load_bw
  T_w0 = ref.T_w - ref_load
  if T_w0 < 0:
    raise ValueError(f"extrapolate: loading {ref_arch.name}'s largest worker at "
                     f"{assume.load_bw / 1e9:.2f} GB/s takes {ref_load:.1f} s > T_w = "
                     f"{ref.T_w:.1f} s; raise Assumptions.load_bw")
  t_dec = ref.t_dec * target.decode_bytes_per_layer(num_ew) / ref_arch.decode_bytes_per_layer(
      ref_num_ew)
  flops = target.flops_per_token_layer
  return CostTerms(
      name=name or target.name, num_layers=target.num_layers,
      T_w=T_w0 + target.worker_weight_bytes(num_ew) / assume.load_bw,
      t_pre=ref.t_pre * flops / ref_arch.flops_per_token_layer, t_dec=t_dec,
      g_pre=assume.prompt_len * flops, g_dec=flops, prompt_len=assume.prompt_len,
      detect_s=assume.detect_s, restore_s=assume.restore_s,
      restore_s_per_byte=1 / assume.restore_bw, catchup_s=0.0,
      kv_bytes_per_token=target.num_layers * target.kv_bytes_per_token_layer, t_layer=t_dec)


# -- calibration on this machine ------------------------------------------------------------------


def detection_latency(detection: DetectionConfig, fault_kind: str = "kill") -> float:
  """s, expected detection latency: a killed worker is declared at once (in this process it
  raises; a dead worker process drops its probe connection and its port refuses: a few ms
  for the kernel to say so); a hung one after the detection window (one interval of silence,
  one unanswered probe interval)."""
  return 0.0 if fault_kind == "kill" else detection.window_s


def _settle(engine):
  """Blocks until every worker's dispatched work is done."""
  if engine.runtime.remote:
    for w in engine.state.aws + engine.state.ews:
      wait(w.sync())
  else:
    jax.block_until_ready([aw.x for aw in engine.state.aws])


def _timed_step(engine) -> float:
  start = time.perf_counter()
  engine.step()  # fetches the sampled tokens: synchronous
  return time.perf_counter() - start


def _layer_times(engine, reps: int) -> list[float]:
  """One decode layer through every worker, as `Engine.step` dispatches it (idle engine)."""
  B, cfg = engine.engine_cfg.slots_per_aw, engine.cfg
  out = []
  for r in range(reps + 1):  # the first pass is not recorded
    for aw in engine.state.aws:
      wait(aw.begin(engine.iteration, np.zeros((B, 1), np.int32), np.ones((B,), np.int32),
                    np.zeros((B,), bool)))
    _settle(engine)
    start = time.perf_counter()
    engine.run_layer(r % cfg.num_layers, list(range(len(engine.state.aws))), B * cfg.top_k)
    _settle(engine)
    if r:
      out.append(time.perf_counter() - start)
  return out


def _restore_all(engine, ids: list[int]) -> list[tuple[int, float]]:
  """Times the real restore path (store catch-up, committed KV read, write into the AW) for
  each request, into its own slot: nothing changes but the timing. (bytes, seconds) each."""
  rec = engine.recovery
  out = []
  for rid in ids:
    s = engine.requests[rid]
    s.failed_at, s.lost_layer = (s.cached, len(s.feed)), 0
    rec.restore(s)
    out.append((rec.restores[-1]["bytes"], rec.restores[-1]["seconds"]))
  return out


def fit_restore(samples: list[tuple[int, float]], spread: float = 4.0) -> tuple[float, float]:
  """(r_0 s, beta s/byte) of restore time = r_0 + beta*bytes, least squares; beta = 0 (and
  r_0 the median) when the sizes spread less than `spread`x (the slope would be noise) or
  the fit comes out negative."""
  b = np.asarray([s[0] for s in samples], float)
  t = np.asarray([s[1] for s in samples], float)
  if len(samples) >= 2 and b.max() > spread * b.min():
    beta, r0 = np.polyfit(b, t, 1)
    if beta > 0 and r0 >= 0:
      return float(r0), float(beta)
  return float(np.median(t)), 0.0


def calibrate(cfg: ModelConfig, params, engine_cfg, *, runtime=None, num_requests: int,
              prompt_len: int, decode_steps: int = 8, reps: int = 3, layer_reps: int = 4,
              restarts: int = 1, fault_kind: str = "kill", seed: int = 0,
              name: str = "this machine") -> tuple[CostTerms, dict]:
  """Measures the cost terms of `engine_cfg`'s engine shape on this machine.

  Builds one Engine (Tarragon recovery, snapshots on; `runtime` None = the local runtime, or a
  `ProcessRuntime`), compiles decode and the prompts' prefill bucket, then:
  - t_pre, t_dec: `reps` batches of `num_requests` prompts of `prompt_len` tokens (the first
    batch untimed); the prefill iteration and the median decode iteration, whole
    `Engine.step`s (sampling, fetching tokens and host scheduling included) divided by L;
    t_layer: one decode layer's exchange alone (`Engine.run_layer`), median of `layer_reps`;
  - r_0, beta, t_catchup: every request restored through the real path (`Recovery.restore`)
    after its prefill and again before its last step; `fit_restore` of all but the first
    restore of each round (a tiny model's KV is too small for a per-byte term: beta then
    stays 0); t_catchup = the median first restore of a round (it waits for the store to
    apply the step just logged) minus r_0;
  - T_w: `restarts` global restarts (`Recovery.restart`: teardown, cleared caches, orbax
    weights, rebuilt workers (new processes in the process runtime), compile of decode and the
    in-flight prompts' bucket) with `num_requests` requests in flight; the median total;
  - g_pre, g_dec: from the weights (2 FLOPs per active weight); detect: `detection_latency`.

  Returns:
    (CostTerms, details): details has every raw sample, the restart phases and the steps right
    after the last restart (cold: first executions after a restart).
  """
  if num_requests < 1 or decode_steps < 2 or reps < 2 or restarts < 1 or layer_reps < 1:
    raise ValueError(f"calibrate: need num_requests >= 1 (got {num_requests}), decode_steps >= 2 "
                     f"({decode_steps}), reps >= 2 ({reps}), layer_reps >= 1 ({layer_reps}) "
                     f"and restarts >= 1 ({restarts})")
  slots = engine_cfg.plan.num_aw * engine_cfg.slots_per_aw
  if num_requests > slots:
    raise ValueError(f"calibrate: num_requests={num_requests} do not fit the engine's {slots} "
                     f"request slots (num_aw * slots_per_aw); every request of a batch must be "
                     f"placed at once")
  rc = dataclasses.replace(engine_cfg.resilience, recovery="tarragon", snapshots=True)
  engine = Engine(cfg, params, dataclasses.replace(engine_cfg, resilience=rc), runtime=runtime)
  rng = np.random.default_rng(seed)

  def submit(max_new: int) -> list[int]:
    prompts = rng.integers(0, cfg.vocab_size, (num_requests, prompt_len))
    return [engine.submit(Request(tuple(int(t) for t in p), max_new)) for p in prompts]

  L = cfg.num_layers
  prefill, decode, rounds = [], [], []
  try:
    engine.warm_up([1, bucket(prompt_len, engine_cfg.min_prefill_bucket, cfg.max_seq_len)])
    for rep in range(reps):
      ids = submit(decode_steps + 1)
      first = _timed_step(engine)
      samples = [_restore_all(engine, ids)]
      steps = [_timed_step(engine) for _ in range(decode_steps - 1)]
      samples.append(_restore_all(engine, ids))
      steps.append(_timed_step(engine))
      if not engine.idle:
        raise RuntimeError("calibrate: the batch did not finish in 1 + decode_steps iterations")
      if rep:  # the first batch runs every executable once; it is not recorded
        prefill.append(first)
        decode += steps
        rounds += samples
    layers = _layer_times(engine, layer_reps)
    phases, cold = [], []
    for _ in range(restarts):
      ids = submit(3)
      engine.step()
      engine.step()  # prefill and one decode step: the requests are in flight
      engine.recovery.restart()
      phases.append(engine.timeline.of("global_restart")[-1])
    cold = [_timed_step(engine) for _ in range(3)]  # re-prefill, then the decode steps
  finally:
    engine.close()
  r0, beta = fit_restore([s for r in rounds for s in r[1:]] or [s for r in rounds for s in r])
  first = float(np.median([r[0][1] - beta * r[0][0] for r in rounds]))
  arch = Architecture.from_config(cfg)
  T_w = float(np.median([p["total_s"] for p in phases]))
  terms = CostTerms(
      name=name, num_layers=L, T_w=T_w, t_pre=float(np.median(prefill)) / L,
      t_dec=float(np.median(decode)) / L, g_pre=prompt_len * arch.flops_per_token_layer,
      g_dec=arch.flops_per_token_layer, prompt_len=prompt_len,
      detect_s=detection_latency(rc.detection, fault_kind),
      restore_s=r0, restore_s_per_byte=beta, catchup_s=max(0.0, first - r0),
      kv_bytes_per_token=L * arch.kv_bytes_per_token_layer,
      t_layer=float(np.median(layers)))
  keep = ("teardown_s", "clear_caches_s", "weight_load_s", "rebuild_s", "compile_s", "total_s")
  details = dict(
      prefill_step_s=prefill, decode_step_s=decode, layer_s=layers,
      restores=[[dict(bytes=b, seconds=s) for b, s in r] for r in rounds],
      restart_phases=[{k: p[k] for k in keep if k in p} for p in phases],
      # the first prefill and decode after a restart, and warm ones (the formula's t_pre and
      # t_dec are warm; a restarted worker's first executions may not be)
      cold_steps_after_restart_s=cold,
      cold_prefill_decode_s=cold[0] + cold[1],
      warm_prefill_decode_s=float(np.median(prefill)) + float(np.median(decode)),
      runtime="process" if engine.runtime.remote else "local",
      num_requests=num_requests, prompt_len=prompt_len)
  return terms, details
