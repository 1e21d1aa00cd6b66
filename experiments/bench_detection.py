"""Failure detection on real worker processes: false alarms and detection latency, under load.

  python -m experiments.bench_detection --config=configs/bench_detection.py

Worker processes (`tarragon_jax.runtime.host`, started by `LocalSpawner`) are reached through
`RemoteWorker` proxies, with the heartbeat settings of the process runtime. For each load
("quiet"; then "loaded": `burners` CPU-burner processes beside it), with a new detector of each
kind ("adaptive": `DetectionConfig`'s defaults; "fixed": `adaptive=False`, a one-interval
timeout in wall time, the detector as it was):

1. healthy: for `healthy_s`, every detector at once (a thread each, each on its own `peers`
   processes, so that all see the same load): rounds of one request to each peer, waited for
   with `Detector.wait` as the exchange does, then `idle_s` of `Detector.watch` on every peer.
   Nothing is faulted, so every declaration is false (the peer is forgotten and kept);
2. faults, one detector after the other: `reps` times each, a fresh process gets `warm_rounds`
   rounds of requests, then SIGKILL or SIGSTOP, then a request that it will never answer; the
   time from the signal to its declaration is its detection latency.

Prints one row per load and detector (false declarations per probes made; detection median and
p95; how many kills were declared by their closed connection rather than by probes) and the
ratios loaded / quiet; writes results.jsonl (a record per healthy phase and per fault) and
summary.json to the workdir.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import numpy as np
from absl import app

from experiments import launch_config
from tarragon_jax.resilience.detector import DetectionConfig, Detector
from tarragon_jax.runtime.channel import Bound, Pending
from tarragon_jax.runtime.remote import ProcessCell, RemoteWorker
from tarragon_jax.runtime.spawner import LocalSpawner
from tarragon_jax.serving.engine_config import ResilienceConfig

_CONFIG, _WORKDIR, _CACHE = launch_config.define_flags("configs/bench_detection.py")


class Peer(RemoteWorker):
  """A worker process that serves no model: it answers each request with an error reply (it
  was never built), which is data all the same. Counts its probes."""

  probes = 0

  def probe(self) -> bool:
    self.probes += 1
    return super().probe()

  def ask(self) -> Pending:
    return self._send("ask", {"op": "attr", "name": "bench_detection"})


def spawn(spawner: LocalSpawner, rc: ResilienceConfig, names: list[str], cache: str) -> list:
  start = Bound(rc.start_timeout_s, "ResilienceConfig.start_timeout_s")
  return [Peer(n[:2], int(n[2:]), ProcessCell(n, (0,)), None, rc,
               spawner.spawn(None, cache, start)) for n in names]


def connect(peers: list[Peer]):
  for p in peers:
    p.connect()
  for p in peers:
    if not p.conn.probe(30.0):
      raise RuntimeError(f"{p.name}: its probe connection did not come up")


def round_trip(det: Detector, peers: list[Peer]) -> list[str]:
  """One request to every peer, then each reply waited for as the exchange does; the peers
  declared failed."""
  sent = [(p, time.perf_counter(), p.ask()) for p in peers]
  failed = []
  for p, since, pending in sent:
    if det.wait({p.name: (p, pending.arrived)}, since):
      pending.ignore()
      failed.append(p.name)
      det.forget(p.name)  # it is healthy: kept, and watched afresh
  return failed


def idle(det: Detector, peers: list[Peer], seconds: float) -> list[str]:
  """`Detector.watch` on every peer every millisecond for `seconds`; the peers declared."""
  failed, end = [], time.perf_counter() + seconds
  while time.perf_counter() < end:
    for p in peers:
      if det.watch(p):
        failed.append(p.name)
        det.forget(p.name)
    time.sleep(1e-3)
  return failed


def healthy_phase(det: Detector, peers: list[Peer], cd) -> dict:
  probes0 = sum(p.probes for p in peers)
  start, rounds, false = time.perf_counter(), 0, []
  while time.perf_counter() - start < cd.healthy_s:
    false += round_trip(det, peers) + idle(det, peers, cd.idle_s)
    rounds += 1
  return dict(seconds=time.perf_counter() - start, requests=rounds * len(peers),
              probes=sum(p.probes for p in peers) - probes0, false_declarations=len(false),
              falsely_declared=sorted(set(false)))


def fault(det: Detector, victim: Peer, sig: int, cd) -> tuple[dict, int]:
  """Warms the detector up on `victim`, signals it with a request in flight; (its
  declaration, false declarations while warming up)."""
  false = 0
  for _ in range(cd.warm_rounds):
    false += len(round_trip(det, [victim]) + idle(det, [victim], 2 * cd.probe_interval_s))
  t0 = time.perf_counter()
  os.kill(victim.child.pid, sig)
  pending = victim.ask()
  failed = det.wait({victim.name: (victim, pending.arrived)}, t0)
  victim.close()  # SIGKILL (a stopped process too)
  evs = [e for e in det.timeline.of("declared_failed") if e["worker"] == victim.name]
  if failed != [victim.name] or not evs:
    raise RuntimeError(f"{victim.name}: not declared after {signal.Signals(sig).name}")
  return evs[-1], false


def detector(kind: str, cd) -> Detector:
  return Detector(DetectionConfig(probe_interval_s=cd.probe_interval_s,
                                  max_suspicion_s=cd.max_suspicion_s,
                                  adaptive=kind == "adaptive"))


def run_load(load: str, dets: dict[str, Detector], peers: dict[str, list[Peer]], spawner,
             rc, cd) -> list[dict]:
  """The healthy phase of every detector side by side (one thread each, each on its own
  peers: the same load for all), then each detector's faults."""
  with concurrent.futures.ThreadPoolExecutor(len(dets)) as pool:
    futures = {kind: pool.submit(healthy_phase, det, peers[kind], cd)
               for kind, det in dets.items()}
    healthy = {kind: f.result() for kind, f in futures.items()}
  loadavg = os.getloadavg()[0]
  records = []
  for kind, det in dets.items():
    base = dict(load=load, detector=kind)
    h = dict(base, measure="healthy", loadavg=loadavg, **healthy[kind])
    records.append(h)
    sigs = [signal.SIGKILL, signal.SIGSTOP] * cd.reps
    victims = spawn(spawner, rc, [f"ew{100 + k}" for k in range(len(sigs))], _CACHE.value)
    try:
      connect(victims)
      h["false_declarations_warming_victims"] = 0
      for k, (victim, sig) in enumerate(zip(victims, sigs)):
        ev, false = fault(det, victim, sig, cd)
        h["false_declarations_warming_victims"] += false
        records.append(dict(base, measure="kill" if sig == signal.SIGKILL else "stop",
                            rep=k // 2, detection_ms=1e3 * ev["detection_s"], how=ev["how"],
                            timeout_ms=1e3 * ev.get("timeout_s", 0.0)))
    finally:
      for v in victims:
        v.close()
  return records


def _stats(records: list[dict], measure: str) -> dict:
  ms = [r["detection_ms"] for r in records if r["measure"] == measure]
  if not ms:
    return {}
  return {f"{measure}_median_ms": float(np.median(ms)), f"{measure}_p95_ms":
          float(np.percentile(ms, 95)), f"{measure}_n": len(ms)}


def summarize(records: list[dict]) -> dict:
  rows = {}
  for r in records:
    row = rows.setdefault(f"{r['load']}/{r['detector']}", {})
    if r["measure"] == "healthy":
      row.update(loadavg=r["loadavg"], probes=r["probes"], requests=r["requests"],
                 false_declarations=r["false_declarations"] + r[
                     "false_declarations_warming_victims"])
  for key, row in rows.items():
    load, det = key.split("/")
    mine = [r for r in records if r["load"] == load and r["detector"] == det]
    row.update(_stats(mine, "kill"), **_stats(mine, "stop"))
    row["kills_closed"] = sum(r["measure"] == "kill" and r["how"] == "connection closed"
                              for r in mine)
  summary = dict(rows=rows)
  for det in ("adaptive", "fixed"):
    quiet, loaded = rows.get(f"quiet/{det}"), rows.get(f"loaded/{det}")
    if quiet and loaded and "stop_median_ms" in quiet:
      summary[f"{det}_stop_median_loaded_over_quiet"] = (loaded["stop_median_ms"]
                                                         / quiet["stop_median_ms"])
  return summary


def print_table(summary: dict):
  print(f"{'load/detector':<18}{'loadavg':>8}{'false/probes':>16}{'kill p50/p95 ms':>20}"
        f"{'closed':>8}{'stop p50/p95 ms':>20}")
  for key, r in summary["rows"].items():
    kill = f"{r.get('kill_median_ms', 0):.1f} / {r.get('kill_p95_ms', 0):.1f}"
    stop_ = f"{r.get('stop_median_ms', 0):.1f} / {r.get('stop_p95_ms', 0):.1f}"
    closed = f"{r['kills_closed']}/{r.get('kill_n', 0)}"
    print(f"{key:<18}{r['loadavg']:>8.1f}{r['false_declarations']:>8} / {r['probes']:<6}"
          f"{kill:>20}{closed:>8}{stop_:>20}")
  for key, v in summary.items():
    if key.endswith("_over_quiet"):
      print(f"{key}: {v:.2f}")


def main(argv):
  del argv
  cd = _CONFIG.value
  if cd.peers < 1 or cd.reps < 1 or cd.burners < 0 or not cd.healthy_s > 0:
    raise ValueError("bench_detection: need peers >= 1, reps >= 1, burners >= 0, healthy_s > 0")
  kinds = [d.strip() for d in cd.detectors.split(",") if d.strip()]
  if not kinds or set(kinds) - {"adaptive", "fixed"}:
    raise ValueError(f"bench_detection: detectors={cd.detectors!r}; use a comma-separated "
                     f"list of adaptive, fixed")
  workdir = launch_config.make_workdir(_WORKDIR.value or cd.workdir)
  rc = ResilienceConfig(detection=DetectionConfig(probe_interval_s=cd.probe_interval_s))
  spawner = LocalSpawner(cd.peers)
  loads = ["quiet"] + (["loaded"] if cd.burners else [])
  peers = {kind: spawn(spawner, rc, [f"aw{10 * i + k}" for k in range(cd.peers)], _CACHE.value)
           for i, kind in enumerate(kinds)}
  records = []
  try:
    connect([p for ps in peers.values() for p in ps])
    for load in loads:
      # Self-stopping after the longest the run could take.
      n = cd.burners if load == "loaded" else 0
      with launch_config.cpu_burners(n, 2 * cd.healthy_s + 600):
        records += run_load(load, {kind: detector(kind, cd) for kind in kinds}, peers, spawner,
                            rc, cd)
      print(f"{load}: done", flush=True)
  finally:
    for p in [p for ps in peers.values() for p in ps]:
      p.close()
  summary = summarize(records)
  print_table(summary)
  launch_config.write_jsonl(os.path.join(workdir, "results.jsonl"), records)
  launch_config.write_summary(workdir, summary, cd)
  print(f"-> {workdir}")


if __name__ == "__main__":
  app.run(main)
