"""Requests, their validation, and per-request state on the host."""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from tarragon_jax.config import ModelConfig
from tarragon_jax.layers.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Request:
  """A generation request: prompt token ids, how many tokens to generate, how to sample."""

  prompt: tuple[int, ...]
  max_new_tokens: int
  sampling: SamplingParams = SamplingParams()
  stop_tokens: tuple[int, ...] = ()

  def validate(self, cfg: ModelConfig):
    """Raises ValueError naming the bad value if this request cannot be served by `cfg`."""
    for name in ("prompt", "stop_tokens"):
      value = getattr(self, name)
      if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"Request: {name}={value!r} must be a sequence of int token ids")
    if len(self.prompt) == 0:
      raise ValueError("Request: the prompt is empty; give at least one token id")
    if (not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool)
        or self.max_new_tokens <= 0):
      raise ValueError(f"Request: max_new_tokens={self.max_new_tokens!r} must be an int >= 1")
    if not isinstance(self.sampling, SamplingParams):
      raise ValueError(f"Request: sampling={self.sampling!r} must be a SamplingParams")
    # Type first, range second: int("x") or 0 <= "x" would fail with a message that names
    # neither the request field nor the vocabulary.
    for name, what in (("prompt", "prompt token ids"), ("stop_tokens", "stop tokens")):
      tokens = getattr(self, name)
      not_ints = [t for t in tokens if not isinstance(t, (int, np.integer)) or isinstance(t, bool)]
      if not_ints:
        raise ValueError(f"Request: {what} must be ints; got {not_ints[:5]}")
      bad = [t for t in tokens if not 0 <= int(t) < cfg.vocab_size]
      if bad:
        raise ValueError(f"Request: {what} {bad[:5]} are outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    need = len(self.prompt) + self.max_new_tokens - 1
    if need > cfg.max_seq_len:
      raise ValueError(
          f"Request: prompt of {len(self.prompt)} tokens + max_new_tokens={self.max_new_tokens} "
          f"needs {need} cache positions but a slot holds max_seq_len={cfg.max_seq_len}")


class Phase(enum.Enum):
  WAITING = "waiting"  # submitted, not yet on an AW
  PREFILL = "prefill"  # placed in a slot, prompt not yet processed
  DECODE = "decode"
  DONE = "done"
  FAILED = "failed"  # ended with a terminal error (`RequestState.error`); never resumed


@dataclasses.dataclass
class RequestState:
  """Host-side progress of one request. Output token i is `tokens[i]`."""

  id: int
  request: Request
  arrival: float
  phase: Phase = Phase.WAITING
  aw: int = -1
  slot: int = -1
  cached: int = 0  # positions of prompt + tokens whose KV is in the slot
  tokens: list[int] = dataclasses.field(default_factory=list)  # generated (may be recomputed)
  key_data: np.ndarray | None = None  # the request's PRNG key (travels with it on a restore)
  restore: bool = False  # its AW failed: restore (or re-prefill) it when it is placed again
  lost_layer: int = 0  # layers of its current step done when its AW failed
  failed_at: tuple[int, int] = (0, 0)  # (cached positions, tokens being fed) at that failure
  error: str | None = None  # why it failed (phase FAILED)

  @property
  def feed(self) -> list[int]:
    """The tokens this request still has to feed: prompt + generated tokens past `cached`."""
    prompt = self.request.prompt
    if self.cached >= len(prompt):
      return self.tokens[self.cached - len(prompt):]
    return list(prompt[self.cached:]) + self.tokens

  @property
  def done(self) -> bool:
    """Completed: every token it asked for (or a stop token) was generated."""
    return self.phase is Phase.DONE

  @property
  def finished(self) -> bool:
    """Completed or failed: the engine will do nothing more for it."""
    return self.phase in (Phase.DONE, Phase.FAILED)

  def finished_by(self, token: int) -> bool:
    return (len(self.tokens) >= self.request.max_new_tokens
            or token in self.request.stop_tokens)
