"""Every test runs on the CPU platform with 8 devices (AW/EW cells are carved from them).

At the end of the session, pytest's summary lists every worker an engine declared failed that
no fault explains (`Timeline.unexplained_declarations`): false alarms of the detector, which a
test that recovers from them would otherwise hide. Any such alarm fails the session.
`TARRAGON_FALSE_ALARMS=path` also writes them there as JSON lines.
"""

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from tarragon_jax.runtime.compile_cache import DEFAULT_COMPILE_CACHE, enable_compile_cache  # noqa: E402, I001
from tarragon_jax.serving.engine import Engine  # noqa: E402

# Each worker cell compiles its own executables; keep them across test runs.
enable_compile_cache(DEFAULT_COMPILE_CACHE)

_TIMELINES: list[tuple[str, object]] = []  # (test id, an engine's timeline) of every engine
_current_test = ["(collection)"]
_engine_init = Engine.__init__


def _watched_init(self, *args, **kwargs):
  _engine_init(self, *args, **kwargs)
  _TIMELINES.append((_current_test[0], self.timeline))


Engine.__init__ = _watched_init


@pytest.fixture(autouse=True)
def _name_the_test(request):
  _current_test[0] = request.node.nodeid
  yield


def _false_alarms() -> list[dict]:
  return [dict(test=test, worker=e["worker"], how=e["how"])
          for test, tl in _TIMELINES for e in tl.unexplained_declarations()]


def pytest_sessionfinish(session):
  """A false alarm fails the session, even if every test recovered from it."""
  alarms = _false_alarms()
  path = os.environ.get("TARRAGON_FALSE_ALARMS")
  if path:
    with open(path, "w") as f:
      f.writelines(json.dumps(a) + "\n" for a in alarms)
  if alarms and session.exitstatus == 0:
    session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
  alarms = _false_alarms()
  terminalreporter.write_line(f"workers declared failed that no fault explains: {len(alarms)} "
                              f"(in {len(_TIMELINES)} engines)" + (": FAILED" if alarms else ""))
  for a in alarms:
    terminalreporter.write_line(f"  {a['test']}: {a['worker']} ({a['how']})")
