"""The disaggregated serving engine: AWs and EWs on separate cells, driven in one process.

Each iteration is a prefill iteration (every AW with newly placed requests processes their
prompts, padded to a length bucket) or a decode iteration (every AW with running requests
generates one token per request). Within an iteration the engine walks the layers: every AW
attends and packs per-EW buffers, the buffers cross to the EWs, every EW runs one batched
expert call over all AWs' buffers, the results cross back, every AW combines. All of it is
dispatched asynchronously: nothing waits on a device until the sampled tokens are fetched.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

import numpy as np

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.params import ModelParams
from tarragon_jax.layers.sampling import SamplingParams
from tarragon_jax.mesh.cells import CellPlan, carve
from tarragon_jax.mesh.transfer import Transfers
from tarragon_jax.resilience.placement import place
from tarragon_jax.resilience.routing_table import RoutingTable
from tarragon_jax.serving.metrics import TokenEvent, latency_summary
from tarragon_jax.serving.requests import Phase, Request, RequestState
from tarragon_jax.serving.workers import AttentionWorker, ExpertWorker


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Cluster shape and batching. Frozen and validated; see README for what each field does."""

  plan: CellPlan = CellPlan()
  slots_per_aw: int = 8  # concurrent requests per AW (KV-cache slots)
  shadows_per_expert: int = 1
  ew_slots_per_layer: int | None = None  # expert slots per EW per layer (budget); None = fit
  min_prefill_bucket: int = 16  # prompts are padded to a power of two >= this
  deadline_s: float = 10.0  # a worker whose outputs are not ready by then is reported silent

  def __post_init__(self):
    if not self.deadline_s > 0:
      raise ValueError(f"EngineConfig: deadline_s={self.deadline_s} must be > 0")
    if self.slots_per_aw < 1:
      raise ValueError(f"EngineConfig: slots_per_aw={self.slots_per_aw} must be >= 1")
    if self.min_prefill_bucket < 1:
      raise ValueError(f"EngineConfig: min_prefill_bucket={self.min_prefill_bucket} must be >= 1")


class WorkerTimeout(RuntimeError):
  """Workers whose outputs did not arrive within the deadline (the failure-detection hook)."""

  def __init__(self, silent: list[str], waited_s: float):
    super().__init__(f"no output from {silent} within {waited_s:.3f} s")
    self.silent = silent


def await_outputs(outputs: dict[str, list], deadline_s: float, poll_s: float = 1e-4) -> float:
  """Waits until every worker's outputs are ready, or raises WorkerTimeout naming the silent ones.

  Data arriving is the heartbeat: nothing else is exchanged to know a worker is alive.
  Returns the seconds waited.
  """
  start = time.perf_counter()
  pending = dict(outputs)
  while pending:
    pending = {w: a for w, a in pending.items() if not all(x.is_ready() for x in a)}
    waited = time.perf_counter() - start
    if pending and waited > deadline_s:
      raise WorkerTimeout(sorted(pending), waited)
    if pending:
      time.sleep(poll_s)
  return time.perf_counter() - start


class Engine:
  """Serves requests on AW and EW cells carved from the visible devices.

  Use `submit` then `step` (or `run`), or `generate` for a batch. `on_token` callbacks receive
  every TokenEvent as it is produced.
  """

  def __init__(self, cfg: ModelConfig, params: ModelParams,
               engine_cfg: EngineConfig = EngineConfig(),
               devices=None, on_token: Callable[[TokenEvent], None] | None = None):
    self.cfg, self.engine_cfg = cfg, engine_cfg
    plan = engine_cfg.plan
    self.cells = carve(plan, devices)
    self.placement = place(cfg.num_layers, cfg.num_experts, plan.num_ew,
                           engine_cfg.ew_slots_per_layer, engine_cfg.shadows_per_expert)
    self.transfers = Transfers()
    self.aws = [AttentionWorker(i, c, cfg, params, engine_cfg.slots_per_aw, self.transfers)
                for i, c in enumerate(self.cells.aw)]
    self.ews = [ExpertWorker(i, c, cfg, params, self.placement, self.transfers)
                for i, c in enumerate(self.cells.ew)]
    self.set_routing_table(RoutingTable.from_placement(self.placement))
    self.requests: dict[int, RequestState] = {}
    self.waiting: list[int] = []
    self.events: list[TokenEvent] = []
    self.on_token = on_token
    self._next_id = 0
    self._slot_owner = [[-1] * engine_cfg.slots_per_aw for _ in self.aws]

  # -- routing ---------------------------------------------------------------------------------

  def set_routing_table(self, table: RoutingTable):
    """Installs a new routing table on every AW; compiles nothing (the table is array data).

    Raises:
      ValueError: the table leaves an expert unreachable, does not fit the placement, or points
        an expert at a slot that holds another expert. The old table stays installed.
    """
    unreachable = table.unreachable()
    if unreachable:
      raise ValueError(f"routing table leaves experts unreachable: {unreachable[:8]}")
    p = self.placement
    if table.slots_per_layer != p.slots_per_layer or table.replicas.shape[:2] != (
        p.num_layers, p.num_experts):
      raise ValueError(
          f"routing table (slots_per_layer={table.slots_per_layer}, [L, E] = "
          f"{list(table.replicas.shape[:2])}) does not match the engine's placement "
          f"(slots_per_layer={p.slots_per_layer}, [L, E] = [{p.num_layers}, {p.num_experts}])")
    S = p.slots_per_layer
    for (l, e), slot in np.ndenumerate(table.active):
      ew, local = divmod(int(slot), S)
      held = p.contents[l, ew, local] if ew < p.num_ew else -1
      if held != e:
        raise ValueError(f"routing table sends layer {l} expert {e} to slot {slot} (EW {ew}), "
                         f"which holds expert {held}")
    self.table = table
    self.active_tables = [aw.put(table.active) for aw in self.aws]

  # -- requests --------------------------------------------------------------------------------

  def submit(self, request: Request, arrival: float | None = None) -> int:
    """Queues a request and returns its id. Raises ValueError (and queues nothing) if invalid."""
    request.validate(self.cfg)
    rid = self._next_id
    self._next_id += 1
    state = RequestState(rid, request, time.perf_counter() if arrival is None else arrival)
    state.key_data = request.sampling.key_data()
    self.requests[rid] = state
    self.waiting.append(rid)
    return rid

  def tokens(self, rid: int) -> list[int]:
    return list(self.requests[rid].tokens)

  @property
  def idle(self) -> bool:
    return all(s.done for s in self.requests.values())

  def generate(self, prompts: Iterable[Iterable[int]], max_new_tokens: int,
               sampling: SamplingParams = SamplingParams()) -> list[list[int]]:
    """Generates for a batch of prompts and returns each one's output tokens."""
    ids = [self.submit(Request(tuple(int(t) for t in p), max_new_tokens, sampling))
           for p in prompts]
    self.run()
    return [self.tokens(i) for i in ids]

  def run(self, max_iterations: int = 1_000_000):
    """Steps until every submitted request is done."""
    for _ in range(max_iterations):
      if self.idle:
        return
      if not self.step():
        pending = [self.requests[r].arrival for r in self.waiting]
        time.sleep(max(0.0, min(pending, default=0.0) - time.perf_counter()))
    raise RuntimeError(f"engine not idle after {max_iterations} iterations")

  # -- scheduling ------------------------------------------------------------------------------

  def _admit(self, now: float):
    """Places waiting requests that have arrived on the least-loaded AW with a free slot."""
    still = []
    for rid in self.waiting:
      state = self.requests[rid]
      loads = [sum(o >= 0 for o in owners) for owners in self._slot_owner]
      free = [a for a in range(len(self.aws)) if -1 in self._slot_owner[a]]
      if state.arrival > now or not free:
        still.append(rid)
        continue
      a = min(free, key=lambda a: (loads[a], a))
      slot = self._slot_owner[a].index(-1)
      self._slot_owner[a][slot] = rid
      state.aw, state.slot, state.phase = a, slot, Phase.PREFILL
    self.waiting = still

  def _bucket(self, n: int) -> int:
    b = self.engine_cfg.min_prefill_bucket
    while b < n:
      b *= 2
    return min(b, self.cfg.max_seq_len)

  def _batches(self):
    """Per-AW (tokens, n_new, fresh, rows) for this iteration, or None for an idle AW."""
    prefill = [[self.requests[r] for r in owners if r >= 0
                and self.requests[r].phase is Phase.PREFILL] for owners in self._slot_owner]
    is_prefill = any(prefill)
    if is_prefill:
      T = self._bucket(max(len(s.request.prompt) for group in prefill for s in group))
    else:
      T = 1
    B = self.engine_cfg.slots_per_aw
    batches = []
    for owners in self._slot_owner:
      want = Phase.PREFILL if is_prefill else Phase.DECODE
      rows = [self.requests[r] for r in owners if r >= 0 and self.requests[r].phase is want]
      if not rows:
        batches.append(None)
        continue
      tokens = np.zeros((B, T), np.int32)
      n_new = np.zeros((B,), np.int32)
      fresh = np.zeros((B,), bool)
      for s in rows:
        if is_prefill:
          tokens[s.slot, :len(s.request.prompt)] = s.request.prompt
          n_new[s.slot] = len(s.request.prompt)
          fresh[s.slot] = True
        else:
          tokens[s.slot, 0] = s.tokens[-1]
          n_new[s.slot] = 1
      batches.append((tokens, n_new, fresh, rows))
    return batches, T

  def step(self) -> bool:
    """Runs one prefill or decode iteration across all workers; False if there was no work."""
    self._admit(time.perf_counter())
    batches, T = self._batches()
    live = [a for a, b in enumerate(batches) if b is not None]
    if not live:
      return False
    for a in live:
      self.aws[a].begin(*batches[a][:3])
    capacity = self.engine_cfg.slots_per_aw * T * self.cfg.top_k
    outputs: dict[str, list] = {ew.cell.name: [] for ew in self.ews}
    for layer in range(self.cfg.num_layers):
      results = self.run_layer(layer, live, capacity)
      for ew, res in zip(self.ews, results):
        outputs[ew.cell.name].extend(res)
    sampled = {a: self.aws[a].sample(*self._sampling_arrays(batches[a][3])) for a in live}
    outputs.update({self.aws[a].cell.name: [sampled[a]] for a in live})
    await_outputs(outputs, self.engine_cfg.deadline_s)
    for a in live:
      self._emit(batches[a][3], np.asarray(sampled[a]))
    return True

  # -- the datapath of one layer, phase by phase (benchmarks time each phase) -----------------

  def attend(self, layer: int, live: list[int]) -> dict[int, tuple]:
    """Each live AW: attention, routing, per-EW buffers. Returns {aw: (buffers, local slots)}."""
    num_ew, S = len(self.ews), self.placement.slots_per_layer
    return {a: self.aws[a].attend(layer, self.active_tables[a], num_ew, S) for a in live}

  def send_to_experts(self, packed: dict[int, tuple], capacity: int) -> list[list]:
    """Buffers to the EWs; inbox[m][a] is AW a's (tokens, slots) for EW m (empty if idle)."""
    inbox = [[ew.empty_buffer(capacity) for _ in self.aws] for ew in self.ews]
    keys = [(m, a) for a in packed for m in range(len(self.ews))]
    sent = self.transfers.send_many(
        [((packed[a][0][m], packed[a][1][m]), self.ews[m].cell.replicated()) for m, a in keys])
    for (m, a), buf in zip(keys, sent):
      inbox[m][a] = buf
    return inbox

  def run_experts(self, layer: int, inbox: list[list]) -> list[tuple]:
    """Each EW: one batched expert call over all AWs' buffers; results[m][a]."""
    return [ew.run_layer(layer, inbox[m]) for m, ew in enumerate(self.ews)]

  def send_to_attention(self, results: list[tuple], live: list[int]) -> dict[int, list]:
    """Results back to the AWs; outbox[a][m] is EW m's output for AW a."""
    keys = [(a, m) for m in range(len(self.ews)) for a in live]
    sent = self.transfers.send_many(
        [(results[m][a], self.aws[a].cell.replicated()) for a, m in keys])
    outbox = {a: [None] * len(self.ews) for a in live}
    for (a, m), out in zip(keys, sent):
      outbox[a][m] = out
    return outbox

  def combine(self, layer: int, outbox: dict[int, list]):
    for a, results in outbox.items():
      self.aws[a].combine(layer, results)

  def run_layer(self, layer: int, live: list[int], capacity: int) -> list[tuple]:
    """One layer across all workers, dispatched asynchronously; returns the EWs' results."""
    inbox = self.send_to_experts(self.attend(layer, live), capacity)
    results = self.run_experts(layer, inbox)
    self.combine(layer, self.send_to_attention(results, live))
    return results

  def _sampling_arrays(self, rows: list[RequestState]):
    B = self.engine_cfg.slots_per_aw
    key_data = np.zeros((B, 2), np.uint32)
    step = np.zeros((B,), np.int32)
    temperature = np.zeros((B,), np.float32)
    top_p = np.ones((B,), np.float32)
    for s in rows:
      key_data[s.slot] = s.key_data
      step[s.slot] = len(s.tokens)
      temperature[s.slot] = s.request.sampling.temperature
      top_p[s.slot] = s.request.sampling.top_p
    return key_data, step, temperature, top_p

  def _emit(self, rows: list[RequestState], sampled: np.ndarray):
    now = time.perf_counter()
    for s in rows:
      token = int(sampled[s.slot])
      event = TokenEvent(s.id, len(s.tokens), token, now)
      s.tokens.append(token)
      s.times.append(now)
      s.phase = Phase.DECODE
      self.events.append(event)
      if self.on_token is not None:
        self.on_token(event)
      if s.finished_by(token):
        s.phase = Phase.DONE
        self._slot_owner[s.aw][s.slot] = -1

  # -- metrics ---------------------------------------------------------------------------------

  def summary(self) -> dict:
    done = [s for s in self.requests.values() if s.done]
    out = dict(requests=len(self.requests), completed=len(done))
    out.update(latency_summary({r: s.arrival for r, s in self.requests.items()}, self.events))
    return out
