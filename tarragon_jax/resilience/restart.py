"""The global restart (`RestartAll`), as a MegaScale-like system does it.

Stop every worker and delete all of its arrays (KV caches included), clear every
executable the workers compiled (not the user's own jitted functions), reload the weights from
the checkpoint, carve cells from the surviving devices, rebuild the workers, compile, and
recompute every in-flight request from its prompt (tokens the client already has are recomputed,
checked and dropped by its stream). Each phase is timed; nothing sleeps.

Advantages it gets, as a real JAX deployment would have them: the persistent compilation cache
(when the launcher enables it), weights on local disk, and in the local runtime no process
start or JAX runtime initialization (the process runtime pays those).
"""

from __future__ import annotations

import dataclasses
import time

import jax

from tarragon_jax.mesh.cells import CellPlan
from tarragon_jax.weights_source import load_weights
from tarragon_jax.worker.calls import wait
from tarragon_jax.worker.requests import Phase
from tarragon_jax.worker.workers import clear_compiled


def fit_plan(plan: CellPlan, num_devices: int, failed_kinds) -> CellPlan:
  """The plan, shrunk by whole workers of the failed kinds until it fits the devices."""
  kinds = list(failed_kinds) or ["ew"]
  i = 0
  while plan.devices_needed > num_devices:
    kind = kinds[i % len(kinds)]
    i += 1
    field = "num_ew" if kind == "ew" else "num_aw"
    if getattr(plan, field) <= 1:
      other = "num_aw" if field == "num_ew" else "num_ew"
      if getattr(plan, other) <= 1:
        raise RuntimeError(f"global restart: {num_devices} surviving devices cannot hold one AW "
                           f"and one EW of {plan}")
      field = other
    plan = dataclasses.replace(plan, **{field: getattr(plan, field) - 1})
  return plan


def restart_all(recovery, shrink=()) -> dict | None:
  """Tears the cluster down and rebuilds it (`recovery`: the engine's `Recovery`).

  Returns the record of its phases, or None if no cluster could be rebuilt (then every
  request has failed, and later ones will: there is no AW).
  """
  e, tl = recovery.e, recovery.e.timeline
  state = e.state
  phases = {}
  clock = [time.perf_counter()]

  def phase(name: str):
    now = time.perf_counter()
    phases[name] = now - clock[0]
    clock[0] = now

  start = clock[0]
  tl.add("restart_begin", step=e.iteration)
  in_flight = [s for s in e.requests.values()
               if not s.finished and (s.aw >= 0 or s.tokens or s.restore)]
  devices = [d for d in e.devices if d not in state.lost_devices]
  try:
    plan = fit_plan(state.plan, len(devices), shrink)
  except RuntimeError as err:  # nothing can serve: every request fails, and later ones too
    plan, cause = None, str(err)
  for w in [state.aws[a] for a in state.live_aws()] + [state.ews[m] for m in state.live_ews()]:
    recovery.fence(w)  # 1. stop every worker, drop every array and cache
  if state.store is not None:  # dropped, not failed: nothing declares it
    state.store.stop()
    state.store = None
  phase("teardown_s")
  clear_compiled()  # 2. every executable the workers compiled (not the user's own)
  phase("clear_caches_s")
  if plan is None:
    _cannot_serve(e, f"the global restart cannot rebuild the cluster: {cause}")
    return None
  params = None
  try:
    if e.weights_dir is None:
      raise RuntimeError("a global restart reloads every weight from a checkpoint and the engine "
                         "has none: give ResilienceConfig.weights_dir, or set `reloads_weights = "
                         "True` on the recovery policy so that the engine saves one")
    if not e.runtime.remote:  # (new worker processes load their weights themselves)
      params = load_weights(  # 3. weights from the checkpoint
          e.weights_dir, e.cfg, jax.sharding.SingleDeviceSharding(devices[0]),
          expect=e.weights_fingerprint)
      jax.block_until_ready(params)
      phase("weight_load_s")
    e.build(params, devices, plan)  # 4. cells (processes: start, JAX init, weight load, build)
  except Exception as err:  # noqa: BLE001 - e.g. other weights: nothing can serve
    _cannot_serve(e, f"the global restart cannot rebuild the cluster: {err}")
    return None
  del params
  for w in e.state.aws + e.state.ews:
    wait(w.sync())
  phase("rebuild_s")
  recomputed = 0  # 5. every in-flight request starts again from its prompt
  for s in in_flight:
    recomputed += s.cached
    s.tokens, s.cached, s.restore, s.phase, s.aw, s.slot = [], 0, False, Phase.WAITING, -1, -1
  # 6. compile what resuming needs now: decode and the prefill buckets of those prompts
  # (other shapes compile when first used, as in any JAX deployment).
  seq_lens = {1} | {e.bucket(len(s.request.prompt)) for s in in_flight}
  e.warm_workers(e.state.aws + e.state.ews, seq_lens)
  phase("compile_s")
  ids = [s.id for s in in_flight]
  e.waiting = ids + [r for r in e.waiting if r not in ids]
  if e.engine_cfg.resilience.snapshots:
    e.state.store = recovery.new_store()
  record = dict(phases, total_s=time.perf_counter() - start, requests=ids,
                recomputed_tokens=recomputed, plan=dataclasses.asdict(plan))
  tl.add("global_restart", **record)
  return record


def _cannot_serve(e, cause: str):
  """No cluster could be rebuilt: every request fails, and so will later ones (no AW)."""
  state = e.state
  for w in state.aws + state.ews:
    if w is not None:
      w.kill()
  state.aws, state.ews, state.slot_owner = [], [], []
  for s in [s for s in e.requests.values() if not s.finished]:
    e.fail_request(s, cause)
  e.timeline.add("global_restart_failed", error=cause)
