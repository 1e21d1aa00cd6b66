"""The disaggregated serving engine: AWs and EWs on separate cells or processes, one driver.

Each iteration extends every placed request by the tokens it still has to feed: a prompt
(prefill), the tail of a restored request, or its last sampled token (decode). Iterations that
feed more than one token to some request run those requests only (padded to a length bucket);
otherwise every request decodes one token. Within an iteration, per layer, every AW attends and
packs per-EW buffers, the buffers cross to the EWs, every EW runs one batched expert call over
all AWs' buffers, the results cross back, every AW combines (`serving/exchange.py`). In the
local runtime the engine walks the layers itself, dispatching asynchronously (nothing waits on
a device until the sampled tokens are fetched); in the process runtime each worker runs the
whole step by itself and the engine sends each one message a step.

Failures are found inside that exchange (`Detector`) and handed to the recovery policy
(`Tarragon` or `GlobalRestart`); faults are injected at layer boundaries (`FaultInjector`).
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable

import jax
import numpy as np
from absl import logging

from tarragon_jax.checkpoint import save_checkpoint
from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.params import ExpertParams, ModelParams, abstract_params
from tarragon_jax.mesh.cells import Cell
from tarragon_jax.mesh.transfer import Transfers
from tarragon_jax.resilience.cluster_state import ClusterState
from tarragon_jax.resilience.detector import Detector, WorkerTimeout
from tarragon_jax.resilience.faults import Fault, FaultInjector, check_schedule
from tarragon_jax.resilience.recovery import Recovery, policy_class
from tarragon_jax.resilience.routing_table import RoutingTable
from tarragon_jax.resilience.timeline import Timeline
from tarragon_jax.runtime.local import LocalRuntime
from tarragon_jax.serving.engine_config import EngineConfig, ResilienceConfig
from tarragon_jax.serving.exchange import LayerExchange
from tarragon_jax.serving.frontend import Frontend, RequestsFailed
from tarragon_jax.serving.metrics import TokenEvent, latency_summary
from tarragon_jax.serving.streams import RequestFailed
from tarragon_jax.weights_source import expected_weights
from tarragon_jax.worker.buckets import all_buckets, bucket
from tarragon_jax.worker.calls import wait
from tarragon_jax.worker.dataplane import LocalPlane
from tarragon_jax.worker.fault_domain import Health, WorkerDead
from tarragon_jax.worker.placement import place
from tarragon_jax.worker.requests import Phase, RequestState
from tarragon_jax.worker.workers import AttentionWorker, ExpertWorker, ew_weights

__all__ = ["Engine", "EngineConfig", "RequestFailed", "RequestsFailed", "ResilienceConfig",
           "WorkerTimeout"]


class Engine(LayerExchange, Frontend):
  """Serves requests on AW and EW cells carved from the visible devices.

  Use `submit` then `step` (or `run`), or `generate` for a batch. `on_token` callbacks receive
  every TokenEvent as it is delivered (each index of each request once). A request the engine
  cannot finish correctly ends with an error on its stream (`error(rid)`). `faults` is a
  schedule of `Fault`s injected at layer boundaries.
  """

  def __init__(self, cfg: ModelConfig, params: ModelParams,
               engine_cfg: EngineConfig = EngineConfig(), devices=None,
               on_token: Callable[[TokenEvent], None] | None = None,
               faults: Iterable[Fault] = (), runtime=None):
    self.cfg, self.engine_cfg = cfg, engine_cfg
    rc = engine_cfg.resilience
    self.timeline = Timeline()
    self.detector = Detector(rc.detection, self.timeline)
    self.runtime = LocalRuntime() if runtime is None else runtime
    self.devices = list(self.runtime.devices() if devices is None else devices)
    self.transfers = Transfers()  # the bytes the local data plane moves between cells
    self.control_link = self.runtime.data_plane()  # says which messages will not come
    # Rebuilt workers load weights from `weights_dir`: they must be the weights served here, or
    # a rebuilt worker would serve another model without an error.
    self.weights_fingerprint, self.part_fingerprints = expected_weights(rc.weights_dir, cfg,
                                                                        params)
    self._scratch = tempfile.mkdtemp(prefix="tarragon_")
    self.weights_dir = rc.weights_dir or self._weights_copy(params)
    self.store_dir = rc.store_dir or os.path.join(self._scratch, "snapshots")
    self._init_frontend(on_token)
    self.iteration = 0
    self.seq_lens: set[int] = {1}  # step lengths T seen so far (replacements compile them)
    self.hot_cells: set[tuple] = set()  # (kind, devices) compiled for by `warm_up`
    self.warmed, self._warned_cold = False, False  # `warm_up` called; said it was not
    self._logged: dict[int, tuple] = {}  # aw -> (store, seq, rows) of its last step logged
    self.state: ClusterState | None = None  # the cluster, as the control plane knows it
    self.build(params, self.devices)
    self.recovery = Recovery(self, policy_class(rc.recovery)(rc))
    if rc.snapshots:
      self.state.store = self.recovery.new_store()
    self.arm_faults(faults)

  def _weights_copy(self, params: ModelParams) -> str | None:
    """Where workers load weights from when the user gave none: nowhere (None) when every
    rebuilt worker can copy them from live peers; else (worker processes, a policy that reloads
    every weight) a checkpoint saved in the scratch directory, which costs the model's size in
    disk, so the log says how to avoid it."""
    rc = self.engine_cfg.resilience
    if not (self.runtime.remote or policy_class(rc.recovery).reloads_weights):
      return None
    size = sum(a.nbytes for a in jax.tree.leaves(params))
    path = os.path.dirname(save_checkpoint(os.path.join(self._scratch, "weights"), params,
                                           self.cfg))
    logging.warning("saved a copy of the weights (%.2f GB) to %s for %s to load from; give "
                    "ResilienceConfig.weights_dir (an orbax or Hugging Face checkpoint of these "
                    "weights) to load from it instead", size / 1e9, path,
                    "worker processes" if self.runtime.remote else f"recovery={rc.recovery!r}")
    return path

  def arm_faults(self, faults: Iterable[Fault]):
    """Replaces the fault schedule; its steps and times count from now (e.g. after warm-up).

    Raises:
      ValueError: a fault names a worker, layer or device this engine does not have (the old
        schedule stays armed).
    """
    faults = tuple(faults)
    check_schedule(faults, num_aw=self.state.plan.num_aw, num_ew=self.state.plan.num_ew,
                   num_layers=self.cfg.num_layers, aw_cell_size=self.state.plan.devices_per_aw,
                   ew_cell_size=self.state.plan.devices_per_ew,
                   num_nodes=len(self.runtime.nodes()))
    self.injector = FaultInjector(faults)
    self.t0 = time.perf_counter()
    self._fault_step0 = self.iteration

  def build(self, params: ModelParams, devices, plan=None):
    """Carves cells from `devices`, puts every worker's weights on its cell, and starts a new
    `ClusterState` (devices lost before stay lost; the store, if any, stays)."""
    plan = plan or self.engine_cfg.plan
    ec = self.engine_cfg
    self.cells = self.runtime.carve(plan, devices)
    placement = place(self.cfg.num_layers, self.cfg.num_experts, plan.num_ew,
                      ec.ew_slots_per_layer, ec.shadows_per_expert)
    base_table = RoutingTable.from_placement(placement)
    old = self.state
    self.state = ClusterState(
        plan=plan, placement=placement, aws=[], ews=[], slot_owner=[], base_table=base_table,
        table=base_table, spares=list(self.cells.spares),
        lost_devices=[] if old is None else old.lost_devices,
        store=None if old is None else old.store)
    if self.runtime.remote:  # every process starts side by side
      workers = self.runtime.start_workers(
          self, [("aw", i, c) for i, c in enumerate(self.cells.aw)]
          + [("ew", i, c) for i, c in enumerate(self.cells.ew)])
      aws, ews = workers[:len(self.cells.aw)], workers[len(self.cells.aw):]
    else:
      aws = [self.make_worker("aw", i, c, params) for i, c in enumerate(self.cells.aw)]
      ews = [self.make_worker("ew", i, c, params) for i, c in enumerate(self.cells.ew)]
    self.state.aws, self.state.ews = aws, ews
    self.state.slot_owner = [[-1] * ec.slots_per_aw for _ in aws]
    self.link_data_plane()
    self.set_routing_table(base_table)

  def link_data_plane(self):
    """Hands every live worker its peers' data-plane addresses: each AW every EW's, each EW
    every AW's (after a replacement joins, its position's new address)."""
    state = self.state
    ews = {f"ew{m}": state.ews[m].address for m in state.live_ews()}
    aws = {f"aw{a}": state.aws[a].address for a in state.live_aws()}
    self.control_link.connect(ews | aws)
    for workers, peers in (([state.aws[a] for a in state.live_aws()], ews),
                           ([state.ews[m] for m in state.live_ews()], aws)):
      for w in workers:
        try:
          w.link(peers)
        except WorkerDead:  # (found at its next call)
          pass

  # -- routing ---------------------------------------------------------------------------------

  def set_routing_table(self, table: RoutingTable):
    """Installs a new routing table on every AW; compiles nothing (the table is array data).

    Raises:
      ValueError: the table leaves an expert unreachable, does not fit the placement, points
        an expert at a slot that holds another expert or at an EW declared failed. The old
        table stays installed.
    """
    unreachable = table.unreachable()
    if unreachable:
      raise ValueError(f"routing table leaves experts unreachable: {unreachable[:8]}")
    self.install_table(table)

  def install_table(self, table: RoutingTable):
    """`set_routing_table` for the recovery, which may leave experts with no live replica
    unreachable (-1: a token routed there fails its request, see `datapath.aw_combine`)."""
    p = self.state.placement
    table.check_fits(p, self.state.failed_ews)
    self.state.table = table
    self.ew_slots = table.computed_slots(self.state.base_table, p.num_ew)
    for a in self.state.live_aws():  # (one that has died is found at its next call)
      try:
        self.state.aws[a].set_table(table.active)
      except WorkerDead:
        pass

  # -- requests --------------------------------------------------------------------------------

  def run(self, max_iterations: int = 1_000_000):
    """Steps until every submitted request is finished (completed or failed)."""
    for _ in range(max_iterations):
      self._deliver()
      if self.idle:
        return
      if not self.step():  # nothing to run: wait for an arrival or a replacement
        now = time.perf_counter()
        time.sleep(min([self.requests[r].arrival - now for r in self.waiting
                        if self.requests[r].arrival > now] + [1e-3]))
    raise RuntimeError(f"engine not idle after {max_iterations} iterations")

  def settle(self, timeout_s: float = 30.0, durable: bool = True):
    """Waits until the background work of past requests is done: the snapshot store has
    applied every KV it was sent (its host tier) and, with `durable`, no durable-tier write is
    in flight. Benchmarks call it to end a timed run, with `durable=False`: the store applies
    steps in batches, and a run's last batch is part of the run's cost; the durable tier is
    written every `flush_interval_s` whatever the load.

    Raises:
      TimeoutError: the store is still busy after `timeout_s`.
      WorkerDead: the store failed (it is handed to the recovery, which starts a new one; the
        work it had not applied is lost).
    """
    store = self.state.store
    if store is None:
      return
    deadline = time.perf_counter() + timeout_s
    try:
      mark = store.mark()
      while not store.caught_up(mark) or (durable and store.flushing):
        if store.health is Health.DEAD or store.disconnected():
          raise WorkerDead(f"{store.name} is dead")
        if time.perf_counter() > deadline:
          raise TimeoutError(f"Engine.settle: the snapshot store is still busy after "
                             f"{timeout_s} s")
        time.sleep(1e-3)
    except WorkerDead as err:
      self.detector.closed(store, time.perf_counter())
      self.recovery.store_failed()
      raise WorkerDead(f"Engine.settle: the snapshot store failed before it caught up "
                       f"({err}); a new store was started") from err

  # -- scheduling ------------------------------------------------------------------------------

  def _admit(self, now: float):
    """Places waiting requests that have arrived on the least-loaded AW with a free slot."""
    still = []
    for rid in self.waiting:
      state = self.requests[rid]
      free = [a for a in self.state.live_aws() if -1 in self.state.slot_owner[a]]
      if state.arrival > now or not free:
        still.append(rid)
        continue
      a = min(free, key=lambda a: (sum(o >= 0 for o in self.state.slot_owner[a]), a))
      slot = self.state.slot_owner[a].index(-1)
      self.state.slot_owner[a][slot] = rid
      state.aw, state.slot, state.cached = a, slot, 0
      state.phase = Phase.PREFILL if not state.tokens else Phase.DECODE
      if state.restore:
        self.recovery.restore(state)  # its target may fail too: it then goes back to waiting
    # A failure during a restore may have queued requests again (at the front).
    self.waiting = [r for r in dict.fromkeys(self.waiting + still)
                    if self.requests[r].phase is Phase.WAITING]

  def bucket(self, n: int) -> int:
    """The padded step length of a prompt of n tokens."""
    return bucket(n, self.engine_cfg.min_prefill_bucket, self.cfg.max_seq_len)

  def _batches(self):
    """Per-AW (tokens, n_new, fresh, rows) for this iteration, or None for an idle AW."""
    placed = [self.requests[r] for a in self.state.live_aws() for r in self.state.requests_on(a)]
    extend = [s for s in placed if len(s.feed) > 1 or s.cached == 0]
    rows_of = extend if extend else placed
    T = self.bucket(max(len(s.feed) for s in extend)) if extend else 1
    B = self.engine_cfg.slots_per_aw
    batches = []
    for a in range(len(self.state.aws)):
      rows = [s for s in rows_of if s.aw == a]
      if not rows:
        batches.append(None)
        continue
      tokens = np.zeros((B, T), np.int32)
      n_new = np.zeros((B,), np.int32)
      fresh = np.zeros((B,), bool)
      for s in rows:
        feed = s.feed
        tokens[s.slot, :len(feed)] = feed
        n_new[s.slot] = len(feed)
        fresh[s.slot] = s.cached == 0
      batches.append((tokens, n_new, fresh, rows))
    return batches, T

  def _fire_faults(self, layer: int):
    if not self.injector.pending:
      return
    now = time.perf_counter()
    store = self.state.store

    def flushing() -> bool:
      return store is not None and store.health is Health.ALIVE and store.flushing

    step = self.iteration - self._fault_step0
    for fault in self.injector.due(step, layer, now - self.t0, flushing,
                                   self.recovery.recovering, now):
      self.recovery.inject(fault)

  def step(self) -> bool:
    """Runs one iteration across all workers; False if there was no work.

    Raises:
      RuntimeError: the engine is closed.
      Whatever an `on_token` callback raises (the step itself is complete).
    """
    self._check_open("step")
    if self.injector.pending and not self.warmed and not self._warned_cold:
      self._warned_cold = True
      logging.warning("faults are armed but Engine.warm_up() was not called: the failover will "
                      "compile what it needs (replay, restore, replacements) inside the stall "
                      "it measures; call warm_up() before serving")
    self._deliver()
    try:
      ran = self._step()
    except self.recovery.Restart as restart:  # the policy restarts everything (the baseline)
      self.iteration += 1
      self.recovery.restart(restart.action)
      ran = True
    self._deliver()
    return ran

  def _step(self) -> bool:
    self.recovery.step_boundary()
    self._admit(time.perf_counter())
    batches, T = self._batches()
    live = [a for a, b in enumerate(batches) if b is not None]
    self.recovery.placed(busy=bool(live))
    if self.waiting and not self.state.live_aws() and not self.recovery.aw_coming:
      for rid in list(self.waiting):
        self.fail_request(self.requests[rid], "no attention worker is alive and no replacement "
                          "is being built (no spare devices left)")
    if not live:
      self._fire_faults(0)
      self.recovery.probe_idle()
      return False
    seq = self.iteration
    self.seq_lens.add(T)
    outs = self.run_step(seq, live, batches, T)
    sampled = {a: out[0] for a, out in outs.items()}
    self.detector.wait({self.state.aws[a].name: (self.state.aws[a], getattr(sampled[a], "is_ready",
                                                                 lambda: True))
                        for a in sampled})
    self.iteration += 1
    tokens = {a: np.asarray(sampled[a]) for a in sorted(sampled)}
    for a in tokens:
      if outs[a][1] is not None:  # before `_emit`, which may tell the store a request finished
        self._log_step(a, seq, T, batches[a][3], outs[a][1])
      self._emit(batches[a][3], tokens[a])
    return True

  def _log_step(self, a: int, seq: int, T: int, rows: list[RequestState], kv):
    """Sends AW `a`'s step to the store: its rows, or None where they are the rows of the AW's
    previous step to this store, each one token on (a decode step of an unchanged batch).

    The KV of a CPU cell goes as a host copy, made here once the step's tokens are in (its device
    work is done: a memcpy), which is cheaper than the store holding device buffers for a batch
    and copying them in its own thread. An accelerator's KV goes as the device array, whose copy
    to the host the AW started when it sampled (`copy_to_host_async`): the store's thread only
    waits for it, and the serving thread never does. In the process runtime the AW has sent its
    KV to the store itself: `kv` is then {"from": its data-plane address}, and no KV passes
    through here.
    """
    if self.state.store is None:
      return
    if isinstance(kv, jax.Array) and next(iter(kv.devices())).platform == "cpu":
      kv = np.array(kv)
    last, self._logged[a] = self._logged.get(a), (self.state.store, seq, rows)
    if T == 1 and last is not None and last[0] is self.state.store and last[1] == seq - 1 \
        and last[2] == rows:
      self._to_store("log_step", a, seq, None, kv)
    else:
      self._to_store("log_step", a, seq, [(s.id, s.slot, s.cached, len(s.feed)) for s in rows],
                     kv)

  def _to_store(self, method: str, *args):
    store = self.state.store
    if store is None:
      return
    try:
      getattr(store, method)(*args)
    except WorkerDead:
      self.detector.closed(store, time.perf_counter())
      self.recovery.store_failed()
    except queue.Full:
      pass  # a store that stopped draining is found by the recovery's store watchdog

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

  def warm_up(self, seq_lens=None):
    """Compiles every executable serving and recovery use, on every worker and spare device.

    Without it they compile on first use (a failover would then include compile time).
    `seq_lens` defaults to 1 and each prefill bucket up to max_seq_len. It empties every KV
    slot, so call it before serving.
    """
    if any(s.aw >= 0 and not s.done for s in self.requests.values()):
      raise RuntimeError("Engine.warm_up: call it before requests are placed (it empties the "
                         "KV slots)")
    if seq_lens is None:
      seq_lens = [1] + all_buckets(self.engine_cfg.min_prefill_bucket, self.cfg.max_seq_len)
    self.warmed = True
    self.seq_lens |= set(seq_lens)
    self.warm_workers(self.state.aws + self.state.ews)
    # Hot spares: compile on the spare devices too, so a replacement built there after a
    # failure only loads weights (a background compile would compete with serving).
    if self.runtime.remote:  # replacements are new processes (the compile cache serves them)
      return
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_params(self.cfg))
    plan = self.state.plan
    for kind, size in (("aw", plan.devices_per_aw), ("ew", plan.devices_per_ew)):
      for i in range(0, len(self.state.spares) - size + 1, size):
        devices = tuple(self.state.spares[i:i + size])
        standby = self.make_worker(kind, 0, Cell(f"spare{i}", devices), zeros)
        self.warm_worker(standby)
        standby.kill()
        self.hot_cells.add((kind, devices))

  def make_worker(self, kind: str, index: int, cell: Cell, params: ModelParams | ExpertParams):
    """A new AW or EW (`kind`) in position `index`, with its weights on `cell`.

    `params` is the model's (an AW ignores the routed experts) or, for an EW, the host arrays
    [L, S, ...] of exactly the experts it holds.
    """
    if self.runtime.remote:  # the worker process loads its own weights
      return self.runtime.start_worker(self, kind, index, cell)
    plane = LocalPlane(cell.replicated(), self.transfers)
    if kind == "aw":
      return AttentionWorker(index, cell, self.cfg, params, self.engine_cfg.slots_per_aw,
                             plane, self.engine_cfg.resilience.snapshots)
    if isinstance(params, ModelParams):
      params = ew_weights(params, self.state.placement, index)
    return ExpertWorker(index, cell, self.cfg, params, self.state.placement.num_ew, plane)

  def warm_worker(self, w, seq_lens=None):
    """Compiles a worker's executables for step lengths `seq_lens` (default: all seen)."""
    self.warm_workers([w], seq_lens)

  def warm_workers(self, workers, seq_lens=None):
    """`warm_worker` for several workers (worker processes compile side by side)."""
    seq_lens = sorted(list(self.seq_lens if seq_lens is None else seq_lens))
    B, X = self.engine_cfg.slots_per_aw, self.cfg.top_k
    S, base = self.state.placement.slots_per_layer, self.state.base_table
    ew_slots = sorted(set(base.computed_slots(base, len(self.state.ews))) | {S})
    pending = [w.warm_up(seq_lens, len(self.state.ews), S, base.active)
               if w.name.startswith("aw")
               else w.warm_up([B * T * X for T in seq_lens], len(self.state.aws), ew_slots)
               for w in workers]
    bound = self.engine_cfg.resilience.warm_up_timeout_s
    for w, out in zip(workers, pending):
      wait(out, bound, f"{w.name} warm_up", setting="ResilienceConfig.warm_up_timeout_s")

  def close(self):
    """Waits (up to `ResilienceConfig.close_timeout_s`) for background recovery work, stops
    the snapshot store and worker processes, and removes the engine's scratch directory (its
    weights copy and snapshots unless `weights_dir` / `store_dir` were given). Closing twice
    does nothing; a closed engine serves nothing."""
    if self.closed:
      return
    self.closed = True
    self.recovery.close()
    self.runtime.close()
    shutil.rmtree(self._scratch, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- metrics ---------------------------------------------------------------------------------

  def summary(self) -> dict:
    out = dict(requests=len(self.requests),
               completed=sum(s.done for s in self.requests.values()),
               failed=sum(s.phase is Phase.FAILED for s in self.requests.values()))
    out.update(latency_summary({r: s.arrival for r, s in self.requests.items()}, self.events))
    out.update(self.recovery.summary())
    return out
