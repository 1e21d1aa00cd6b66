"""The client side of the engine: requests in, exactly-once token streams out, terminal errors.

A mixin of `Engine` (it reads the engine's routing table and slots, and tells its snapshot
store when a request is over). A request ends in one of two ways: DONE, with every token it
asked for, or FAILED, with a terminal error on its own stream (`TokenStream.error`) when the
engine cannot finish it correctly; every other request goes on. A step's results are applied to
the host state whole before any `on_token` callback runs, so a callback that raises leaves the
engine consistent: the events not yet handed to it are handed over at the next `step` or `run`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable

import numpy as np

from tarragon_jax.layers.sampling import SamplingParams
from tarragon_jax.serving.metrics import TokenEvent
from tarragon_jax.serving.streams import RequestFailed, TokenStream
from tarragon_jax.worker.datapath import BAD_TOKEN
from tarragon_jax.worker.requests import Phase, Request, RequestState


class RequestsFailed(RuntimeError):
  """`generate` could not finish some requests. `outputs[i]`: the tokens delivered for prompt
  i (complete where it did not fail); `errors`: {i: RequestFailed} for the prompts that
  failed."""

  def __init__(self, outputs: list[list[int]], errors: dict[int, RequestFailed]):
    first = next(iter(errors.values()))
    super().__init__(f"{len(errors)} of {len(outputs)} requests failed; the first: {first}")
    self.outputs, self.errors = outputs, errors


class Frontend:
  """Submission, streams and terminal errors. Mixed into `Engine`."""

  def _init_frontend(self, on_token: Callable[[TokenEvent], None] | None):
    self.requests: dict[int, RequestState] = {}  # submitted, finished ones until `release`
    self._open = 0  # requests submitted and not finished (`idle` is read every iteration)
    self.streams: dict[int, TokenStream] = {}
    self.waiting: list[int] = []
    self.events: list[TokenEvent] = []
    self.on_token = on_token
    self._undelivered: collections.deque[TokenEvent] = collections.deque()  # for `on_token`
    self._next_id = 0
    self.closed = False

  def _check_open(self, what: str):
    if self.closed:
      raise RuntimeError(f"Engine.{what}: the engine is closed (its workers and store are "
                         "stopped); create a new Engine")

  def submit(self, request: Request, arrival: float | None = None) -> int:
    """Queues a request and returns its id.

    Raises:
      ValueError: the request is invalid (nothing is queued).
      RuntimeError: the engine is closed.
    """
    self._check_open("submit")
    request.validate(self.cfg)
    rid = self._next_id
    self._next_id += 1
    state = RequestState(rid, request, time.perf_counter() if arrival is None else arrival)
    state.key_data = request.sampling.key_data()
    self.requests[rid] = state
    self._open += 1
    self.streams[rid] = TokenStream(rid)
    self.waiting.append(rid)
    return rid

  def tokens(self, rid: int) -> list[int]:
    """The tokens delivered to the client for request `rid`, in index order."""
    return list(self.streams[rid].tokens)

  def error(self, rid: int) -> RequestFailed | None:
    """Why request `rid` failed, or None (still running, or completed)."""
    return self.streams[rid].error

  def release(self, rids: Iterable[int] | None = None):
    """Forgets finished (completed or failed) requests (`rids`, or every finished one): their
    state, token stream and token events. The engine keeps every request it served until then
    (a run's metrics read them), so a long-lived engine releases what its clients have
    collected.

    Raises:
      ValueError: a request unknown or not finished (then nothing is released).
    """
    if rids is None:
      rids = [rid for rid, state in self.requests.items() if state.finished]
    rids = set(rids)
    for rid in rids:
      state = self.requests.get(rid)
      if state is None or not state.finished:
        raise ValueError(f"Engine.release: request {rid} is "
                         f"{'unknown' if state is None else state.phase.name.lower()}; only "
                         "finished requests can be released")
    for rid in rids:
      del self.requests[rid], self.streams[rid]
    self.events = [e for e in self.events if e.request_id not in rids]

  @property
  def idle(self) -> bool:
    return self._open == 0

  def generate(self, prompts: Iterable[Iterable[int]], max_new_tokens: int,
               sampling: SamplingParams = SamplingParams()) -> list[list[int]]:
    """Generates for a batch of prompts and returns each one's output tokens.

    Raises:
      RequestsFailed: some requests could not be finished correctly (the others were); it
        carries every request's tokens and each failed one's error.
    """
    self._check_open("generate")
    ids = [self.submit(Request(tuple(int(t) for t in p), max_new_tokens, sampling))
           for p in prompts]
    self.run()
    outputs = [self.tokens(i) for i in ids]
    errors = {k: self.error(i) for k, i in enumerate(ids) if self.error(i) is not None}
    if errors:
      raise RequestsFailed(outputs, errors)
    return outputs

  def fail_request(self, s: RequestState, cause: str):
    """Ends a request with a terminal error on its stream; its slot and snapshots are freed."""
    if s.finished:
      return
    owners = self.state.slot_owner[s.aw] if 0 <= s.aw < len(self.state.slot_owner) else None
    if owners is not None and owners[s.slot] == s.id:
      owners[s.slot] = -1
    if s.id in self.waiting:
      self.waiting.remove(s.id)
    s.phase, s.error = Phase.FAILED, cause
    self._open -= 1
    self.streams[s.id].fail(cause)
    self.timeline.add("request_failed", request=s.id, cause=cause, tokens=len(s.tokens))
    self._to_store("forget", s.id)

  def _bad_row_cause(self) -> str:
    """Why a row's result could not be computed (`datapath.BAD_TOKEN`)."""
    holes = self.state.table.unreachable()
    if holes:
      pairs = ", ".join(f"expert {e} of layer {l}" for l, e in holes[:6])
      return (f"its tokens were routed where no live replica is left ({pairs}"
              f"{', ...' if len(holes) > 6 else ''}) and no replacement is being built")
    return ("its activations or logits were not finite (NaN or Inf): an expert's output or a "
            "weight is invalid")

  def _emit(self, rows: list[RequestState], sampled: np.ndarray):
    """Applies one AW's sampled tokens to its rows' state, then hands the new events on."""
    now = time.perf_counter()
    for s in rows:
      if s.finished:
        continue
      token = int(sampled[s.slot])
      if token == BAD_TOKEN:
        self.fail_request(s, self._bad_row_cause() + f" (at token index {len(s.tokens)})")
        continue
      index = len(s.tokens)
      s.cached += len(s.feed)
      s.tokens.append(token)
      s.phase = Phase.DECODE
      if self.streams[s.id].offer(index, token, now):
        event = TokenEvent(s.id, index, token, now)
        self.events.append(event)
        if self.on_token is not None:
          self._undelivered.append(event)
      if s.finished_by(token):
        s.phase = Phase.DONE
        self._open -= 1
        self.state.slot_owner[s.aw][s.slot] = -1
        self._to_store("forget", s.id)

  def _deliver(self):
    """Hands queued events to `on_token`, each once; one that raises is not handed again."""
    while self._undelivered:
      self.on_token(self._undelivered.popleft())
