"""Attention and expert workers: each owns one cell, its weights and (AW) its KV cache.

Workers do device work only; which request sits in which slot is the engine's business.
Activations go from worker to worker through each worker's `DataPlane` (`worker/dataplane.py`):
an AW sends each EW its packed buffer, an EW sends each AW its results; the control plane only
says which step, layer and attempt to run and whom to expect. Each worker is a failure domain
(`FaultDomain`): a killed worker's arrays are deleted and a call raises `WorkerDead`; a hung
worker returns None from every call.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.kv_cache import KVCache
from tarragon_jax.layers.params import (
  ExpertParams,
  ModelParams,
  abstract_params,
  logical_axes,
  slot_experts,
  without_experts,
)
from tarragon_jax.mesh.cells import AW_RULES, EW_RULES, Cell
from tarragon_jax.worker import datapath
from tarragon_jax.worker.buckets import all_buckets, bucket
from tarragon_jax.worker.dataplane import Peer, kv_tag
from tarragon_jax.worker.fault_domain import FaultDomain
from tarragon_jax.worker.placement import Placement

RESTORE_BUCKET = 16  # a restore pads the KV it writes to a bucket of at least this many tokens


@jax.jit
def _reset_lengths(cache: KVCache, fresh) -> KVCache:
  return dataclasses.replace(cache, lengths=jnp.where(fresh, 0, cache.lengths))


def clear_compiled():
  """Drops every executable the workers compiled in this process: those of every jitted
  function made in this module and in the datapath (found, not listed, so that one added later
  is cleared too; one merely imported there, e.g. `sample`, is not theirs), and nothing else of
  the process's."""
  for module in (datapath, sys.modules[__name__]):
    for fn in vars(module).values():
      if type(fn) is type(_reset_lengths) and not _imported(fn, module):
        fn.clear_cache()


def _imported(fn, module) -> bool:
  """Whether jitted `fn` is another module's, imported into `module` by name."""
  origin = sys.modules.get(fn.__module__)
  return origin is not module and getattr(origin, fn.__name__, None) is fn


class AttentionWorker(FaultDomain, Peer):
  """Holds attention weights, the router and a KV cache of `num_slots` request slots."""

  def __init__(self, index: int, cell: Cell, cfg: ModelConfig, params: ModelParams,
               num_slots: int, plane, snapshots: bool = True, host_inputs: bool = False,
               host_routing: bool | None = None):
    """`plane`: its `DataPlane`. `snapshots`: each step also returns its new KV for the
    snapshot store. `host_inputs`: the EWs' results arrive as host arrays (a worker process
    on ZeroMQ), so `warm_up` compiles for those (a jitted call compiles again for inputs of
    another kind). `host_routing` (default: `host_inputs`): each layer's routing counts are
    fetched to the host at once, so that the worker waits only for the EWs it routed tokens
    to (a worker process, which waits for them anyway; in one process that fetch would stall
    the asynchronous dispatch)."""
    self.index, self.cell, self.cfg, self.num_slots = index, cell, cfg, num_slots
    self.snapshots, self.host_inputs = snapshots, host_inputs
    self.host_routing = host_inputs if host_routing is None else host_routing
    # Off CPU, a step's KV starts its device-to-host copy as soon as the step is computed,
    # beside the token fetch: whoever reads it for the store (its thread, or this process's
    # data plane) waits for a copy under way instead of making it. (CPU arrays are host memory.)
    self._copy_kv_to_host = snapshots and cell.devices[0].platform != "cpu"
    self.name = f"aw{index}"
    self.plane = plane
    aw_params = without_experts(params)
    axes = without_experts(logical_axes(cfg))
    shardings = cell.shardings_for(AW_RULES, axes, without_experts(abstract_params(cfg)))
    # The worker deletes its arrays when it is killed, so they must not share a buffer with the
    # caller's params: jax 0.10.2 aliases the source buffer into a multi-device replicated
    # device_put even with may_alias=False, hence a copy in place first (no compile).
    owned = jax.tree.map(
        lambda a: jax.device_put(a, a.sharding, may_alias=False) if isinstance(a, jax.Array)
        else a, aw_params)
    self.params = jax.device_put(owned, shardings, may_alias=False)
    cache = KVCache.create(cfg, num_slots, sharding=cell.replicated())
    kv = cell.sharding(AW_RULES, ("layers", "slots", "seq", "kv_heads", "head_dim"), cache.k.shape)
    self.cache = jax.device_put(cache, KVCache(kv, kv, cell.replicated()))
    self.slots = self.put(np.arange(num_slots, dtype=np.int32))  # row b reads/writes slot b
    self.x = self.x_in = self.h = self.dest = self.weights = self.lost = None
    self.attended = None  # the layer of this step attended last (attending it again: a replay)
    self.active = None  # i32[L, E] the routing table's active slot per expert (`set_table`)
    self.counts = None  # i32[W] tokens this step's layer routed to each EW
    self.bad = None  # bool[B] rows of this step whose result cannot be computed
    self._none_bad = self.put(np.zeros((num_slots,), bool))  # each step starts from it
    self._missing: dict[int, jax.Array] = {}

  def put(self, array):
    """Host data onto this worker's cell, replicated: for data that every layer reads.

    A host input that one call reads (tokens, sampling settings, a restore's KV) is not put
    first: it goes straight into the jitted call, whose C++ dispatch copies it onto the cell
    for a fraction of what a separate `device_put` costs.
    """
    return jax.device_put(array, self.cell.replicated())

  def begin(self, step: int, tokens: np.ndarray, n_new: np.ndarray, fresh: np.ndarray):
    """Starts step `step` over rows = all slots: tokens i32[B, T], n_new i32[B], fresh bool[B].

    Returns True, or None if the worker is hung.
    """
    if not self._serving():
      return None
    self.plane.forget(before_step=step - 1)
    self.n_new = self.put(n_new.astype(np.int32))  # read by every layer: put once (see `put`)
    if fresh.any():
      self.cache = _reset_lengths(self.cache, fresh)
    self.x = datapath.aw_embed(self.params, tokens.astype(np.int32))
    self.bad = self._none_bad
    self.attended = None
    return True

  def set_table(self, active: np.ndarray) -> bool:
    """Installs a routing table (i32[L, E], the slot each expert is sent to; -1: none), pushed
    by the control plane at each new epoch; later layers route by it."""
    self.active = self.put(active)
    return True

  def _attend(self, layer, active, num_ew: int, slots_per_layer: int):
    self.x_in = self.x
    (self.x, self.cache, bufs, counts, self.dest, self.weights, self.h,
     self.lost) = datapath.aw_attend_and_pack(
         self.params, self.cfg, self.x, self.cache, layer, self.slots, self.n_new, active,
         num_ew=num_ew, slots_per_layer=slots_per_layer)
    return bufs, counts

  def attend(self, step: int, layer: int, attempt: int, num_ew: int, slots_per_layer: int,
             ews: list[int]):
    """Attention + routing (by the table of `set_table`) for one layer; sends EW m its packed
    buffer, for each m in `ews`.

    A replay (the layer attended again, as a new `attempt`, under a new routing table after an
    EW failed or a message was lost) starts from the layer's input: attention rewrites the
    same KV at the same positions, so the cache is unchanged; only the buffers differ.

    Returns:
      i32[W]: the tokens routed to each EW (None if the worker is hung).
    """
    if not self._serving():
      return None
    if self.attended == layer:
      self.x = self.x_in
    self.attended = layer
    bufs, counts = self._attend(layer, self.active, num_ew, slots_per_layer)
    self.plane.send([(f"ew{m}", (step, layer, attempt, self.name), bufs[m]) for m in ews])
    self.counts = np.asarray(counts) if self.host_routing else counts
    return self.counts

  def missing(self, capacity: int):
    """An all-NaN [C, D] result, standing in for an EW that sent nothing: read only where a
    token was routed to that EW, and then it marks the token's row bad (never a silent
    zero)."""
    if capacity not in self._missing:
      nan = np.full((capacity, self.cfg.hidden_size), np.nan, self.cfg.dtype)
      self._missing[capacity] = nan if self.host_inputs else self.put(nan)
    return self._missing[capacity]

  def combine(self, step: int, layer: int, attempt: int, ews: list[int], num_ew: int,
              capacity: int, wait_s: float = 0.0, force: bool = False):
    """Adds the results of EWs `ews` (sent for this step, layer and attempt; the others
    stand in as NaN) and the shared expert to the residual.

    Args:
      wait_s: how long to wait for each result that has not arrived.
      force: combine even if some have not arrived (they stand in as NaN: rows that read
        them fail).

    Returns:
      [] once combined, or the EWs whose results did not arrive within `wait_s` (nothing
      combined: the layer can be replayed); None if the worker is hung.
    """
    if not self._serving():
      return None
    routed = self.counts if self.host_routing else None  # (on the host: no device sync)
    results = [self.missing(capacity)] * num_ew
    lost = []
    for m in ews:
      if routed is not None and not routed[m]:
        continue  # no token of this AW went to m: its result is never read
      out = self.plane.take((step, layer, attempt, f"ew{m}"), wait_s)
      if out is None:
        lost.append(m)
      else:
        results[m] = out
    if lost and routed is None:  # only now is it worth a sync: was anything routed there?
      routed = np.asarray(self.counts)
      lost = [m for m in lost if routed[m]]
    if lost and not force:
      return lost
    self._combine(layer, results)
    return []

  def _combine(self, layer, results):
    self.x, self.bad = datapath.aw_combine(self.params, self.cfg, self.x, self.h, layer,
                                           tuple(results), self.dest, self.weights, self.bad,
                                           self.lost)

  def sample(self, key_data, step, temperature, top_p):
    """Samples each row's next token; None if hung.

    Returns:
      (i32[B] tokens, `datapath.BAD_TOKEN` for a row whose result could not be computed, the
      step's KV [2, L, B, T, K, H] (k, v) or None without snapshots), device arrays not yet
      fetched.
    """
    if not self._serving():
      return None
    tokens, self.cache, segment = datapath.aw_finish(
        self.params, self.cfg, self.x, self.cache, self.slots, self.n_new,
        key_data, step, temperature, top_p, self.bad, snapshot=self.snapshots)
    if segment is not None and self._copy_kv_to_host:
      segment.copy_to_host_async()
    return tokens, segment

  def run_step(self, step: int, batch: tuple, sampling: tuple, num_ew: int,
               slots_per_layer: int, ews: list[int], capacity: int, wait_s: float,
               kv_to: str | None = None):
    """A whole step run by the worker itself: `begin`, then per layer `attend` (buffers to
    the EWs) and `combine` (their results, waited for as they come), then `sample`. The
    control plane sends one message a step and hears back once.

    An EW whose results do not come (it failed, or a message was lost) stops the step at that
    layer, with the layer's input kept: the control plane declares the EW, installs the new
    routing table and has this worker replay the layer (`attend` again), then go on layer by
    layer. Each EW is told at once that this worker's later layers of the step will not come,
    so no EW waits for them.

    Args:
      batch: (tokens, n_new, fresh), as `begin` takes them.
      sampling: (key_data, step, temperature, top_p), as `sample` takes them.
      ews: the live EWs; wait_s: how long to wait for one result (a backstop: a wait also
        ends when the sender's process is gone or the control plane cancels it).
      kv_to: the snapshot store's data-plane address: the step's KV goes there directly
        (tagged `kv_tag`), not back in the reply.

    Returns:
      ("done", tokens, KV segment) as `sample` returns them (the segment "sent" if it went
      to `kv_to`); ("stopped", layer, the EWs whose results did not come); None if the worker
      is hung.
    """
    if self.begin(step, *batch) is None:
      return None
    layers = self.cfg.num_layers
    for layer in range(layers):
      if self.attend(step, layer, 0, num_ew, slots_per_layer, ews) is None:
        return None
      lost = self.combine(step, layer, 0, ews, num_ew, capacity, wait_s)
      if lost is None:
        return None
      if lost:
        self.plane.send([(f"ew{m}", (step, later, 0, self.name), None)
                         for later in range(layer + 1, layers) for m in ews])
        return "stopped", layer, lost
    out = self.sample(*sampling)
    if out is None:
      return None
    tokens, segment = out
    if kv_to is not None and segment is not None:
      self.plane.connect({"store": kv_to})  # (a no-op while the store stays the same)
      self.plane.send([("store", kv_tag(step, self.name), segment)])
      segment = "sent"
    return "done", tokens, segment

  def restore(self, slot: int, k: np.ndarray, v: np.ndarray) -> int:
    """Writes a request's KV (host [L, n, K, H]) into `slot`; returns the bytes moved."""
    if not self._serving():
      return 0
    n = k.shape[1]
    P = bucket(n, RESTORE_BUCKET, self.cache.max_len)
    pad = ((0, 0), (0, P - n), (0, 0), (0, 0))
    self.cache = datapath.aw_restore(self.cache, np.int32(slot), np.pad(k, pad), np.pad(v, pad),
                                     np.int32(n))
    return k.nbytes + v.nbytes

  def sync(self) -> bool:
    """Blocks until this worker's pending device work is done."""
    self.cache.lengths.block_until_ready()
    return True

  def cache_copy(self):
    """Device copies (k, v, lengths) of the whole cache, for a base snapshot."""
    if not self._serving():
      return None
    return datapath.aw_cache_copy(self.cache)

  def warm_up(self, seq_lens, num_ew: int, slots_per_layer: int, active):
    """Compiles this cell's executables for each step length T in `seq_lens`.

    For a fresh worker: every slot is left empty (and slot 0's KV zeroed).
    """
    B, active = self.num_slots, self.put(active)
    for T in seq_lens:
      self.begin(-1, np.zeros((B, T), np.int32), np.zeros((B,), np.int32), np.ones((B,), bool))
      bufs, _ = self._attend(0, active, num_ew, slots_per_layer)
      zeros = [np.zeros((b.shape[0], self.cfg.hidden_size), self.cfg.dtype) for b in bufs]
      self._combine(0, zeros if self.host_inputs else [self.put(z) for z in zeros])
      zeros = np.zeros((B,), np.int32)
      self.sample(np.zeros((B, 2), np.uint32), zeros, zeros.astype(np.float32),
                  np.ones((B,), np.float32))
    for P in all_buckets(RESTORE_BUCKET, self.cache.max_len):  # into slot 0, length 0
      k = np.zeros((self.cfg.num_layers, P, self.cfg.num_kv_heads, self.cfg.head_dim),
                   self.cfg.dtype)
      self.cache = datapath.aw_restore(self.cache, np.int32(0), k, k, np.int32(0))
    jax.block_until_ready(self.cache_copy())  # the base snapshot a new store is sent
    self.cache.lengths.block_until_ready()


def ew_weights(params: ModelParams, placement: Placement, ew: int) -> ExpertParams:
  """The experts (primaries and shadows) that EW `ew` holds, [L, S, ...] (`slot_experts`)."""
  return slot_experts(params.layers.moe.experts, placement.contents[:, ew])


class ExpertWorker(FaultDomain, Peer):
  """Holds the expert slots of its placement and runs them for all AWs, one layer at a time."""

  def __init__(self, index: int, cell: Cell, cfg: ModelConfig, host: ExpertParams, num_ew: int,
               plane, host_inputs: bool = False):
    """`host`: the experts this EW holds, [L, S, ...] (see `ew_weights`).
    `plane`: its `DataPlane`. `host_inputs`: the AWs' buffers arrive as host arrays (a worker
    process), so `warm_up` compiles for those: otherwise the all-slots executable, first used
    in a failover's replay, would compile there."""
    self.index, self.cell, self.cfg, self.plane = index, cell, cfg, plane
    self.host_inputs = host_inputs
    self.name = f"ew{index}"
    self.num_ew = num_ew
    axes = ExpertParams(("layers", "slots", "embed", "expert_hidden"),
                        ("layers", "slots", "embed", "expert_hidden"),
                        ("layers", "slots", "expert_hidden", "embed"))
    shardings = cell.shardings_for(EW_RULES, axes, host)
    self.weights = jax.device_put(host, shardings)
    self._empty: dict[int, jax.Array] = {}
    self.missed: dict[int, str] = {}  # AW -> why its buffer of the last layer run did not come

  def empty_buffer(self, capacity: int):
    """A packed buffer with no tokens, standing in for an AW that sent nothing."""
    if capacity not in self._empty:
      empty = datapath.empty_buffer(self.cfg, capacity)
      self._empty[capacity] = empty if self.host_inputs else jax.device_put(
          empty, self.cell.replicated())
    return self._empty[capacity]

  def run_layer(self, step: int, layer: int, sources: list, num_aw: int, slots: int,
                capacity: int, wait_s: float = 0.0):
    """Runs one layer over the packed buffers that AWs sent (inbox[a]: [C, D + 2]),
    computing the first `slots` expert slots (`RoutingTable.computed_slots`), and sends each
    AW its results.

    Micro-batching across AWs: one expert call serves every AW's buffer of this layer (that is
    where an EW's efficiency comes from); each row's result depends only on its own token, so
    who else is in the batch never changes a result.

    Args:
      sources: [(aw, attempt)]: the buffers to take (an AW not listed stands in as empty).
      wait_s: how long to wait for a buffer that has not arrived; one that has not arrived
        by then is run as empty and named in the result.

    Returns:
      the AWs whose buffers did not arrive (their results were not sent), or None if the
      worker is hung.
    """
    if not self._serving():
      return None
    inbox = [self.empty_buffer(capacity)] * num_aw
    lost = []
    self.missed = {}
    for a, attempt in sources:
      buf = self.plane.take((step, layer, attempt, f"aw{a}"), wait_s)
      if buf is None:
        lost.append(a)
        self.missed[a] = self.plane.missed
      else:
        inbox[a] = buf
    outs = datapath.ew_experts(self.weights, self.cfg, layer, tuple(inbox), num_ew=self.num_ew,
                               slots=slots)
    self.plane.send([(f"aw{a}", (step, layer, attempt, self.name), outs[a])
                     for a, attempt in sources if a not in lost])
    self.plane.forget(before_step=step - 1)
    return lost

  def serve_step(self, step: int, aws: list[int], num_aw: int, slots: int, capacity: int,
                 wait_s: float):
    """Every layer of a step for AWs `aws` (attempt 0), as they send: `run_layer` per layer,
    each starting once every AW still in the step has delivered its buffer (micro-batching,
    as in `run_layer`). An AW whose buffer does not come (its process is gone, the control
    plane cancelled it after declaring it, or the AW stopped its step at a failed EW and said
    so) is left out of the step's later layers: no EW waits on a dead or hung AW past its
    declaration.

    Returns:
      [(layer, AW, why)] for each buffer that did not arrive (why: "cancelled" by the control
      plane or by the AW itself, "sender gone", "timed out" after `wait_s`); None if the
      worker is hung.
    """
    missed = []
    sources = [(a, 0) for a in aws]
    for layer in range(self.cfg.num_layers):
      if not sources:
        break
      lost = self.run_layer(step, layer, sources, num_aw, slots, capacity, wait_s)
      if lost is None:
        return None
      missed += [(layer, a, self.missed[a]) for a in lost]
      sources = [(a, n) for a, n in sources if a not in lost]
    return missed

  def sync(self) -> bool:
    """Blocks until this worker's weights are on its cell."""
    jax.block_until_ready(self.weights)
    return True

  def warm_up(self, capacities, num_aw: int, slot_counts):
    """Compiles the expert call for each buffer capacity and count of computed slots, on empty
    buffers."""
    for c in capacities:
      for slots in slot_counts:
        jax.block_until_ready(datapath.ew_experts(
            self.weights, self.cfg, 0, (self.empty_buffer(c),) * num_aw, num_ew=self.num_ew,
            slots=slots))
