"""SnapshotStore (commit records, restore points, durable tier), TokenStream and fit_plan."""

import json
import os
import re
import shutil
import threading
import time

import numpy as np
import pytest
import tensorstore as ts

import tarragon_jax as tj
from tarragon_jax.mesh.cells import CellPlan
from tarragon_jax.resilience import kv_archive, snapshot_store
from tarragon_jax.resilience.restart import fit_plan
from tarragon_jax.resilience.snapshot_store import SnapshotStore
from tarragon_jax.serving.streams import StreamGap, TokenStream
from tarragon_jax.worker.fault_domain import Health, WorkerDead

CFG = tj.ModelConfig(family="mixtral", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, num_experts=8, top_k=2, expert_hidden=64,
                     max_seq_len=64)
L, K, H = CFG.num_layers, CFG.num_kv_heads, CFG.head_dim


@pytest.fixture
def store(tmp_path):
  s = SnapshotStore(CFG, str(tmp_path), flush_interval_s=0.02, durable_chunk=16)
  yield s
  s.stop()


def wait_for(cond, timeout=5.0, what="condition"):
  deadline = time.perf_counter() + timeout
  while not cond():
    if time.perf_counter() > deadline:
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(0.002)


def drain(s):
  mark = s.mark()
  wait_for(lambda: s.caught_up(mark), what="the store to catch up")


def kv(rng, B, T):
  """Per-layer k, v [L, B, T, K, H] with distinct values."""
  return (rng.standard_normal((L, B, T, K, H)).astype(np.float32),
          rng.standard_normal((L, B, T, K, H)).astype(np.float32))


def step(s, aw, seq, rows, k, v):
  """Logs a step as an AW does: k and v stacked [2, L, B, T, K, H]."""
  s.log_step(aw, seq, rows, _Lost() if isinstance(k, _Lost) else np.stack([k, v]))


class _Lost:
  """KV of an AW that died before its copy to the store completed."""

  def __array__(self, *_, **__):
    raise RuntimeError("Array has been deleted")


def test_a_step_commits_as_a_whole_or_not_at_all(store):
  rng = np.random.default_rng(0)
  k0, v0 = kv(rng, 1, 4)
  step(store, 0, 0, [(1, 0, 0, 4)], k0, v0)
  drain(store)
  assert store.committed(1) == 4
  step(store, 0, 1, [(1, 0, 4, 1)], _Lost(), _Lost())  # its AW died mid-copy
  drain(store)
  assert store.committed(1) == 4  # no commit record: position 4 is the uncommitted tail
  assert store.restore_point(1)[0].shape == (L, 4, K, H)
  k1, v1 = kv(rng, 1, 1)
  step(store, 1, 2, [(1, 0, 4, 1)], k1, v1)  # recomputed on another AW, from the commit
  drain(store)
  assert store.committed(1) == 5
  k, v = store.restore_point(1)
  np.testing.assert_array_equal(k[:, :4], k0[:, 0])
  np.testing.assert_array_equal(k[:, 4], k1[:, 0, 0])
  np.testing.assert_array_equal(v[:, 4], v1[:, 0, 0])
  assert [seq for seq, _ in store.log[0]] == [0] and [seq for seq, _ in store.log[1]] == [2]


def test_restore_point_is_exactly_the_kv_written_per_slot(store):
  rng = np.random.default_rng(1)
  # Prefill: request 1 in slot 1 (5 tokens), request 2 in slot 0 (3 of the 5 rows).
  k, v = kv(rng, 3, 5)
  step(store, 0, 0, [(1, 1, 0, 5), (2, 0, 0, 3)], k, v)
  want = {1: [k[:, 1, :5], v[:, 1, :5]], 2: [k[:, 0, :3], v[:, 0, :3]]}
  for seq in range(1, 4):  # three decode steps, one token each, appended contiguously
    k, v = kv(rng, 3, 1)
    step(store, 0, seq, [(1, 1, 4 + seq, 1), (2, 0, 2 + seq, 1)], k, v)
    for rid, slot in ((1, 1), (2, 0)):
      want[rid] = [np.concatenate([want[rid][0], k[:, slot]], 1),
                   np.concatenate([want[rid][1], v[:, slot]], 1)]
  drain(store)
  assert (store.committed(1), store.committed(2)) == (8, 6)
  for rid in (1, 2):
    got_k, got_v = store.restore_point(rid)
    np.testing.assert_array_equal(got_k, want[rid][0])
    np.testing.assert_array_equal(got_v, want[rid][1])
  assert store.restore_point(3) is None


class _Steps:
  """Logs steps as an AW does (random KV) and keeps what the store must then hold: each
  request's KV and each AW's commit records."""

  def __init__(self, store, seed: int, drain_each: bool = False):
    self.store, self.rng, self.drain_each = store, np.random.default_rng(seed), drain_each
    self.want, self.log, self.last = {}, {0: [], 1: []}, {}

  def __call__(self, aw, seq, rows, B, T, cont=False):
    """Step `seq` of AW `aw` over `rows`, or with `cont` a continuation of its last rows."""
    k, v = kv(self.rng, B, T)
    if cont:  # the AW's previous rows, each one token on
      rows = [(rid, slot, start + n, 1) for rid, slot, start, n in self.last[aw]]
    step(self.store, aw, seq, None if cont else rows, k, v)
    self.last[aw] = rows
    for rid, slot, start, n in rows:
      old = self.want.get(rid, [np.zeros((L, 0, K, H), np.float32)] * 2)
      self.want[rid] = [np.concatenate([old[0][:, :start], k[:, slot, :n]], 1),
                        np.concatenate([old[1][:, :start], v[:, slot, :n]], 1)]
    self.log[aw].append((seq, {rid: start + n for rid, _, start, n in rows}))
    if self.drain_each:
      drain(self.store)

  def forget(self, rid):
    self.store.forget(rid)
    self.want.pop(rid)

  def check(self, forgotten):
    drain(self.store)
    assert self.store.restore_point(forgotten) is None
    for rid, (k, v) in self.want.items():
      assert self.store.committed(rid) == k.shape[1], rid
      got_k, got_v = self.store.restore_point(rid)
      np.testing.assert_array_equal(got_k, k)
      np.testing.assert_array_equal(got_v, v)
    assert {aw: list(self.store.log[aw]) for aw in (0, 1)} == self.log


def test_one_batch_of_interleaved_steps_commits_exactly_what_each_step_wrote(store):
  """One batch of the store's thread: decode steps of two AWs interleaved with a forget and a
  joining request (in the forgotten request's slot) keep their order."""
  store.batch_s = 1.0  # everything below is applied as one batch (`drain` hurries it)
  logged = _Steps(store, 11)
  logged(0, 0, [(1, 2, 0, 4), (2, 0, 0, 2)], 3, 4)  # prefill on AW 0
  logged(1, 1, [(3, 1, 0, 3)], 2, 4)  # and on AW 1
  for seq in range(2, 5):  # decode, rows not in slot order, AW 1 interleaved
    logged(0, seq, [(2, 0, seq, 1), (1, 2, seq + 2, 1)], 3, 1)
    logged(1, 10 + seq, [(3, 1, seq + 1, 1)], 2, 1)
  logged.forget(2)
  logged(0, 5, [(1, 2, 7, 1)], 3, 1)
  logged(0, 6, [(1, 2, 8, 1), (4, 0, 0, 3)], 3, 3)  # request 4 joins in request 2's old slot
  for seq in range(7, 10):
    logged(0, seq, [(1, 2, seq + 2, 1), (4, 0, seq - 4, 1)], 3, 1)
  logged.check(forgotten=2)


@pytest.mark.parametrize("one_batch", [True, False])
def test_continuations_commit_exactly_what_each_step_wrote(store, one_batch):
  """Decode steps sent as continuations (rows None: the AW's previous rows, one token on), two
  AWs interleaved, a forget and a joining request between them: the same commits, KV and log
  as with every step's rows spelled out, in one batch or step by step."""
  store.batch_s = 1.0 if one_batch else store.batch_s
  logged = _Steps(store, 12, drain_each=not one_batch)
  logged(0, 0, [(1, 2, 0, 4), (2, 0, 0, 2)], 3, 4)  # prefill on AW 0
  logged(1, 1, [(3, 1, 0, 3)], 2, 4)  # and on AW 1
  logged(0, 2, [(2, 0, 2, 1), (1, 2, 4, 1)], 3, 1)  # rows not in slot order
  logged(1, 2, [(3, 1, 3, 1)], 2, 1)
  for seq in range(3, 6):
    logged(0, seq, None, 3, 1, cont=True)
    logged(1, seq, None, 2, 1, cont=True)
  logged.forget(2)
  logged(0, 6, [(1, 2, 8, 1)], 3, 1)
  logged(0, 7, [(1, 2, 9, 1), (4, 0, 0, 3)], 3, 3)  # request 4 joins in request 2's old slot
  logged(0, 8, [(1, 2, 10, 1), (4, 0, 3, 1)], 3, 1)
  for seq in range(9, 12):
    logged(0, seq, None, 3, 1, cont=True)
  logged.check(forgotten=2)


def test_a_continuation_without_its_previous_step_commits_nothing(store):
  """A continuation that does not follow the AW's last applied step (a step skipped or lost,
  or no rows sent yet) is a gap: no commit, no KV, until rows are sent again."""
  rng = np.random.default_rng(13)
  k, v = kv(rng, 1, 4)
  step(store, 0, 0, [(1, 0, 0, 4)], k, v)
  k1, v1 = kv(rng, 1, 1)
  step(store, 0, 1, None, k1, v1)  # position 4
  step(store, 0, 3, None, *kv(rng, 1, 1))  # step 2 never came: cannot follow
  step(store, 0, 4, None, *kv(rng, 1, 1))  # nor the next one
  step(store, 1, 0, None, *kv(rng, 1, 1))  # an AW that sent no rows yet
  k5, v5 = kv(rng, 1, 1)
  step(store, 0, 5, [(1, 0, 5, 1)], k5, v5)  # rows again: position 5
  step(store, 0, 6, None, _Lost(), _Lost())  # its AW died: position 6 is lost
  step(store, 0, 7, None, *kv(rng, 1, 1))  # cannot follow a lost step
  k8, v8 = kv(rng, 1, 1)
  step(store, 0, 8, [(1, 0, 6, 1)], k8, v8)  # rows again: position 6
  step(store, 0, 9, None, *kv(rng, 1, 2))  # two tokens a row: not a decode step
  step(store, 0, 10, None, *kv(rng, 1, 1))  # cannot follow it
  drain(store)
  assert store.committed(1) == 7
  got_k, got_v = store.restore_point(1)
  np.testing.assert_array_equal(got_k, np.concatenate([k[:, 0], k1[:, 0], k5[:, 0], k8[:, 0]], 1))
  np.testing.assert_array_equal(got_v, np.concatenate([v[:, 0], v1[:, 0], v5[:, 0], v8[:, 0]], 1))
  assert [seq for seq, _ in store.log[0]] == [0, 1, 5, 8] and 1 not in store.log


def test_gap_is_not_logged_until_a_base_arrives(store):
  rng = np.random.default_rng(2)
  k, v = kv(rng, 1, 4)
  step(store, 0, 0, [(1, 0, 0, 4)], k, v)
  drain(store)
  k_before = store.restore_point(1)[0]
  # Request 1 skips position 4 (starts at 6); request 9 was never seen and starts at 3.
  kg, vg = kv(rng, 2, 1)
  step(store, 0, 1, [(1, 0, 6, 1), (9, 1, 3, 1)], kg, vg)
  drain(store)
  assert store.committed(1) == 4 and store.committed(9) == 0
  np.testing.assert_array_equal(store.restore_point(1)[0], k_before)
  assert store.restore_point(9) is None
  # A whole-cache base gives request 9 a restore point; later steps append to it.
  kb, vb = kv(rng, 2, 8)
  store.base(0, [(9, 1, 3)], kb, vb)
  kd, vd = kv(rng, 1, 1)
  step(store, 0, 2, [(9, 0, 3, 1)], kd, vd)
  drain(store)
  assert store.committed(9) == 4
  got_k, got_v = store.restore_point(9)
  np.testing.assert_array_equal(got_k, np.concatenate([kb[:, 1, :3], kd[:, 0]], 1))
  np.testing.assert_array_equal(got_v, np.concatenate([vb[:, 1, :3], vd[:, 0]], 1))


def test_a_request_resumed_on_another_aw_keeps_its_prefix(store):
  rng = np.random.default_rng(7)
  k0, v0 = kv(rng, 2, 4)
  step(store, 0, 0, [(1, 1, 0, 4)], k0, v0)  # aw0 slot 1
  k1, v1 = kv(rng, 3, 1)
  step(store, 1, 1, [(1, 2, 4, 1)], k1, v1)  # aw0 died: resumed on aw1 slot 2
  drain(store)
  got_k, got_v = store.restore_point(1)
  np.testing.assert_array_equal(got_k, np.concatenate([k0[:, 1], k1[:, 2]], 1))
  np.testing.assert_array_equal(got_v, np.concatenate([v0[:, 1], v1[:, 2]], 1))


def test_a_reused_row_of_a_dead_aw_keeps_the_request_that_has_not_resumed_yet(store):
  rng = np.random.default_rng(8)
  k0, v0 = kv(rng, 2, 3)
  step(store, 0, 0, [(1, 0, 0, 3), (2, 1, 0, 2)], k0, v0)
  # aw0 died; its replacement (aw0 again) admits request 3 into slot 0 before 1 resumes.
  k1, v1 = kv(rng, 2, 5)
  step(store, 0, 1, [(3, 0, 0, 5)], k1, v1)
  drain(store)
  np.testing.assert_array_equal(store.restore_point(1)[0], k0[:, 0])
  np.testing.assert_array_equal(store.restore_point(3)[1], v1[:, 0])
  k2, v2 = kv(rng, 2, 1)
  step(store, 1, 2, [(1, 1, 3, 1)], k2, v2)  # request 1 resumes on aw1 from its copy
  drain(store)
  np.testing.assert_array_equal(store.restore_point(1)[0],
                                np.concatenate([k0[:, 0], k2[:, 1]], 1))
  np.testing.assert_array_equal(store.restore_point(2)[0], k0[:, 1, :2])


def test_base_sets_and_forget_frees_a_restore_point(store):
  rng = np.random.default_rng(3)
  k, v = kv(rng, 2, 8)
  store.base(0, [(5, 1, 6)], k, v)
  drain(store)
  assert store.committed(5) == 6
  got_k, got_v = store.restore_point(5)
  np.testing.assert_array_equal(got_k, k[:, 1, :6])
  np.testing.assert_array_equal(got_v, v[:, 1, :6])
  store.forget(5)
  drain(store)
  assert store.committed(5) == 0 and store.restore_point(5) is None


def test_killed_store_refuses_calls(store):
  rng = np.random.default_rng(4)
  k, v = kv(rng, 1, 2)
  step(store, 0, 0, [(1, 0, 0, 2)], k, v)
  drain(store)
  store.kill()
  assert not store.probe()
  with pytest.raises(WorkerDead):
    store.log_step(0, 1, [(1, 0, 2, 1)], np.stack([k, v]))
  with pytest.raises(WorkerDead):
    store.restore_point(1)
  assert store.committed(1) == 0  # its host copies are gone


def test_hung_store_stops_draining(store):
  rng = np.random.default_rng(5)
  k, v = kv(rng, 1, 2)
  step(store, 0, 0, [(1, 0, 0, 2)], k, v)
  drain(store)
  assert store.lag_s() == 0.0 and store.probe()
  store.hang()
  k1, v1 = kv(rng, 1, 1)
  step(store, 0, 1, [(1, 0, 2, 1)], k1, v1)  # still accepted: a hung worker is silent
  mark = store.mark()
  first = store.lag_s()
  wait_for(lambda: store.lag_s() > first + 0.05, what="lag to grow")
  assert not store.caught_up(mark)
  assert not store.probe()
  assert store.restore_point(1) is None  # silent, not an error
  assert store.committed(1) == 2


def wait_durable(store, rid, n):
  wait_for(lambda: store.archive.durable.get(rid) == n, what=f"request {rid} to be durable")


def test_durable_tier_holds_whole_committed_chunks(store, tmp_path):
  rng = np.random.default_rng(6)
  k, v = kv(rng, 2, 20)
  step(store, 0, 0, [(1, 0, 0, 20), (2, 1, 0, 10)], k, v)
  drain(store)
  wait_durable(store, 1, 16)  # whole chunks of 16 positions only
  assert 2 not in store.archive.durable
  for seq in range(1, 14):  # more commits after the first flush: written at an offset
    kd, vd = kv(rng, 2, 1)
    step(store, 0, seq, [(1, 0, 19 + seq, 1), (2, 1, 9 + seq, 1)], kd, vd)
  drain(store)
  assert store.committed(1) == 33 and store.committed(2) == 23
  wait_durable(store, 1, 32)
  wait_durable(store, 2, 16)
  commits = json.loads((tmp_path / "commits.json").read_text())
  assert {r: c["n"] for r, c in commits.items()} == {"1": 32, "2": 16}
  for rid, n in ((1, 32), (2, 16)):
    want_k, want_v = store.restore_point(rid)
    got_k, got_v = kv_archive.read_archive(str(tmp_path), rid)
    np.testing.assert_array_equal(got_k, want_k[:, :n])
    np.testing.assert_array_equal(got_v, want_v[:, :n])
  # The standard zarr3 reader sees the documented layout: kv[slot] = (k, v) [2, L, T, K, H].
  arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                "path": os.path.join(tmp_path, "kv")}}).result()
  assert list(arr.shape[1:]) == [2, L, CFG.max_seq_len, K, H]
  got = arr[commits["1"]["slot"], :, :, :32].read().result()
  np.testing.assert_array_equal(got[0], store.restore_point(1)[0][:, :32])
  # forget frees both copies: the request leaves the commit file.
  store.forget(1)
  drain(store)
  assert store.restore_point(1) is None
  wait_for(lambda: 1 not in store.archive.durable, what="request 1 to leave the commit file")
  assert "1" not in json.loads((tmp_path / "commits.json").read_text())
  with pytest.raises(KeyError, match="request 1"):
    kv_archive.read_archive(str(tmp_path), 1)


def test_one_archive_write_holds_several_requests_and_each_reads_back_alone(tmp_path):
  archive = kv_archive.KVArchive(str(tmp_path), CFG, chunk=16)
  rng = np.random.default_rng(10)
  k, v = kv(rng, 3, 16)  # [L, 3, 16, K, H]: requests 7, 8, 9, positions [0, 16)
  archive.write([7, 8, 9], 0, np.stack([k, v]).transpose(2, 0, 1, 3, 4, 5))
  archive.commit()
  archive.poll_until_idle()
  assert archive.durable == {7: 16, 8: 16, 9: 16}
  for b, rid in enumerate((7, 8, 9)):
    got_k, got_v = kv_archive.read_archive(str(tmp_path), rid)
    np.testing.assert_array_equal(got_k, k[:, b])
    np.testing.assert_array_equal(got_v, v[:, b])


def test_a_slot_the_commit_file_lists_is_not_reused_until_a_file_without_it_lands(tmp_path):
  archive = kv_archive.KVArchive(str(tmp_path), CFG, capacity=1, chunk=16)
  rng = np.random.default_rng(9)

  def one(k, v):  # k, v [L, 1, n, K, H] -> [1, 2, L, n, K, H], as `write` takes one request
    return np.stack([k[:, 0], v[:, 0]])[None]

  k1, v1 = kv(rng, 1, 16)
  archive.write([1], 0, one(k1, v1))
  archive.commit()
  archive.poll_until_idle()
  assert archive.durable == {1: 16}
  archive.release(1)
  k2, v2 = kv(rng, 1, 16)
  archive.write([2], 0, one(k2, v2))  # the only slot is still listed for request 1
  archive.commit()
  assert archive.durable == {1: 16}
  np.testing.assert_array_equal(kv_archive.read_archive(str(tmp_path), 1)[0], k1[:, 0])
  archive.poll_until_idle()
  assert archive.durable == {2: 16}
  np.testing.assert_array_equal(kv_archive.read_archive(str(tmp_path), 2)[1], v2[:, 0])
  archive.write([2], 0, one(k1, v1))  # recomputed from scratch: a fresh slot again
  archive.commit()
  np.testing.assert_array_equal(kv_archive.read_archive(str(tmp_path), 2)[1], v2[:, 0])
  archive.poll_until_idle()
  np.testing.assert_array_equal(kv_archive.read_archive(str(tmp_path), 2)[1], v1[:, 0])


def test_a_missing_chunk_file_is_an_error_and_intact_requests_read_back(tmp_path):
  """tensorstore reads a missing chunk as zeros; the archive reader names what is missing."""
  archive = kv_archive.KVArchive(str(tmp_path), CFG, chunk=16)
  rng = np.random.default_rng(14)
  k, v = kv(rng, 2, 48)  # requests 7 and 8, positions [0, 48)
  kv7, kv8 = (np.stack([k[:, b], v[:, b]])[None] for b in range(2))
  archive.write([7, 8], 0, np.concatenate([kv7, kv8])[:, :, :, :16])
  archive.write([7], 16, kv7[:, :, :, 16:48])
  archive.commit()
  archive.poll_until_idle()
  assert archive.durable == {7: 48, 8: 16}
  commits = json.loads((tmp_path / "commits.json").read_text())
  lost = tmp_path / "kv" / "c" / str(commits["7"]["slot"]) / "0" / "0" / "1" / "0" / "0"
  assert lost.is_file()  # the chunk of request 7's positions [16, 32)
  lost.unlink()
  with pytest.raises(kv_archive.ArchiveError,
                     match=rf"{re.escape(str(tmp_path))}: request 7 .*positions \[16, 32\) "):
    kv_archive.read_archive(str(tmp_path), 7)
  got_k, got_v = kv_archive.read_archive(str(tmp_path), 8)
  np.testing.assert_array_equal(got_k, k[:, 1, :16])
  np.testing.assert_array_equal(got_v, v[:, 1, :16])
  arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                "path": os.path.join(tmp_path, "kv")}}).result()
  got = arr[commits["8"]["slot"], :, :, :16].read().result()  # [2, L, 16, K, H]
  np.testing.assert_array_equal(got, kv8[0, :, :, :16])


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_a_missing_or_unreadable_commit_file_is_an_error_naming_it(tmp_path, damage):
  archive = kv_archive.KVArchive(str(tmp_path), CFG, chunk=16)
  k, v = kv(np.random.default_rng(15), 1, 16)
  archive.write([1], 0, np.stack([k, v]).transpose(2, 0, 1, 3, 4, 5))
  archive.commit()
  archive.poll_until_idle()
  path = tmp_path / "commits.json"
  if damage == "missing":
    path.unlink()
  else:
    path.write_text('{"1": {"slot": 0, "n"')  # cut short
  with pytest.raises(kv_archive.ArchiveError, match=re.escape(str(path))):
    kv_archive.read_archive(str(tmp_path), 1)


def test_a_durable_tier_write_error_kills_the_store_and_says_why(tmp_path):
  """Fail-stop: a store whose durable tier fails is dead (the engine replaces it), not a
  store that still answers probes while its restore points stop being durable."""
  deaths = []
  store = SnapshotStore(CFG, str(tmp_path), flush_interval_s=0.02, durable_chunk=16,
                        on_death=deaths.append)
  try:
    rng = np.random.default_rng(16)
    step(store, 0, 0, [(1, 0, 0, 20)], *kv(rng, 1, 20))
    drain(store)
    wait_durable(store, 1, 16)
    shutil.rmtree(tmp_path / "kv")  # the durable tier's chunk files can no longer be written
    (tmp_path / "kv").write_text("")
    for seq in range(1, 14):
      step(store, 0, seq, [(1, 0, 19 + seq, 1)], *kv(rng, 1, 1))
    mark = store.mark()
    wait_for(lambda: store.health is Health.DEAD, timeout=30.0, what="the store to die")
    assert not store.probe() and not store.stopped
    assert len(deaths) == 1 and deaths[0] is store.error
    assert str(tmp_path / "kv") in str(store.error)  # tensorstore's own error, which file
    cause = rf"store is dead: its thread died of {type(store.error).__name__}: .*Not a directory"
    with pytest.raises(WorkerDead, match=cause):
      step(store, 0, 14, [(1, 0, 33, 1)], *kv(rng, 1, 1))
    with pytest.raises(WorkerDead, match=cause):
      store.mark()
    with pytest.raises(WorkerDead, match=cause):
      store.caught_up(mark)  # a wait for it ends
    with pytest.raises(WorkerDead, match=cause):
      store.restore_point(1)
  finally:
    assert store.stop()
  assert store.stopped and len(deaths) == 1


class _Stuck:
  """KV whose copy to host does not complete until released (a stuck device array)."""

  def __init__(self):
    self.entered, self.release = threading.Event(), threading.Event()

  def __array__(self, *_, **__):
    self.entered.set()
    self.release.wait(60.0)
    raise RuntimeError("Array has been deleted")


def test_a_stuck_copy_holds_up_neither_callers_nor_stop(store):
  stuck = _Stuck()
  try:
    step(store, 0, 0, [(1, 0, 0, 1)], *kv(np.random.default_rng(17), 1, 1))
    drain(store)
    store.log_step(0, 1, [(1, 0, 1, 1)], stuck)
    store.mark()
    wait_for(stuck.entered.is_set, what="the store's thread to start the copy")
    got = []
    threading.Thread(target=lambda: got.append(store.committed(1)), daemon=True).start()
    wait_for(lambda: got, what="committed() while the store's thread is stuck")
    assert got == [1]
    assert store.stop(timeout_s=0.05) is False  # it says the thread has not ended
    assert store.health is Health.DEAD and not store.probe()
    with pytest.raises(WorkerDead):
      store.restore_point(1)
  finally:
    stuck.release.set()
  wait_for(lambda: not store._thread.is_alive(), what="the store's thread to end")
  assert store.error is None  # stopped by us: not a death


def test_a_store_left_running_is_stopped_before_the_interpreter_exits(tmp_path):
  """Its daemon thread must not be inside jax's C++ when finalization stops it (an abort)."""
  left = SnapshotStore(CFG, str(tmp_path), flush_interval_s=0.02)
  assert left._thread.is_alive()
  snapshot_store._stop_live_stores()  # what atexit runs
  assert not left._thread.is_alive()


def test_token_stream_exactly_once():
  s = TokenStream(7)
  assert [s.offer(i, t, float(i)) for i, t in enumerate([10, 11, 12])] == [True] * 3
  assert s.offer(1, 11, 9.0) is False  # recomputed after a failover: dropped
  assert s.duplicates == 1 and s.mismatches == []
  assert s.offer(2, 99, 9.0) is False  # a recomputation that disagrees is recorded
  assert s.duplicates == 2 and s.mismatches == [(2, 12, 99)]
  assert s.tokens == [10, 11, 12] and s.times == [0.0, 1.0, 2.0] and len(s) == 3
  with pytest.raises(StreamGap, match="index 5"):
    s.offer(5, 13, 9.0)
  assert s.offer(3, 13, 3.0) and s.tokens == [10, 11, 12, 13]


def test_fit_plan_unchanged_when_it_fits():
  plan = CellPlan(num_aw=2, num_ew=3)
  assert fit_plan(plan, 5, ["aw"]) == plan
  assert fit_plan(plan, 8, []) == plan


@pytest.mark.parametrize("failed,want", [(["aw"], (3, 4)), (["ew"], (4, 3)), ([], (4, 3))])
def test_fit_plan_shrinks_the_failed_kind_first(failed, want):
  got = fit_plan(CellPlan(num_aw=4, num_ew=4), 7, failed)
  assert (got.num_aw, got.num_ew) == want


def test_fit_plan_falls_back_to_the_other_kind():
  got = fit_plan(CellPlan(num_aw=4, num_ew=4, devices_per_aw=2), 5, ["aw"])
  assert (got.num_aw, got.num_ew, got.devices_needed) == (1, 3, 5)


def test_fit_plan_raises_when_one_aw_and_one_ew_do_not_fit():
  plan = CellPlan(num_aw=3, num_ew=3, devices_per_aw=2, devices_per_ew=2)
  with pytest.raises(RuntimeError, match="3 surviving devices cannot hold one AW and one EW"):
    fit_plan(plan, 3, ["ew"])
