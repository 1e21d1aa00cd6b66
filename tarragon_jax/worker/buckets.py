"""Power-of-two length buckets: step lengths are padded to one, so each compiles once."""

from __future__ import annotations


def bucket(n: int, minimum: int, maximum: int) -> int:
  """The smallest power-of-two multiple of `minimum` that holds n, capped at `maximum`."""
  b = minimum
  while b < n:
    b *= 2
  return min(b, maximum)


def all_buckets(minimum: int, maximum: int) -> list[int]:
  """Every bucket `bucket` can return for 1 <= n <= maximum, ascending."""
  out = [bucket(1, minimum, maximum)]
  while out[-1] < maximum:
    out.append(bucket(out[-1] + 1, minimum, maximum))
  return out
