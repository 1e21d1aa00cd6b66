"""The disaggregated engine on 8 CPU devices: greedy parity with the single-device reference.

Every engine shape compiles once per device, so engines, models and reference outputs are
built once per module (`functools.cache`) and shared by the tests. Prompts stay within one
prefill bucket (<= 16 tokens), so a warm engine sees no new shape.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
import pytest

import tarragon_jax as tj
from tarragon_jax.layers.params import ExpertParams
from tarragon_jax.mesh.cells import CellPlan
from tarragon_jax.resilience.routing_table import RoutingTable
from tarragon_jax.serving.engine import Engine, EngineConfig
from tarragon_jax.serving.metrics import compile_count
from tarragon_jax.serving.reference import reference_greedy
from tarragon_jax.worker import datapath
from tarragon_jax.worker.dataplane import LocalPlane
from tarragon_jax.worker.placement import place
from tarragon_jax.worker.requests import Request
from tarragon_jax.worker.workers import ExpertWorker, ew_weights

TINY = dict(
  vocab_size=128,
  hidden_size=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  num_experts=8,
  top_k=2,
  expert_hidden=64,
  max_seq_len=64,
)
CONFIGS = {
  "mixtral": tj.ModelConfig(family="mixtral", **TINY),
  "qwen3_moe": tj.ModelConfig(family="qwen3_moe", qk_norm=True, **TINY),
  "qwen2_moe": tj.ModelConfig(
    family="qwen2_moe", shared_expert_hidden=48, attention_bias=True, norm_topk_prob=False, **TINY
  ),
}
SPLIT_4_4 = CellPlan(4, 4)
SLOTS_PER_AW = 2  # 4 AWs x 2 slots = 8 concurrent requests, fewer than the 12 below

# 12 requests: more than the 8 slots, of varied prompt lengths (one prefill bucket, few distinct
# lengths so the reference compiles little) and varied lengths of output.
_rng = np.random.default_rng(1234)
PROMPTS = [
  tuple(int(t) for t in _rng.integers(0, 128, n))
  for n in (16, 3, 7, 12, 3, 16, 7, 12, 16, 3, 7, 12)
]
MAX_NEW = (5, 9, 2, 12, 1, 7, 4, 10, 3, 6, 8, 11)
FIRST_WAVE = 8  # submitted up front; the rest arrive one every 2 steps while the engine runs


@functools.cache
def _model(family: str):
  cfg = CONFIGS[family]
  key, bias_key = jax.random.split(jax.random.key(7))
  params = tj.init_params(cfg, key, scale=2.0)
  attn = params.layers.attn
  changes = {}
  if cfg.attention_bias:  # init gives zero biases; make them matter
    kq, kk, kv = jax.random.split(bias_key, 3)
    changes.update(
      bq=0.5 * jax.random.normal(kq, attn.bq.shape),
      bk=0.5 * jax.random.normal(kk, attn.bk.shape),
      bv=0.5 * jax.random.normal(kv, attn.bv.shape),
    )
  if cfg.qk_norm:  # likewise unit norm weights
    kq, kk = jax.random.split(bias_key)
    changes.update(
      q_norm=1 + 0.5 * jax.random.normal(kq, attn.q_norm.shape),
      k_norm=1 + 0.5 * jax.random.normal(kk, attn.k_norm.shape),
    )
  if changes:
    layers = dataclasses.replace(params.layers, attn=dataclasses.replace(attn, **changes))
    params = dataclasses.replace(params, layers=layers)
  return cfg, params


@functools.cache
def _reference(family: str) -> list[list[int]]:
  cfg, params = _model(family)
  return reference_greedy(params, cfg, PROMPTS, MAX_NEW)


@functools.cache
def _engine(family: str, plan: CellPlan = SPLIT_4_4, slots_per_aw: int = SLOTS_PER_AW) -> Engine:
  cfg, params = _model(family)
  return Engine(cfg, params, EngineConfig(plan=plan, slots_per_aw=slots_per_aw))


def _serve(
  engine: Engine, requests: list[Request], first: int | None = None, every: int = 2
) -> list[list[int]]:
  """Submits `first` requests, then one more every `every` steps; runs until all are done."""
  first = len(requests) if first is None else first
  ids = [engine.submit(r) for r in requests[:first]]
  pending = list(requests[first:])
  steps = 0
  while pending or not engine.idle:
    engine.step()
    steps += 1
    if pending and steps % every == 0:
      ids.append(engine.submit(pending.pop(0)))
  assert steps < 500
  return [engine.tokens(i) for i in ids]


def _greedy_requests() -> list[Request]:
  return [Request(p, m) for p, m in zip(PROMPTS, MAX_NEW, strict=True)]


def _check_streams(engine: Engine, since: int):
  """Each request's token events (from event `since` on) are numbered 0, 1, ... in order."""
  by_request: dict[int, list] = {}
  for ev in engine.events[since:]:
    by_request.setdefault(ev.request_id, []).append(ev)
  for rid, events in by_request.items():
    assert [e.index for e in events] == list(range(len(events))), rid
    assert [e.token for e in events] == engine.tokens(rid)
  return by_request


# -- parity: three families, 4 AW + 4 EW, continuous batching ------------------------------------


@pytest.mark.parametrize("family", list(CONFIGS))
def test_greedy_matches_reference(family):
  engine = _engine(family)
  since = len(engine.events)
  out = _serve(engine, _greedy_requests(), first=FIRST_WAVE)
  ref = _reference(family)
  assert [len(t) for t in ref] == list(MAX_NEW)
  for i, (got, want) in enumerate(zip(out, ref, strict=True)):
    assert got == want, f"request {i} (prompt of {len(PROMPTS[i])} tokens)"
  streams = _check_streams(engine, since)
  # Continuous batching happened: some request began only after another had finished.
  order = [ev.request_id for ev in engine.events[since:]]
  first_at = {r: order.index(r) for r in streams}
  last_at = {r: len(order) - 1 - order[::-1].index(r) for r in streams}
  assert max(first_at.values()) > min(last_at.values())
  assert len(streams) == 12 > SPLIT_4_4.num_aw * SLOTS_PER_AW


# -- parity: other splits of the 8 devices --------------------------------------------------------


@pytest.mark.parametrize(
  "plan,slots_per_aw",
  [
    (CellPlan(2, 6), 3),
    (CellPlan(1, 1), 4),
    (CellPlan(2, 2, 2, 2), 2),  # 2-device cells: heads and expert slots sharded within a cell
  ],
  ids=["2aw+6ew", "1aw+1ew", "2x2aw+2x2ew"],
)
def test_other_splits_match_reference(plan, slots_per_aw):
  engine = _engine("mixtral", plan, slots_per_aw)
  out = _serve(engine, _greedy_requests(), first=slots_per_aw * plan.num_aw)
  assert out == _reference("mixtral")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_buffer_carries_tokens_and_every_slot_id(dtype):
  """An AW's buffer for an EW is one array: tokens, then each row's slot id."""
  cfg = CONFIGS["mixtral"].replace(dtype=dtype)
  tokens = jax.random.normal(jax.random.key(0), (6, cfg.hidden_size)).astype(dtype)
  slots = np.array([0, 7, -1, 255, 256, datapath.MAX_SLOTS - 1], np.int32)
  got_tokens, got_slots = jax.jit(lambda t, s: datapath.unpack(datapath.pack(t, s),
                                                               cfg.hidden_size))(tokens, slots)
  np.testing.assert_array_equal(np.asarray(got_tokens), np.asarray(tokens))
  np.testing.assert_array_equal(np.asarray(got_slots), slots)
  empty = datapath.empty_buffer(cfg, 3)  # what an EW gets from an AW that sent nothing
  assert empty.dtype == np.dtype(dtype) and empty.shape[0] == 3
  got_tokens, got_slots = datapath.unpack(jax.numpy.asarray(empty), cfg.hidden_size)
  assert not np.asarray(got_tokens).any() and (np.asarray(got_slots) == -1).all()


@pytest.mark.parametrize("to_shadows", [False, True])
def test_an_ew_call_is_exact_whether_its_shadows_idle_or_serve(to_shadows):
  """An EW computes only its primaries while the routing table sends nothing to its shadows
  (fault-free), and every slot once it does (after a failover): the outputs are the experts'
  either way."""
  cfg = CONFIGS["mixtral"]
  num_ew, S = 4, 4  # two primaries (slots 0, 1) and two shadows per EW and layer
  w, bufs, want = _ew_inputs(cfg, S, shadow_rows=[2, 5] if to_shadows else [])
  got = datapath.ew_experts(w, cfg, np.int32(1), tuple(bufs), num_ew=num_ew,
                            slots=S if to_shadows else 2)
  for g, y in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_a_token_routed_past_the_computed_slots_gets_nan_not_zero():
  cfg = CONFIGS["mixtral"]
  w, bufs, want = _ew_inputs(cfg, 4, shadow_rows=[2, 5])
  got = datapath.ew_experts(w, cfg, np.int32(1), tuple(bufs), num_ew=4, slots=2)
  for a, (g, y) in enumerate(zip(got, want)):
    bad = np.isnan(np.asarray(g)).any(axis=1)
    assert bad.tolist() == [a == 1 and i in (2, 5) for i in range(8)]
    np.testing.assert_allclose(np.asarray(g)[~bad], np.asarray(y)[~bad], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="slots=5; this EW holds 1..4"):
    datapath.ew_experts(w, cfg, np.int32(1), tuple(bufs), num_ew=4, slots=5)


def _ew_inputs(cfg, S: int, shadow_rows: list[int]):
  """An EW's weights [L, S, ...], three AWs' packed buffers of 8 rows for layer 1 (AW 1's
  `shadow_rows` go to shadow slots 3 and 2, the rest to primaries 0, 1 or nowhere), and each
  buffer's expected outputs."""
  keys = jax.random.split(jax.random.key(1), 3)
  D, F = cfg.hidden_size, cfg.expert_hidden
  w = ExpertParams(*(0.1 * jax.random.normal(k, (cfg.num_layers, S, *shape))
                        for k, shape in zip(keys, [(D, F), (D, F), (F, D)])))
  rng = np.random.default_rng(2)
  bufs, want = [], []
  for a in range(3):
    x = rng.normal(size=(8, D)).astype(np.float32)
    slots = rng.integers(-1, 2, 8).astype(np.int32)
    if a == 1 and shadow_rows:
      slots[shadow_rows] = [3, 2]
    bufs.append(datapath.pack(jax.numpy.asarray(x), slots))
    layer = jax.tree.map(lambda t: t[1], w)
    want.append(tj.expert_ffn(jax.numpy.asarray(x), slots, layer, "loop"))
  return w, bufs, want


@pytest.mark.parametrize("T", [1, 3, 16])  # 4 rows: 4 and 12 positions loop, 64 gather
def test_a_steps_snapshot_kv_is_the_cache_at_each_rows_new_positions(T):
  """What `aw_finish` hands the snapshot store: for row b, cache positions lengths[slot b] + t of
  every layer (clamped to the cache's last position), rows in the step's slot order."""
  cfg = CONFIGS["mixtral"]
  S, num_slots = cfg.max_seq_len, 5
  rng = np.random.default_rng(3)
  shape = (cfg.num_layers, num_slots, S, cfg.num_kv_heads, cfg.head_dim)
  k, v = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
  lengths = np.array([0, 7, S - 2, 30, S - 1], np.int32)  # slots 2, 4: positions past the end
  cache = tj.KVCache(jax.numpy.asarray(k), jax.numpy.asarray(v), jax.numpy.asarray(lengths))
  slots = np.array([4, 1, 2, 0], np.int32)
  B = len(slots)
  _, _, got = datapath.aw_finish(
      _model("mixtral")[1], cfg, jax.numpy.zeros((B, T, cfg.hidden_size)), cache, slots,
      np.ones(B, np.int32), np.zeros((B, 2), np.uint32), np.zeros(B, np.int32),
      np.zeros(B, np.float32), np.ones(B, np.float32), np.zeros(B, bool), snapshot=True)
  positions = np.minimum(lengths[slots][:, None] + np.arange(T), S - 1)
  want = np.stack([k[:, slots[:, None], positions], v[:, slots[:, None], positions]])
  np.testing.assert_array_equal(np.asarray(got), want)


def test_importing_the_library_starts_no_jax_backend():
  """A user imports the library first and sets the CPU device count after: every module must
  leave JAX's backends unstarted at import (a module-level jax array would start them)."""
  import subprocess
  import sys
  code = ("import importlib, pkgutil, tarragon_jax, jax\n"
          "for m in pkgutil.walk_packages(tarragon_jax.__path__, 'tarragon_jax.'):\n"
          "  importlib.import_module(m.name)\n"
          "jax.config.update('jax_num_cpu_devices', 3)\n"
          "print(len(jax.devices('cpu')))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert out.returncode == 0 and out.stdout.split()[-1] == "3", out.stderr[-2000:]


# -- routing is data: rerouting compiles nothing and changes no token ----------------------------


def _warm(engine: Engine):
  """Compiles both step shapes (16-token prefill bucket, decode), the EWs' expert calls with
  idle and with serving shadows included."""
  engine.warm_up([1, 16])


def test_reroute_by_hand_same_tokens_no_compiles():
  engine = _engine("mixtral")
  ref = _reference("mixtral")
  original = engine.state.table
  _warm(engine)
  before = compile_count()
  try:
    # A few experts first, then every expert of every layer onto its shadow.
    table = engine.state.table
    some = [(0, 1), (0, 6), (1, 0), (1, 3)]
    for layer, expert in some:
      table = table.reroute(layer, expert, int(table.replicas[layer, expert, 1]))
    engine.set_routing_table(table)
    assert engine.state.table.epoch == original.epoch + 4
    assert _serve(engine, _greedy_requests(), first=FIRST_WAVE) == ref

    L, E = engine.cfg.num_layers, engine.cfg.num_experts
    table = original
    for layer in range(L):
      for expert in range(E):
        shadow = int(original.replicas[layer, expert, 1])
        assert shadow >= 0
        table = table.reroute(layer, expert, shadow)
    assert (table.active != original.active).all()
    engine.set_routing_table(table)
    assert _serve(engine, _greedy_requests(), first=FIRST_WAVE) == ref
    assert compile_count() == before
  finally:
    engine.set_routing_table(original)


@pytest.mark.parametrize("host_inputs", [True, False])
def test_an_ew_warms_up_for_the_kind_of_buffers_it_is_given(host_inputs):
  """A worker process hands its EW host (numpy) buffers: an EW built for that
  (`host_inputs=True`, as `runtime/host.py` builds it) compiles neither the primaries' nor the
  all-slots executable again after warm-up (the latter would compile in a failover's replay);
  one warmed up on device buffers does (the mechanism the flag exists for)."""
  cfg, params = _model("mixtral")
  engine = _engine("mixtral")
  placement, S = engine.state.placement, engine.state.placement.slots_per_layer
  cell = engine.state.ews[0].cell
  ew = ExpertWorker(0, cell, cfg, ew_weights(params, placement, 0), placement.num_ew,
                    LocalPlane(cell.replicated()), host_inputs=host_inputs)
  capacity = 41 if host_inputs else 43  # shapes no other call compiled: jit's cache is global
  counts = (engine.ew_slots[0], S)
  ew.warm_up([capacity], len(engine.state.aws), counts)
  host = (datapath.empty_buffer(cfg, capacity),) * len(engine.state.aws)
  before = compile_count()
  for slots in counts:  # what `ExpertWorker.run_layer` calls with the buffers it receives
    jax.block_until_ready(datapath.ew_experts(ew.weights, cfg, 1, host, num_ew=placement.num_ew,
                                              slots=slots))
  assert (compile_count() == before) == host_inputs


@pytest.mark.parametrize("ew", [0, 3])
def test_route_away_from_an_ew_same_tokens_no_compiles(ew):
  engine = _engine("mixtral")
  ref = _reference("mixtral")
  original = engine.state.table
  _warm(engine)
  before = compile_count()
  try:
    table = original.without_ew(ew)
    assert table.ews_serving() == {0, 1, 2, 3} - {ew}
    engine.set_routing_table(table)
    assert _serve(engine, _greedy_requests(), first=FIRST_WAVE) == ref
    assert compile_count() == before
  finally:
    engine.set_routing_table(original)


def test_table_leaving_experts_unreachable_is_refused():
  engine = _engine("mixtral")
  original = engine.state.table
  # With one shadow each, losing two EWs leaves some experts with no replica.
  broken = original.without_ew(0).without_ew(1)
  assert broken.unreachable()
  with pytest.raises(ValueError, match=r"unreachable: \[\(0, 0\)"):
    engine.set_routing_table(broken)
  assert engine.state.table is original
  assert _serve(engine, _greedy_requests()[:3]) == _reference("mixtral")[:3]


def test_table_from_another_placement_is_refused():
  engine = _engine("mixtral")
  original = engine.state.table
  other = RoutingTable.from_placement(place(2, 8, 4, slots_per_layer=2, shadows_per_expert=0))
  assert other.slots_per_layer != engine.state.placement.slots_per_layer
  try:
    with pytest.raises(ValueError, match="does not match the engine's placement"):
      engine.set_routing_table(other)
    wrong = engine.state.table.replicas.copy()
    wrong[0, 0, 0] = engine.state.table.replicas[0, 1, 0]  # expert 0 pointed at expert 1's slot
    forged = RoutingTable(wrong, engine.state.table.slots_per_layer, engine.state.table.epoch + 1)
    with pytest.raises(ValueError, match=r"layer 0 expert 0 .* holds expert 1"):
      engine.set_routing_table(forged)
    assert engine.state.table is original
  finally:
    engine.set_routing_table(original)


# -- bad input --------------------------------------------------------------------------------


BAD_REQUESTS = [
  (
    Request(tuple(range(65)), 1),
    r"prompt of 65 tokens \+ max_new_tokens=1 needs 65 cache positions .*max_seq_len=64",
  ),
  (Request(PROMPTS[0], 50), r"prompt of 16 tokens \+ max_new_tokens=50 needs 65 cache positions"),
  (Request((5, 128, 7), 3), r"prompt token ids \[128\] are outside the vocabulary \[0, 128\)"),
  (Request((-1, 4), 3), r"prompt token ids \[-1\] are outside the vocabulary"),
  (Request((), 3), r"the prompt is empty"),
  (Request((1, 2), 0), r"max_new_tokens=0 must be an int >= 1"),
  (Request((1, 2), -3), r"max_new_tokens=-3 must be an int >= 1"),
  (Request((1, 2), 4, stop_tokens=(300,)),
   r"stop tokens \[300\] are outside the vocabulary \[0, 128\)"),
]


def test_bad_requests_rejected_at_submit_engine_keeps_serving():
  engine = _engine("mixtral")
  before = engine.summary()["requests"]
  good = _greedy_requests()
  ids = [engine.submit(r) for r in good[:6]]
  for _ in range(3):  # some requests are mid-decode when the bad ones arrive
    engine.step()
  for request, message in BAD_REQUESTS:
    with pytest.raises(ValueError, match=message):
      engine.submit(request)
  ids += [engine.submit(r) for r in good[6:]]
  engine.run()
  assert [engine.tokens(i) for i in ids] == _reference("mixtral")
  assert engine.summary()["requests"] - before == len(good)  # no bad request was queued


def test_request_that_exactly_fills_the_cache():
  cfg, params = _model("mixtral")
  prompt, max_new = PROMPTS[0], cfg.max_seq_len - len(PROMPTS[0]) + 1  # 16 + 49 - 1 = 64
  want = reference_greedy(params, cfg, [prompt], max_new)[0]
  engine = _engine("mixtral")
  out = _serve(engine, [Request(prompt, max_new)] + _greedy_requests()[1:4])
  assert len(out[0]) == 49
  assert out[0] == want
  assert out[1:] == _reference("mixtral")[1:4]


def test_stop_token_ends_request_early():
  cfg, params = _model("mixtral")
  ref = _reference("mixtral")
  i = 3  # 12 reference tokens
  stop = ref[i][4]
  k = ref[i].index(stop)
  assert k < len(ref[i]) - 1
  never = next(t for t in range(cfg.vocab_size) if t not in ref[7])
  requests = _greedy_requests()
  requests[i] = Request(PROMPTS[i], MAX_NEW[i], stop_tokens=(stop,))
  requests[7] = Request(PROMPTS[7], MAX_NEW[7], stop_tokens=(never,))
  requests[1] = Request(PROMPTS[1], MAX_NEW[1], stop_tokens=(ref[1][0], 127))
  out = _serve(_engine("mixtral"), requests, first=FIRST_WAVE)
  assert out[i] == ref[i][: k + 1]
  assert out[i] == reference_greedy(params, cfg, [PROMPTS[i]], MAX_NEW[i], stop_tokens=(stop,))[0]
  assert out[7] == ref[7]  # a stop token it never emits changes nothing
  assert out[1] == ref[1][:1]  # stopped at its first token
  assert [o for j, o in enumerate(out) if j not in (1, i, 7)] == [
    r for j, r in enumerate(ref) if j not in (1, i, 7)
  ]


def test_idle_while_any_request_is_open():
  engine = _engine("mixtral")
  assert engine.idle
  first, second = engine.submit(Request(PROMPTS[4], 1)), engine.submit(Request(PROMPTS[1], 3))
  assert not engine.idle
  while not engine.requests[first].done:
    engine.step()
  assert not engine.idle  # one request finished, one is still open
  engine.run()
  assert engine.idle and engine.requests[second].done
  with pytest.raises(ValueError):
    engine.submit(Request((), 1))  # refused at submit: nothing is left open
  assert engine.idle


def test_settle_without_durable_leaves_every_served_position_in_the_host_tier():
  """Decode steps of an unchanged batch go to the store as continuations (no rows), with host
  copies of their KV, and commit all the same."""
  engine = _engine("mixtral")
  rid = engine.submit(Request(PROMPTS[3], 8))
  sent, log_step = [], engine.state.store.log_step
  engine.state.store.log_step = lambda aw, seq, rows, kv: (sent.append((rows, kv)),
                                                     log_step(aw, seq, rows, kv))
  for _ in range(4):  # the prefill and three decode steps; the store applies them in batches
    engine.step()
  engine.settle(durable=False)
  assert engine.state.store.committed(rid) == engine.requests[rid].cached == len(PROMPTS[3]) + 3
  assert [rows is None for rows, _ in sent] == [False, True, True, True]
  assert all(type(kv) is np.ndarray for _, kv in sent)  # the store holds no device buffer
  engine.run()
  assert engine.tokens(rid) == _reference("mixtral")[3][:8]
  engine.release()


def test_release_forgets_finished_requests_only():
  engine = _engine("mixtral")
  done = engine.submit(Request(PROMPTS[4], 1))
  engine.run()
  kept = len([e for e in engine.events if e.request_id != done])
  open_ = engine.submit(Request(PROMPTS[1], 2))
  with pytest.raises(ValueError, match=f"request {open_} is waiting"):
    engine.release([done, open_])
  with pytest.raises(ValueError, match="request 10000 is unknown"):
    engine.release([10000])
  assert done in engine.requests  # a refused call released nothing
  engine.run()
  engine.release([done])
  assert done not in engine.requests and done not in engine.streams
  assert [e for e in engine.events if e.request_id == done] == []
  assert len([e for e in engine.events if e.request_id != done]) == kept + 2
  assert engine.tokens(open_) == _reference("mixtral")[1][:2]
  engine.release()  # every finished request
  assert engine.requests == {} and engine.streams == {} and engine.events == []
  assert engine.idle


# -- sampling: per-request PRNG streams ---------------------------------------------------------


def test_sampling_same_alone_or_among_others():
  engine = _engine("mixtral")
  sampled = [
    Request(PROMPTS[2], 10, tj.SamplingParams(temperature=1.0, seed=11)),
    Request(PROMPTS[4], 8, tj.SamplingParams(temperature=0.7, top_p=0.9, seed=12)),
  ]
  alone = [_serve(engine, [r])[0] for r in sampled]
  placed_alone = [engine.requests[rid] for rid in sorted(engine.requests)[-2:]]

  # Among greedy requests and each other, in other slots on other AWs, arriving mid-run.
  mixed = _greedy_requests()[:5] + [sampled[0]] + _greedy_requests()[5:9] + [sampled[1]]
  since = max(engine.requests) + 1
  out = _serve(engine, mixed, first=6)
  assert out[5] == alone[0]
  assert out[10] == alone[1]
  together = [engine.requests[since + 5], engine.requests[since + 10]]
  assert [(s.aw, s.slot) for s in together] != [(s.aw, s.slot) for s in placed_alone]
  assert out[:5] + out[6:10] == _reference("mixtral")[:9]

  # Sampling really sampled: another seed, or greedy, gives other tokens.
  other_seed = Request(PROMPTS[2], 10, tj.SamplingParams(temperature=1.0, seed=99))
  greedy = _serve(engine, [Request(PROMPTS[2], 10)])[0]
  assert _serve(engine, [other_seed])[0] != alone[0]
  assert greedy != alone[0]


# -- engine construction ------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(slots_per_aw=0), r"slots_per_aw=0 must be >= 1"),
    (dict(min_prefill_bucket=0), r"min_prefill_bucket=0 must be >= 1"),
  ],
)
def test_engine_config_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    EngineConfig(**kwargs)


@pytest.mark.parametrize(
  "engine_cfg,message",
  [
    (EngineConfig(plan=CellPlan(5, 4)), r"needs 9 devices .* only 8 are available"),
    (
      EngineConfig(ew_slots_per_layer=1),
      r"slots_per_layer=1 cannot hold the primaries: 8 experts "
      r"over 4 EWs need at least 2",
    ),
  ],
)
def test_engine_that_cannot_be_built(engine_cfg, message):
  cfg, params = _model("mixtral")
  with pytest.raises(ValueError, match=message):
    Engine(cfg, params, engine_cfg)
