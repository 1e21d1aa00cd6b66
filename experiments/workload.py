"""Serving workloads as the paper runs them, and their real-time replay through an Engine.

A workload is a list of `(arrival_s, Request)` sorted by arrival time, with arrival times in
seconds from the start of the run. Both generators draw Poisson arrivals (exponential gaps at
`rate` requests per second; `rate=inf` puts every request at t = 0) and random prompt token
ids in the vocabulary, from one numpy seed:

- `random_workload`: fixed-length prompts and outputs; the paper's "Random" is 10 prompt
  tokens and 128 output tokens.
- `sharegpt_workload`: a ShareGPT-like length mix. Prompt and output lengths are log-normal
  with ShareGPT's means (161 prompt tokens and 338 output tokens, as reported for the vLLM
  ShareGPT benchmark set), heavy-tailed (`sigma`), clipped so that every request fits one KV
  slot of `max_seq_len` tokens. `scale` shrinks both means for small models.

`replay` drives an Engine in real time: a request is submitted once its arrival time has
passed (stamped with that arrival time, so TTFT includes queueing), `Engine.step` runs while
anything is in flight, and the loop sleeps while nothing is.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np

from tarragon_jax.config import ModelConfig
from tarragon_jax.serving.metrics import TokenEvent, latency_summary
from tarragon_jax.worker.buckets import all_buckets, bucket
from tarragon_jax.worker.requests import Request

Workload = list[tuple[float, Request]]

KINDS = ("random", "sharegpt")
SHAREGPT_PROMPT_MEAN = 161.0  # tokens, mean prompt length of the ShareGPT set
SHAREGPT_OUTPUT_MEAN = 338.0  # tokens, mean output length of the ShareGPT set


def poisson_arrivals(num_requests: int, rate: float, rng: np.random.Generator) -> np.ndarray:
  """f64[num_requests] sorted arrival times (s): exponential gaps of mean 1/rate, first at 0.

  `rate=inf` gives every request arrival 0 (an offline batch).
  """
  if not rate > 0:
    raise ValueError(f"poisson_arrivals: rate={rate} req/s must be > 0 (inf = all at t=0)")
  if math.isinf(rate):
    return np.zeros(num_requests)
  gaps = rng.exponential(1.0 / rate, num_requests)
  gaps[0] = 0.0  # the run starts with a request, not with an idle gap
  return np.cumsum(gaps)


def _check_count(num_requests: int):
  if not isinstance(num_requests, int) or num_requests < 1:
    raise ValueError(f"workload: num_requests={num_requests!r} must be an int >= 1")


def _build(arrivals: np.ndarray, prompt_lens, output_lens, vocab_size: int,
           rng: np.random.Generator) -> Workload:
  return [(float(t), Request(tuple(int(x) for x in rng.integers(0, vocab_size, int(p))), int(o)))
          for t, p, o in zip(arrivals, prompt_lens, output_lens, strict=True)]


def random_workload(num_requests: int, rate: float, vocab_size: int, *, prompt_len: int = 10,
                    output_len: int = 128, seed: int = 0) -> Workload:
  """The paper's "Random" workload: `prompt_len` random tokens in, `output_len` tokens out."""
  _check_count(num_requests)
  if prompt_len < 1 or output_len < 1:
    raise ValueError(f"random_workload: prompt_len={prompt_len} and output_len={output_len} "
                     f"must be >= 1")
  rng = np.random.default_rng(seed)
  arrivals = poisson_arrivals(num_requests, rate, rng)
  return _build(arrivals, [prompt_len] * num_requests, [output_len] * num_requests, vocab_size,
                rng)


def sharegpt_lengths(num_requests: int, max_seq_len: int, rng: np.random.Generator, *,
                     prompt_mean: float = SHAREGPT_PROMPT_MEAN,
                     output_mean: float = SHAREGPT_OUTPUT_MEAN, sigma: float = 1.0,
                     scale: float = 1.0, max_prompt_len: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Log-normal (prompt, output) lengths, i64[n] each, clipped to fit a slot.

  Each length is exp(N(mu, sigma^2)) with mu chosen so the unclipped mean is `scale * mean`.
  Prompts are clipped to [1, max_prompt_len] (default max_seq_len // 2), then outputs to
  [1, max_seq_len + 1 - prompt] (a request needs prompt + output - 1 cache positions).
  """
  if sigma < 0 or scale <= 0 or prompt_mean <= 0 or output_mean <= 0:
    raise ValueError(f"sharegpt_lengths: need sigma >= 0 (got {sigma}), scale > 0 (got {scale}) "
                     f"and positive means (got {prompt_mean}, {output_mean})")
  max_prompt = max_seq_len // 2 if max_prompt_len is None else max_prompt_len
  if not 1 <= max_prompt <= max_seq_len:
    raise ValueError(f"sharegpt_lengths: max_prompt_len={max_prompt} must be in "
                     f"[1, max_seq_len={max_seq_len}]")

  def lognormal(mean: float) -> np.ndarray:
    mu = math.log(scale * mean) - sigma**2 / 2  # E[exp(N(mu, s^2))] = exp(mu + s^2 / 2)
    return np.rint(rng.lognormal(mu, sigma, num_requests)).astype(np.int64)

  prompts = np.clip(lognormal(prompt_mean), 1, max_prompt)
  outputs = np.clip(lognormal(output_mean), 1, max_seq_len + 1 - prompts)
  return prompts, outputs


def sharegpt_workload(num_requests: int, rate: float, vocab_size: int, max_seq_len: int, *,
                      prompt_mean: float = SHAREGPT_PROMPT_MEAN,
                      output_mean: float = SHAREGPT_OUTPUT_MEAN, sigma: float = 1.0,
                      scale: float = 1.0, max_prompt_len: int | None = None,
                      seed: int = 0) -> Workload:
  """A ShareGPT-like length mix with Poisson arrivals; see `sharegpt_lengths`."""
  _check_count(num_requests)
  rng = np.random.default_rng(seed)
  arrivals = poisson_arrivals(num_requests, rate, rng)
  prompts, outputs = sharegpt_lengths(num_requests, max_seq_len, rng, prompt_mean=prompt_mean,
                                      output_mean=output_mean, sigma=sigma, scale=scale,
                                      max_prompt_len=max_prompt_len)
  return _build(arrivals, prompts, outputs, vocab_size, rng)


def make_workload(kind: str, cfg: ModelConfig, *, num_requests: int, rate: float, seed: int = 0,
                  **kwargs) -> Workload:
  """A workload of `kind` ("random" | "sharegpt") for model `cfg`, every request validated.

  `kwargs` go to the generator (random: prompt_len, output_len; sharegpt: prompt_mean,
  output_mean, sigma, scale, max_prompt_len).

  Raises:
    ValueError: unknown kind, or a request the model cannot serve (Request.validate's message).
  """
  if kind == "random":
    work = random_workload(num_requests, rate, cfg.vocab_size, seed=seed, **kwargs)
  elif kind == "sharegpt":
    work = sharegpt_workload(num_requests, rate, cfg.vocab_size, cfg.max_seq_len, seed=seed,
                             **kwargs)
  else:
    raise ValueError(f"make_workload: kind={kind!r}; valid kinds are {KINDS}")
  for _, request in work:
    request.validate(cfg)
  return work


def prefill_lengths(work: Workload, min_bucket: int, max_seq_len: int) -> list[int]:
  """One prompt length per prefill bucket the engine can use for `work` (for warm-up).

  The engine pads a prefill iteration to the power-of-two bucket (>= min_bucket, <= max_seq_len)
  of its longest prompt, so any bucket between those of the shortest and longest prompts can
  occur. Each returned length falls in one of those buckets and leaves room for one decode step.
  """
  lens = [len(r.prompt) for _, r in work]
  lo, hi = (bucket(n, min_bucket, max_seq_len) for n in (min(lens), max(lens)))
  return [min(b, max_seq_len - 1) for b in all_buckets(min_bucket, max_seq_len) if lo <= b <= hi]


def warm_up(engine, work: Workload) -> int:
  """Compiles everything `work` will run on `engine`, so the measured run compiles nothing.

  Per prefill bucket of `work`, one request of that length per AW (admission spreads them
  over every AW; each cell compiles its own executables) generating two tokens, which runs
  one prefill and one decode iteration everywhere. Returns the number of warm-up requests.
  """
  num_aw = len(engine.state.aws)
  lengths = prefill_lengths(work, engine.engine_cfg.min_prefill_bucket, engine.cfg.max_seq_len)
  for n in lengths:
    engine.generate([[0] * n] * num_aw, 2)
  return len(lengths) * num_aw


@dataclasses.dataclass
class ReplayResult:
  """What `replay` ran: engine request ids in workload order and the run's time window."""

  ids: list[int]
  start: float  # perf_counter() at t = 0 of the workload
  end: float  # perf_counter() when the last request finished

  def events(self, engine) -> list[TokenEvent]:
    """The engine's token events of this run's requests, in emission order."""
    mine = set(self.ids)
    return [e for e in engine.events if e.request_id in mine]

  def arrivals(self, engine) -> dict[int, float]:
    """Request id -> arrival time (perf_counter seconds) of this run's requests."""
    return {r: engine.requests[r].arrival for r in self.ids}

  def summary(self, engine) -> dict:
    """requests, completed, output_tokens, throughput and TTFT/TBT percentiles of this run."""
    states = [engine.requests[r] for r in self.ids]
    out = dict(requests=len(states), completed=sum(s.done for s in states),
               wall_s=self.end - self.start)
    out.update(latency_summary(self.arrivals(engine), self.events(engine)))
    return out


def replay(engine, work: Workload, *, timeout_s: float = 3600.0,
           clock: Callable[[], float] = time.perf_counter,
           sleep: Callable[[float], None] = time.sleep) -> ReplayResult:
  """Runs `work` through `engine` in real time until every request is done.

  Requests are submitted when their arrival time has passed, with that arrival time (so a
  request's TTFT counts from when it arrived, not from when the loop noticed it).

  Raises:
    TimeoutError: the run took longer than `timeout_s`.
  """
  start = clock()
  ids: list[int] = []
  pending = 0
  while pending < len(work) or not engine.idle:
    now = clock() - start
    if now > timeout_s:
      raise TimeoutError(f"replay: {len(ids)}/{len(work)} requests submitted, not all done "
                         f"after {timeout_s} s")
    while pending < len(work) and work[pending][0] <= now:
      arrival, request = work[pending]
      ids.append(engine.submit(request, arrival=start + arrival))
      pending += 1
    if engine.idle:
      if pending < len(work):
        sleep(max(0.0, work[pending][0] - (clock() - start)))
      continue
    engine.step()
  return ReplayResult(ids, start, clock())
