"""A worker call's value, the same code for a worker in this process and one in its own."""

from __future__ import annotations


def wait(out, timeout_s: float | None = None, what: str | None = None,
         setting: str | None = None):
  """A worker call's value: a local worker's as it is; a process runtime's `Pending` reply
  waited for, at most `timeout_s` and not at all once its worker's process is gone.

  Args:
    out: what the worker call returned.
    timeout_s: the longest wait for a reply (None: the bound the worker's proxy gave it, from
      the engine's `ResilienceConfig`).
    what: the operation, for errors (e.g. "aw0 warm_up").
    setting: the configuration field `timeout_s` comes from, for errors (e.g.
      "ResilienceConfig.warm_up_timeout_s").

  Raises:
    WorkerDead: the worker's process is gone (named, with its exit code where known).
    TimeoutError: no reply within the bound from a live process (the worker, the operation,
      the bound and its setting named).
    RemoteError: the call failed in the worker's process.
  """
  return out.result(timeout_s, what, setting) if hasattr(out, "arrived") else out
