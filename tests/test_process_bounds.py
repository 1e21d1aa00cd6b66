"""Fail closed in the process runtime: no wait on a worker or store process is endless.

A wait on a process that is gone ends at once with `WorkerDead` (naming it and how it ended); a
wait on a live but silent one ends at its configured bound, with an error naming the worker, the
operation and the bound. Faults are real signals; everything goes through the public API. The
bounds given below (minutes) only keep a regression from hanging the suite: nothing here should
come near them.
"""

from __future__ import annotations

import signal
import time

import pytest
from test_process_runtime import CFG, MAX_NEW, PLAN, PROMPTS, _local_tokens, _params

from tarragon_jax.resilience.faults import parse_faults
from tarragon_jax.runtime.channel import Bound
from tarragon_jax.runtime.remote import ProcessRuntime
from tarragon_jax.runtime.spawner import LocalSpawner, SpawnError
from tarragon_jax.serving.engine import Engine, EngineConfig, ResilienceConfig
from tarragon_jax.worker.fault_domain import WorkerDead
from tarragon_jax.worker.requests import Request


def test_a_process_that_hangs_or_dies_before_ready_is_reported_not_waited_for():
  spawner = LocalSpawner(1)
  hung = spawner.spawn(None, "", Bound(1.0, "ResilienceConfig.start_timeout_s"))
  hung.signal(signal.SIGSTOP)
  dead = spawner.spawn(None, "", Bound(600.0, "ResilienceConfig.start_timeout_s"))
  dead.stop()
  try:
    with pytest.raises(SpawnError, match=r"within 1 s \(set by ResilienceConfig.start_timeout_s"):
      hung.ready()
    with pytest.raises(SpawnError, match="SIGKILL"):  # at once, not after 600 s
      dead.ready()
  finally:
    hung.stop()


def _engine(runtime: ProcessRuntime, faults: str = "", **resilience) -> Engine:
  rc = ResilienceConfig(**resilience)
  return Engine(CFG, _params(), EngineConfig(plan=PLAN, slots_per_aw=2, resilience=rc),
                faults=parse_faults(faults), runtime=runtime)


def _run(engine: Engine) -> list[int]:
  ids = [engine.submit(Request(p, MAX_NEW)) for p in PROMPTS]
  engine.run()
  return ids


def _check_each_request(engine: Engine, ids: list[int]):
  """Every request completed with the fault-free tokens, or carries its own error."""
  for rid, expected in zip(ids, _local_tokens()):
    if engine.error(rid) is None:
      assert tuple(engine.tokens(rid)) == expected


class _KillAfterReady(LocalSpawner):
  """Starts `healthy` worker processes as asked; SIGKILLs every later one as soon as it says
  READY (the store's processes, which have no slot, are left alone)."""

  def __init__(self, slots: int, healthy: int):
    super().__init__(slots)
    self.healthy, self.killed = healthy, []

  def spawn(self, slot, compile_cache, start):
    child = super().spawn(slot, compile_cache, start)
    if slot is None:
      return child
    self.healthy -= 1
    if self.healthy < 0:
      said_ready = child.ready

      def ready_then_killed():
        addresses = said_ready()
        child.signal(signal.SIGKILL)
        self.killed.append(child.pid)
        return addresses

      child.ready = ready_then_killed
    return child


def test_a_replacement_killed_after_it_said_ready_fails_its_build_and_serving_ends():
  spawner = _KillAfterReady(5, healthy=4)  # 2 AWs + 2 EWs; the replacement on the spare dies
  engine = _engine(ProcessRuntime(spawner), "kill:ew1@step=4,layer=1", build_timeout_s=240.0)
  try:
    ids = _run(engine)
    engine.recovery.wait_for_replacements()
  finally:
    engine.close()
  assert len(spawner.killed) == 1
  _check_each_request(engine, ids)
  (failed,) = engine.timeline.of("replacement_failed")
  # Its build saw the death itself (the exit status), not a bound running out.
  assert failed["worker"] == "ew1" and "SIGKILL" in failed["error"], failed
  assert not engine.timeline.of("replacement_joined")
  children = [w.child for w in engine.runtime.workers] + [s.child for s in engine.runtime.stores]
  assert not any(c.alive() for c in children)  # close() returned and stopped them all


def _warm_up_with(engine: Engine, worker, fault):
  """`engine.warm_up()` with `fault(worker)` done right after the worker got its request."""
  send = worker.warm_up

  def sent_then_fault(*args):
    out = send(*args)
    fault(worker)
    return out

  worker.warm_up = sent_then_fault
  engine.warm_up([1])


def test_a_worker_killed_during_warm_up_fails_it_at_once_naming_the_worker():
  with _engine(ProcessRuntime(LocalSpawner(4))) as engine:
    with pytest.raises(WorkerDead, match=r"aw0.*warm_up.*SIGKILL"):
      _warm_up_with(engine, engine.state.aws[0], lambda w: w.kill())


def test_a_worker_stopped_during_warm_up_fails_it_at_its_bound_naming_both():
  with _engine(ProcessRuntime(LocalSpawner(4)), warm_up_timeout_s=1.5) as engine:
    with pytest.raises(TimeoutError, match=r"aw0.*warm_up.*1\.5 s"):
      _warm_up_with(engine, engine.state.aws[0], lambda w: w.hang())


def test_a_dead_standby_store_is_replaced_and_a_dead_store_is_answered_for_at_once():
  runtime = ProcessRuntime(LocalSpawner(4))
  engine = _engine(runtime, "kill:store@step=3")
  try:
    runtime._standby_store.stop()  # the standby process dies before it is needed
    ids = _run(engine)  # the store dies at step 3: its standby is dead, a new process serves
    _check_each_request(engine, ids)
    assert [ev["worker"] for ev in engine.timeline.of("declared_failed")] == ["store"]
    assert not engine.timeline.of("store_unavailable")  # a new store process was started
    assert len(runtime.stores) == 2 and engine.state.store is runtime.stores[1]
    assert engine.state.store.child.alive()
    # The store process dies after serving: summary() still answers, with the store's last
    # word on what it logged. (Read once it has applied everything sent: its thread applies in
    # batches, and on a loaded host it may not have yet.)
    store, deadline = engine.state.store, time.perf_counter() + 120.0  # bounds a hung test
    mark = store.mark()
    while not store.caught_up(mark) and time.perf_counter() < deadline:
      time.sleep(0.01)
    logged = engine.summary()["snapshot_bytes_in"]
    assert logged > 0
    engine.state.store.child.proc.kill()
    engine.state.store.child.proc.wait()
    assert engine.summary()["snapshot_bytes_in"] == logged
  finally:
    engine.close()
