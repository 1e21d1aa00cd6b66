"""Worker processes as Ray actors, on the nodes of a Ray cluster.

Ray places, starts and watches the processes; everything per step stays ours. An actor is a
worker process (`tarragon_jax.runtime.host`, the same code as every other runtime's): its
serve loop runs in a thread of the actor's process, bound on the node's address, and the
control plane talks to it over its own endpoint and probes, peers over the data plane, never
through Ray calls. The snapshot store and its standby are actors too, on the node of this
(the control plane's) process. What Ray adds is the lifecycle: placement on a node's resources, the
process itself, and a second, slower notice of its death (the actor's `watch` call fails).

A slot is one device of one node: on GPU nodes a GPU (`num_gpus=1`, Ray sets the process's visible
device), on TPU nodes a chip (the `TPU` resource; Ray sets the visible chip and the one-chip
topology, the actor picks a libtpu port of its own), on CPU nodes one unit of the custom resource
`SLOT_RESOURCE` (start a node with `ray start --resources='{"tarragon_slot": 8}'`). The spawner
reserves every slot of the cluster in one placement group, one bundle per slot, and slot i is bundle
i. The process runtime gives its AW cells the first slots and its EW cells the next, so the group's
strategy is the layout: "pack" (`PACK`: bundles fill a node before the next, so AWs and EWs land on
different nodes when a node offers `num_aw` slots, as in the paper) or "spread" (`SPREAD`: bundles
dealt out over the nodes, so every node holds AWs and EWs and losing one leaves some of each). Nodes
are numbered in the order their first slot comes (`kill:node1` takes the second).

Faults stay real: `signal` is a real signal to the actor's process, delivered by this
process when the node is this host (as in a test cluster on one machine), else by the actor
to itself.

Importing this module imports Ray; nothing else in the library does.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import ray
from ray.util.placement_group import (
  placement_group,
  placement_group_table,
  remove_placement_group,
)
from ray.util.scheduling_strategies import (
  NodeAffinitySchedulingStrategy,
  PlacementGroupSchedulingStrategy,
)

from tarragon_jax.runtime.channel import Bound
from tarragon_jax.runtime.spawner import ProcessStat, SpawnError, tpu_chip_env, worker_env

SLOT_RESOURCE = "tarragon_slot"  # a CPU node's worker slots
RESOURCE = {"cpu": SLOT_RESOURCE, "tpu": "TPU"}  # platform -> the resource of a slot; else GPU
# What a worker on a CPU slot asks of it. A CPU slot is a logical device (the process runtime's
# CPU slots are the same): engines side by side, e.g. a benchmark's variants, share it as
# processes share a host's cores. Its bundle places the actor; the resource only marks slots.
CPU_SLOT_SHARE = 1 / 64
LAYOUTS = {"pack": "PACK", "spread": "SPREAD"}  # layout -> placement group strategy
RESERVE_S = 120.0  # the longest wait for the cluster to place the placement group
GONE_EVERY_S = 0.1  # how often a wait on a worker asks Ray whether its actor died


@ray.remote(num_cpus=0, max_concurrency=4)
class WorkerActor:
  """One worker process. Its calls run in threads of their own (`max_concurrency`), so that
  `watch` waits for the whole life of the actor without holding up the others."""

  def start(self, compile_cache: str) -> tuple[int, str, str, str]:
    """Binds the worker's endpoint on this node's address and serves it in a thread; returns
    (pid, hostname, address, probe address)."""
    chips = os.environ.get("TPU_VISIBLE_CHIPS", "")
    if chips.isdigit():  # Ray gave this TPU actor one chip: it needs a libtpu port of its own
      os.environ.update(tpu_chip_env(chips))
    from tarragon_jax.runtime import host as worker_host  # (imports JAX: in the actor only)

    # Ray starts its workers at niceness 15 (`RAY_worker_niceness`), behind the control plane
    # and the store on a shared host: a worker's scheduling would then measure that, not us.
    try:
      os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:  # (lowering niceness needs privilege; `local_cluster` starts workers at 0)
      pass
    address = ray.util.get_node_ip_address()
    endpoint = worker_host.bind(compile_cache, address)
    threading.Thread(target=worker_host.serve_until_exit, args=(endpoint, address),
                     name="serve", daemon=True).start()
    return os.getpid(), socket.gethostname(), endpoint.address, endpoint.probe_address

  def watch(self):
    """Never returns: the driver's reference to this call fails once the actor is dead."""
    threading.Event().wait()

  def signal(self, sig: int):
    """`sig` to this process (a fault on a node that the driver cannot signal itself)."""
    os.kill(os.getpid(), sig)


class RayChild:
  """A worker process that is a Ray actor (see the module docstring), started with `options`
  (`WorkerActor.options`: where it goes, what it holds); `where` names it in errors."""

  def __init__(self, options: dict, where: str, compile_cache: str, platform: str,
               start: Bound):
    self.where, self.start = where, start
    env = {k: v for k, v in worker_env(platform, None).items()
           if k.startswith(("JAX_", "XLA_"))}
    self.actor = WorkerActor.options(**options, runtime_env={"env_vars": env}).remote()
    self._started = self.actor.start.remote(compile_cache)
    self._watch = self.actor.watch.remote()
    self.pid: int | None = None
    self._stat: ProcessStat | None = None  # the process's /proc entry, when it is on this host
    self._gone: str | None = None
    self._asked = 0.0

  def ready(self) -> tuple[str, str]:
    """Waits for the actor's process to bind its endpoint; its addresses.

    Raises:
      SpawnError: the actor died first, or did not start within its start bound (it is
        killed then).
    """
    try:
      self.pid, hostname, address, probe_address = ray.get(self._started,
                                                           timeout=self.start.seconds)
    except ray.exceptions.GetTimeoutError:
      self.stop()
      raise SpawnError(f"{self.where}: the worker actor did not start within "
                       f"{self.start.seconds:g} s (set by {self.start.setting})") from None
    except ray.exceptions.RayError as err:
      raise SpawnError(f"{self.where}: the worker actor did not start: {err}") from err
    self._stat = ProcessStat(self.pid if hostname == socket.gethostname() else None)
    return address, probe_address

  def gone(self) -> str | None:
    """None while the process may run, else why it does not: at once from the kernel when it
    is on this host (it is exiting), else from Ray (the actor died; asked at most once per
    `GONE_EVERY_S`)."""
    if self._gone is not None:
      return self._gone
    if self._stat is not None:
      self._gone = self._stat.exiting()
    now = time.perf_counter()
    if self._gone is None and now - self._asked >= GONE_EVERY_S:
      self._asked = now
      if ray.wait([self._watch], timeout=0)[0]:
        try:
          ray.get(self._watch)
        except ray.exceptions.RayError as err:
          self._gone = f"its Ray actor died ({type(err).__name__})"
    return self._gone

  def alive(self) -> bool:
    return self.gone() is None

  def signal(self, sig: int):
    """Sends `sig` to the actor's process and returns at once."""
    if self.pid is None or self.gone() is not None:  # (a gone process's pid may be reused)
      return
    if self._stat is not None:
      try:
        os.kill(self.pid, sig)
      except ProcessLookupError:
        pass
    else:
      self.actor.signal.remote(int(sig))

  def stop(self):
    """Ends the actor (Ray kills its process)."""
    ray.kill(self.actor, no_restart=True)
    if self._stat is not None:
      self._stat.close()


class RaySpawner:
  """Worker processes as actors on the nodes of the Ray cluster at `address` ("auto": the one
  this host belongs to; None: connect to the one `ray.init` already joined)."""

  def __init__(self, address: str | None = "auto", platform: str = "cpu", layout: str = "pack",
               cluster=None):
    """`layout`: one of `LAYOUTS` (see the module docstring). `cluster`: a
    `ray.cluster_utils.Cluster` this spawner owns (`local_cluster`): shut down by `close`."""
    worker_env(platform, None)  # validates
    if layout not in LAYOUTS:
      raise ValueError(f"RaySpawner: layout={layout!r}; use one of {tuple(LAYOUTS)}")
    if not ray.is_initialized():
      ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    self.platform, self.cluster = platform, cluster
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    key = RESOURCE.get(platform, "GPU")
    count = sum(int(n["Resources"].get(key, 0)) for n in nodes.values())
    if not count:
      raise SpawnError(f"the Ray cluster offers no {key!r} resource on any of its "
                       f"{len(nodes)} nodes: start its nodes with "
                       + ("--resources='{\"tarragon_slot\": N}'" if key == SLOT_RESOURCE
                          else "GPUs"))
    self.group = placement_group([{key: 1}] * count, strategy=LAYOUTS[layout])
    try:
      ray.get(self.group.ready(), timeout=RESERVE_S)
    except ray.exceptions.GetTimeoutError:
      remove_placement_group(self.group)
      raise SpawnError(f"the Ray cluster did not place {count} {key!r} slots within "
                       f"{RESERVE_S:g} s (are some held by another job?)") from None
    placed = placement_group_table(self.group)["bundles_to_node_id"]
    self._node = [nodes[placed[i]] for i in range(count)]  # slot -> its node
    self.slots = list(range(count))

  def nodes(self) -> list[list[int]]:
    """The slots of each node, in node order (a fault `node<i>` takes node i's)."""
    ids = list(dict.fromkeys(n["NodeID"] for n in self._node))
    return [[s for s, n in enumerate(self._node) if n["NodeID"] == i] for i in ids]

  def spawn(self, slot: int | None, compile_cache: str, start: Bound) -> RayChild:
    """An actor on `slot`'s node and device (None: a deviceless process, the snapshot store,
    on this node), which must start within `start`."""
    if slot is None:  # the snapshot store: beside the control plane, as on one host
      here = ray.get_runtime_context().get_node_id()
      return RayChild(dict(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)),
                      f"a deviceless actor on this node ({here[:8]})", compile_cache, "cpu",
                      start)
    node, key = self._node[slot], RESOURCE.get(self.platform, "GPU")
    options = dict(scheduling_strategy=PlacementGroupSchedulingStrategy(
                       self.group, placement_group_bundle_index=slot),
                   num_gpus=1 if key == "GPU" else 0,
                   resources={SLOT_RESOURCE: CPU_SLOT_SHARE} if key == SLOT_RESOURCE
                   else {"TPU": 1} if key == "TPU" else {})
    return RayChild(options, f"slot {slot} on node {node['NodeID'][:8]} "
                    f"({node['NodeManagerAddress']})", compile_cache, self.platform, start)

  @classmethod
  def local_cluster(cls, nodes: int, slots_per_node: int, layout: str = "pack") -> RaySpawner:
    """A spawner on a Ray cluster of `nodes` nodes started here (on 127.0.0.1; run it in a
    network namespace with only loopback up, or Ray also registers the host's address), each
    with `slots_per_node` CPU slots. `close` shuts the cluster down."""
    from ray.cluster_utils import Cluster

    if nodes < 1 or slots_per_node < 1:
      raise ValueError(f"a local Ray cluster needs nodes >= 1 and slots_per_node >= 1, not "
                       f"{nodes} and {slots_per_node}")
    args = {"num_cpus": 1, "resources": {SLOT_RESOURCE: slots_per_node}}
    os.environ.setdefault("RAY_worker_niceness", "0")  # (see `WorkerActor.start`)
    cluster = Cluster(initialize_head=True, head_node_args=dict(args, include_dashboard=False))
    for _ in range(nodes - 1):
      cluster.add_node(**args)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    return cls(None, layout=layout, cluster=cluster)

  def close(self):
    """Frees the slots, and shuts down the cluster this spawner started, if any (the actors
    end with their engines; a cluster joined by address is left as it was)."""
    if self.group is not None:
      remove_placement_group(self.group)
      self.group = None
    if self.cluster is not None:
      ray.shutdown()
      self.cluster.shutdown()
      self.cluster = None
