"""Worker processes that run whole steps by themselves: who waits on whom when one is SIGSTOPped.

In the process runtime each AW runs a step's layers itself (`run_step`) and each EW serves
whichever AWs send (`serve_step`); the control plane sends one message a step to each and hears
back once. These tests read, from the timeline of a step in which a worker was SIGSTOPped, what
each worker's reply said: ordering facts (who finished without whom, why a wait ended), never
wall-time bounds. The detection deadline is set far out (`LONG_S`) so that a wait that ended by
running out its backstop would say "timed out" instead of passing unnoticed.
"""

from __future__ import annotations

import time

from test_process_runtime import CFG, MAX_NEW, PLAN, PROMPTS, _local_tokens, _params, _run_to_end

from tarragon_jax.resilience.detector import DetectionConfig
from tarragon_jax.resilience.faults import parse_faults
from tarragon_jax.runtime.remote import ProcessRuntime
from tarragon_jax.runtime.spawner import LocalSpawner
from tarragon_jax.serving.engine import Engine, EngineConfig, ResilienceConfig

LONG_S = 120.0  # the backstop of every wait: far beyond any wait these tests should see
FAULT_STEP = 6


def _engine(faults: str) -> Engine:
  rc = ResilienceConfig(detection=DetectionConfig(deadline_s=LONG_S))
  return Engine(CFG, _params(), EngineConfig(plan=PLAN, slots_per_aw=2, resilience=rc),
                faults=parse_faults(faults), runtime=ProcessRuntime(LocalSpawner(5)))


def _serve(engine: Engine) -> list[tuple]:
  _run_to_end(engine)
  for rid in range(len(PROMPTS)):
    assert [ev.index for ev in engine.events if ev.request_id == rid] == list(range(MAX_NEW))
  return engine.outputs


def _replies(engine: Engine, step: int) -> dict[str, dict]:
  return {ev["worker"]: ev for ev in engine.timeline.of("step_reply") if ev["step"] == step}


def test_a_stopped_ew_holds_up_only_the_aw_that_sends_to_it():
  engine = _engine(f"hang:ew1@step={FAULT_STEP}")
  base = engine.state.base_table
  # Pinned: every AW's table routes around EW 1 (its experts to their shadows on EW 0), but
  # AW 1 is given the placement's own table back, so that only AW 1 sends tokens to EW 1.
  engine.set_routing_table(base.without_ew(1))
  engine.state.aws[1].set_table(base.active)
  assert _serve(engine) == _local_tokens()

  [fault] = engine.timeline.of("fault")
  [declared] = engine.timeline.of("declared_failed")
  assert (fault["worker"], fault["step"]) == ("ew1", FAULT_STEP)
  assert (declared["worker"], declared["how"]) == ("ew1", "probe unanswered")
  replies = _replies(engine, FAULT_STEP)
  # EW 1 was stopped before the step was sent: AW 0 ran the whole step and sampled its tokens
  # while EW 1 was silent, never waiting for it ...
  assert replies["aw0"]["said"] == "done"
  assert replies["ew1"]["said"] == "failed"
  # ... while AW 1, which had routed tokens to EW 1, waited for it until it was declared, then
  # stopped at that layer and replayed it under the new table (its tokens are still exact).
  assert replies["aw1"]["said"] == "stopped at layer 0, lost EWs [1]"
  assert replies["aw1"]["t_reply"] > declared["t"]
  # EW 0 served both AWs at layer 0; AW 1, stopping, told it that its layer 1 would not come
  # in this run of the step (it came in the replay), so EW 0 did not wait for it.
  assert replies["ew0"]["said"] == [{"layer": 1, "aw": 1, "why": "cancelled"}]
  [replay] = engine.timeline.of("replay")
  assert replay["aws"] == [1] and replay["failed_ews"] == [1]


def test_no_ew_waits_on_a_stopped_aw_past_its_declaration():
  engine = _engine(f"hang:aw1@step={FAULT_STEP}")
  assert _serve(engine) == _local_tokens()

  [declared] = engine.timeline.of("declared_failed")
  assert (declared["worker"], declared["how"]) == ("aw1", "probe unanswered")
  replies = _replies(engine, FAULT_STEP)
  assert replies["aw0"]["said"] == "done"
  assert replies["aw1"]["said"] == "failed"
  for m in ("ew0", "ew1"):
    # Each EW ran the step's layers for AW 0 and left AW 1 out: its wait for AW 1's buffer
    # ended because the control plane, having declared AW 1, said that it will not come (not
    # by running out its backstop); after that no layer of the step waited for AW 1 again.
    assert replies[m]["said"] == [{"layer": 0, "aw": 1, "why": "cancelled"}]
    assert replies[m]["t_reply"] > declared["t"]


def test_kv_goes_from_the_aws_to_the_store_directly():
  engine = _engine(f"kill:aw1@step={FAULT_STEP + 4}")
  # Until the store process has started its inbox, KV goes through the driver: wait for it.
  deadline = time.perf_counter() + 60.0  # a bound on a hung test, not a timing assertion
  while engine.state.store.address is None and time.perf_counter() < deadline:
    time.sleep(0.01)
  assert _serve(engine) == _local_tokens()
  # The AWs' replies to the driver carry tokens only: not one floating-point byte (no
  # activation, no KV) ...
  through_driver = engine.runtime.driver_bytes()
  assert through_driver["run_step:reply"][0] > 0 and through_driver["run_step:reply"][1] == 0
  # ... and yet the store had the killed AW's KV: its requests were restored, not recomputed
  # from their prompts, with at most the uncommitted tail recomputed.
  restores = engine.timeline.of("restore")
  assert restores and all(r["mode"] == "restore" and r["restored"] > 0 for r in restores)
