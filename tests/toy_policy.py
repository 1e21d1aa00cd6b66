"""Recovery policies a researcher might write, each one class: used by test_recovery_policy.py
through `ResilienceConfig(recovery="toy_policy:ClassName")`, with no change to the engine."""

from __future__ import annotations

from tarragon_jax.resilience.policy import FailRequests, RecoveryPolicy, Requeue, Reroute


class ReprefillNoReplacements(RecoveryPolicy):
  """Route around a failed EW and re-prefill a failed AW's requests from their prompts on the
  survivors; never build a replacement (e.g. to study serving on a shrinking cluster)."""

  name = "reprefill_no_replacements"

  def __init__(self, resilience):
    super().__init__(resilience)
    self.events = []  # what it was told, for the test

  def workers_failed(self, state, event):
    self.events.append(event)
    if event.kind == "aw":
      return [Requeue(aw, resume="reprefill") for aw in event.indices]
    return [Reroute(state.table_around(state.failed_ews))]


class FailFast(RecoveryPolicy):
  """A failed AW's requests fail at once (their clients retry elsewhere)."""

  name = "fail_fast"

  def workers_failed(self, state, event):
    if event.kind == "aw":
      return [FailRequests(aw, f"aw{aw} failed; fail_fast does not recover requests")
              for aw in event.indices]
    return [Reroute(state.table_around(state.failed_ews))]


class Forgetful(RecoveryPolicy):
  """Forgets the requests of a failed AW (a bug): the engine must fail them, not wait."""

  name = "forgetful"

  def workers_failed(self, state, event):
    return [] if event.kind == "aw" else [Reroute(state.table_around(state.failed_ews))]
