"""A host agent: run one per host to serve that host's devices to an orchestrator.

  python -m tarragon_jax.launch --orchestrator=HEAD:7000 --slots=8 [--platform=cuda]

The orchestrator is any launcher run with `--config.runtime=cluster
--config.listen=0.0.0.0:7000 --config.hosts=N` (e.g. `experiments.serve`); it listens on
ports 7000 and 7001, waits for N agents, then starts AW and EW processes on their devices and
kills, stops and replaces them through the agents. See "Several hosts" in the README.
"""

from __future__ import annotations

from absl import app, flags

from tarragon_jax.runtime.cluster import REGISTER_TIMEOUT_S, Agent
from tarragon_jax.runtime.spawner import PLATFORMS

_ORCHESTRATOR = flags.DEFINE_string("orchestrator", None, "HOST:PORT the orchestrator listens on")
_SLOTS = flags.DEFINE_integer("slots", 1, "devices this host offers (one worker process each)")
_PLATFORM = flags.DEFINE_enum("platform", "cpu", PLATFORMS, "the JAX platform of the workers")
_HOST = flags.DEFINE_string("host", None, "the address workers bind and peers connect to "
                            "(default: this host's address on the route to the orchestrator)")
_ORPHAN_S = flags.DEFINE_float("orphan_s", 30.0, "exit after the orchestrator has been "
                               "unreachable this long")
_REGISTER_TIMEOUT_S = flags.DEFINE_float("register_timeout_s", REGISTER_TIMEOUT_S,
                                         "give up when the orchestrator has not accepted the "
                                         "registration this long after the start")
flags.mark_flag_as_required("orchestrator")


def main(argv):
  del argv
  agent = Agent(_ORCHESTRATOR.value, _SLOTS.value, _PLATFORM.value, _HOST.value, _ORPHAN_S.value)
  agent.register(_REGISTER_TIMEOUT_S.value)
  agent.serve()


if __name__ == "__main__":
  app.run(main)
