"""Exactly-once token streams: what a client sees of each request."""

from __future__ import annotations


class StreamGap(RuntimeError):
  """A token index arrived before the ones preceding it (a lost token)."""


class RequestFailed(RuntimeError):
  """A request ended with a terminal error: the engine could not finish it correctly. The
  tokens delivered before it are correct; no more will come."""

  def __init__(self, request_id: int, cause: str):
    super().__init__(f"request {request_id} failed: {cause}")
    self.request_id, self.cause = request_id, cause


class TokenStream:
  """Delivers each output index of one request once and in order, across any failovers.

  A recovery may produce indices the client already has (the baseline recomputes every token);
  those are compared with what was delivered and dropped. A mismatch is recorded, not hidden.
  A request the engine cannot finish correctly ends with `error` (a `RequestFailed`).
  """

  def __init__(self, request_id: int):
    self.request_id = request_id
    self.tokens: list[int] = []
    self.times: list[float] = []
    self.duplicates = 0
    self.mismatches: list[tuple[int, int, int]] = []  # (index, delivered, recomputed)
    self.error: RequestFailed | None = None

  def __len__(self) -> int:
    return len(self.tokens)

  def offer(self, index: int, token: int, time: float) -> bool:
    """Returns True if (index, token) is new and was delivered; False for a duplicate."""
    if index < len(self.tokens):
      self.duplicates += 1
      if self.tokens[index] != token:
        self.mismatches.append((index, self.tokens[index], token))
      return False
    if index > len(self.tokens):
      raise StreamGap(f"request {self.request_id}: token index {index} offered but only "
                      f"{len(self.tokens)} delivered")
    self.tokens.append(token)
    self.times.append(time)
    return True

  def fail(self, cause: str):
    """Ends the stream with a terminal error."""
    self.error = RequestFailed(self.request_id, cause)
