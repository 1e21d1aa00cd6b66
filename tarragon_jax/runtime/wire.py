"""Messages between worker processes: a JSON header plus one frame per array.

`encode` turns a message (nested dicts with string keys, lists, tuples, numbers, strings, None
and arrays) into frames for a ZeroMQ multipart send; arrays travel as their raw bytes, not
copied into the header. `decode` rebuilds the message; arrays come back as read-only numpy
views of the received frames (no copy).
"""

from __future__ import annotations

import json

import ml_dtypes  # noqa: F401 - registers bfloat16 & co. with numpy, so they can travel
import numpy as np

_ARRAY, _TUPLE = "__array__", "__tuple__"


def encode(message) -> list:
  """Frames of `message`: [header (bytes), array buffers...].

  Raises:
    TypeError: a value that cannot travel (named, with what can).
  """
  arrays: list[np.ndarray] = []

  def walk(x):
    if isinstance(x, (bool, int, float, str)) or x is None:
      return x
    if isinstance(x, np.generic):
      return x.item()
    if hasattr(x, "__array__") and not isinstance(x, (list, tuple, dict)):
      a = np.ascontiguousarray(np.asarray(x))
      arrays.append(a)
      return {_ARRAY: len(arrays) - 1, "dtype": a.dtype.name, "shape": list(a.shape)}
    if isinstance(x, tuple):
      return {_TUPLE: [walk(v) for v in x]}
    if isinstance(x, list):
      return [walk(v) for v in x]
    if isinstance(x, dict):
      bad = [k for k in x if not isinstance(k, str) or k in (_ARRAY, _TUPLE)]
      if bad:
        raise TypeError(f"wire: dict keys must be strings other than {_ARRAY!r} and "
                        f"{_TUPLE!r}; got {bad[:3]}")
      return {k: walk(v) for k, v in x.items()}
    raise TypeError(f"wire: cannot send a {type(x).__name__}; send arrays, numbers, strings, "
                    f"None, lists, tuples and dicts of them")

  header = json.dumps(walk(message)).encode()
  return [header, *arrays]


def decode(frames) -> object:
  """The message `encode` made; frames may be bytes or zmq.Frame objects."""
  buffers = [f.buffer if hasattr(f, "buffer") else f for f in frames]
  header = json.loads(bytes(buffers[0]))

  def walk(x):
    if isinstance(x, list):
      return [walk(v) for v in x]
    if isinstance(x, dict):
      if _ARRAY in x:
        a = np.frombuffer(buffers[1 + x[_ARRAY]], dtype=np.dtype(x["dtype"]))
        return a.reshape(x["shape"])
      if _TUPLE in x:
        return tuple(walk(v) for v in x[_TUPLE])
      return {k: walk(v) for k, v in x.items()}
    return x

  return walk(header)


def array_bytes(message) -> tuple[int, int]:
  """(bytes of every array in `message`, bytes of its floating-point arrays), without encoding
  it: what a message carries as data (the driver counts them, e.g. to show that no activation
  passes through it)."""
  total = floating = 0
  stack = [message]
  while stack:
    x = stack.pop()
    if isinstance(x, dict):
      stack.extend(x.values())
    elif isinstance(x, (list, tuple)):
      stack.extend(x)
    elif hasattr(x, "__array__") and not isinstance(x, (str, bytes)):
      a = np.asarray(x)
      total += a.nbytes
      floating += a.nbytes if np.issubdtype(a.dtype, np.floating) or a.dtype.kind == "V" else 0
  return total, floating
