"""Every input is checked where it enters: a bad one is refused with an error that names the value
and what would be valid (requests, fault schedules, sampling settings, routing tables, Hugging
Face checkpoints)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

import tarragon_jax as tj
from tarragon_jax.hf_import import config_from_hf
from tarragon_jax.resilience import faults
from tarragon_jax.resilience.routing_table import RoutingTable
from tarragon_jax.worker.placement import place
from tarragon_jax.worker.requests import Request

# -- requests ---------------------------------------------------------------------------------

CFG = tj.ModelConfig(family="mixtral", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=8, num_experts=4, top_k=2, expert_hidden=8,
                     max_seq_len=32)


@pytest.mark.parametrize("fields,message", [
    (dict(stop_tokens=("x",)), r"stop tokens must be ints; got \['x'\]"),
    (dict(stop_tokens=(3, 1.5)), r"stop tokens must be ints; got \[1\.5\]"),
    (dict(stop_tokens=(True,)), r"stop tokens must be ints; got \[True\]"),
    (dict(stop_tokens="x"), r"stop_tokens='x' must be a sequence of int token ids"),
    (dict(stop_tokens=7), r"stop_tokens=7 must be a sequence of int token ids"),
    (dict(prompt=5), r"prompt=5 must be a sequence of int token ids"),
    (dict(sampling={"temperature": 1.0}),
     r"sampling=\{'temperature': 1\.0\} must be a SamplingParams"),
])
def test_bad_request_is_refused(fields, message):
  request = Request(**{"prompt": (1, 2, 3), "max_new_tokens": 4, **fields})
  with pytest.raises(ValueError, match=message):
    request.validate(CFG)


# -- fault schedules --------------------------------------------------------------------------

@pytest.mark.parametrize("spec,message", [
    ("kill:ew1@step=x", r"fault 'kill:ew1@step=x': step='x' is not an int iteration >= 0"),
    ("kill:ew1@step=1.5", r"fault 'kill:ew1@step=1\.5': step='1\.5' is not an int"),
    ("kill:ew1@step=", r"fault 'kill:ew1@step=': step='' is not an int"),
    ("kill:ew1@step=6,layer=x", r"fault 'kill:ew1@step=6,layer=x': layer='x' is not an int"),
    ("kill:aw0@step=2,lost_device=x",
     r"fault 'kill:aw0@step=2,lost_device=x': lost_device='x' is not an int device index"),
    ("hang:aw0@t=x", r"fault 'hang:aw0@t=x': t='x' is not a number of seconds"),
    ("kill:ew1@step=1,step=2", r"fault 'kill:ew1@step=1,step=2': step= is given twice"),
    ("kill:ew1@step=1,lost_device=-2", r"lost_device=-2 must be an int >= -1 \(-1 = no device"),
    ("kill:ew1@t=-1", r"fault 'kill:ew1@t=-1': time_s=-1\.0 must be a finite number of seconds"),
    ("kill:ew1@t=inf", r"time_s=inf must be a finite number of seconds >= 0"),
])
def test_bad_fault_spec_names_fault_key_and_value(spec, message):
  with pytest.raises(ValueError, match=message):
    faults.parse_faults(spec)


@pytest.mark.parametrize("fields,message", [
    (dict(worker=0, step=1), r"worker=0; use 'aw<i>', 'ew<i>', 'store' or 'node<i>'"),
    (dict(worker="node1", kind="hang", step=1), r"a node can only be killed, not 'hang'"),
    (dict(worker="ew0", step="3"), r"step='3' must be an int >= 0"),
    (dict(worker="ew0", step=1, layer=1.0), r"layer=1\.0 must be an int >= 0"),
    (dict(worker="ew0", step=1, lost_device=True), r"lost_device=True must be an int >= -1"),
    (dict(worker="ew0", time_s="2"), r"time_s='2' must be a finite number of seconds >= 0"),
])
def test_bad_fault_field_is_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    faults.Fault(**fields)


CLUSTER = dict(num_aw=3, num_ew=4, num_layers=2, aw_cell_size=1, ew_cell_size=2)


@pytest.mark.parametrize("spec,message", [
    ("kill:aw9@step=1", r"fault 'kill:aw9@step=1': no worker aw9; the engine has 3 AWs "
                        r"\(aw0\.\.aw2\)"),
    ("hang:ew4@t=0.5", r"fault 'hang:ew4@t=0\.5': no worker ew4; the engine has 4 EWs "
                       r"\(ew0\.\.ew3\)"),
    # The bad fault is named, not the first of the schedule.
    ("kill:ew0@step=1; kill:aw3@step=2", r"fault 'kill:aw3@step=2': no worker aw3"),
    ("kill:ew1@step=1,layer=2", r"layer=2 but the model has 2 layers \(layer= is 0\.\.1\)"),
    ("kill:ew1@step=1,lost_device=2",
     r"lost_device=2 but an EW's cell has 2 devices \(lost_device= is 0\.\.1, or -1 for none\)"),
    ("kill:aw0@step=1,lost_device=1", r"lost_device=1 but an AW's cell has 1 device "
                                      r"\(lost_device= is 0\.\.0"),
    ("kill:node0@step=1", r"no node0; the runtime has no nodes \(node faults need runtime='ray'"),
])
def test_schedule_naming_what_the_engine_lacks_is_refused(spec, message):
  with pytest.raises(ValueError, match=message):
    faults.check_schedule(faults.parse_faults(spec), **CLUSTER)


def test_schedule_within_the_engine_is_accepted():
  schedule = faults.parse_faults(
      "kill:aw2@step=1,layer=1; kill:ew3@step=1,lost_device=1; hang:ew0@t=1,lost_device=-1;"
      "kill:aw0@when=recovery; restart:store@step=2")
  assert faults.check_schedule(schedule, **CLUSTER) is None
  nodes = faults.parse_faults("kill:node1@step=1")
  assert faults.check_schedule(nodes, **CLUSTER, num_nodes=2) is None
  with pytest.raises(ValueError, match=r"no node2; the runtime has 2 nodes \(node0\.\.node1\)"):
    faults.check_schedule(faults.parse_faults("kill:node2@t=1"), **CLUSTER, num_nodes=2)


# -- sampling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,message", [
    (dict(seed=2**70), r"seed=1180591620717411303424 is outside \[-2\*\*63, 2\*\*63\), the seeds "
                       r"jax\.random\.key accepts"),
    (dict(seed=2**63), r"seed=9223372036854775808 is outside \[-2\*\*63, 2\*\*63\)"),
    (dict(seed=-(2**63) - 1), r"seed=-9223372036854775809 is outside"),
    (dict(seed=1.5), r"seed=1\.5 must be an int"),
    (dict(seed="3"), r"seed='3' must be an int"),
    (dict(seed=True), r"seed=True must be an int"),
    (dict(temperature="0.5"), r"temperature='0\.5' must be a real number >= 0"),
    (dict(temperature=None), r"temperature=None must be a real number >= 0"),
    (dict(temperature=float("inf")), r"temperature=inf must be finite and >= 0"),
    (dict(top_p="1"), r"top_p='1' must be a real number in \(0, 1\]"),
])
def test_bad_sampling_params_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    tj.SamplingParams(**fields)


def test_seeds_at_the_ends_of_the_range_make_keys():
  for seed in (-(2**63), 2**63 - 1, np.int64(7)):
    assert tj.SamplingParams(seed=seed).key_data().shape == (2,)


# -- routing tables ---------------------------------------------------------------------------

PLACEMENT = place(2, 8, 4)  # replicas i32[2, 8, 2], 4 slots per layer


@pytest.mark.parametrize("replicas,slots_per_layer,epoch,message", [
    (np.zeros((2, 8), np.int32), 4, 0,
     r"replicas have shape \(2, 8\); give i32\[L, E, R\] .* slots\[\.\.\., None\]"),
    (np.zeros((2, 8, 0), np.int32), 4, 0, r"replicas have shape \(2, 8, 0\)"),
    ([[[0], [1, 2]]], 4, 0, r"replicas are not an \[L, E, R\] array .* padded with -1"),
    (PLACEMENT.replicas.astype(np.float32), 4, 0,
     r"replicas have dtype float32; slot ids must be integers \(-1 = none\): cast them"),
    (np.ones((2, 8, 2), bool), 4, 0, r"replicas have dtype bool"),
    (np.full((1, 2, 2), [[0, -1], [1, -3]]), 4, 0,
     r"replicas\[0, 1, 1\]=-3; a slot id is >= 0, or -1 for none"),
    (np.full((1, 1, 1), 2**40), 4, 0, r"slot id 1099511627776, which does not fit in int32"),
    (PLACEMENT.replicas, 0, 0, r"slots_per_layer=0 must be an int >= 1"),
    (PLACEMENT.replicas, 4.0, 0, r"slots_per_layer=4\.0 must be an int >= 1"),
    (PLACEMENT.replicas, 4, -1, r"epoch=-1 must be an int >= 0"),
    (PLACEMENT.replicas, 4, 1.5, r"epoch=1\.5 must be an int >= 0"),
])
def test_bad_routing_table_is_refused(replicas, slots_per_layer, epoch, message):
  with pytest.raises(ValueError, match=message):
    RoutingTable(replicas, slots_per_layer, epoch)


# -- Hugging Face checkpoints -----------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_configs():
  """family -> config.json dict as the installed transformers writes it (default rope)."""
  from tests.hf_models import TinyMoE

  return {family: json.loads(TinyMoE(family).hf_config().to_json_string(use_diff=False))
          for family in ("mixtral", "qwen3_moe")}


def _yarn_as_transformers_writes_it(family: str) -> dict:
  """A config.json dict for a yarn-scaled model, from the installed transformers."""
  from tests.hf_models import TinyMoE

  yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
  spec = TinyMoE(family, extra=(("rope_scaling", yarn),))
  return json.loads(spec.hf_config().to_json_string(use_diff=False))


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("family,changes,message", [
    # An older checkpoint's yarn beside a default rope_parameters.
    ("mixtral", dict(rope_scaling=YARN),
     r"rope_scaling has type='yarn', which is not supported; supported rope types: \('default',\)"),
    ("qwen3_moe", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
     r"rope_scaling has rope_type='linear', which is not supported"),
    ("qwen3_moe", dict(rope_scaling="yarn"), r"rope_scaling='yarn' is not supported; give a dict"),
    ("mixtral", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}),
     r"rope_parameters has rope_type='dynamic', which is not supported"),
    # transformers' per-layer-type form.
    ("mixtral", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                      "sliding_attention": {"rope_type": "llama3",
                                                            "rope_theta": 1e4}}),
     r"rope_parameters\['sliding_attention'\] has rope_type='llama3', which is not supported"),
    ("mixtral", dict(rope_scaling={"rope_type": "default", "rope_theta": 1.0}),
     r"the rope base differs between fields \(rope_scaling\['rope_theta'\]=1\.0, "
     r"rope_parameters\['rope_theta'\]=1000000\.0\)"),
    ("mixtral", dict(rope_parameters={"rope_type": "default", "rope_theta": "1e6"}),
     r"rope_parameters\['rope_theta'\]='1e6'; the rope base must be a number > 0"),
])
def test_unsupported_rope_is_refused_wherever_it_is(hf_configs, family, changes, message):
  with pytest.raises(tj.CheckpointError, match=message):
    config_from_hf({**hf_configs[family], **changes})


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_unsupported_rope_as_transformers_writes_it_is_refused(family):
  with pytest.raises(tj.CheckpointError, match=r"rope_parameters has rope_type='yarn'"):
    config_from_hf(_yarn_as_transformers_writes_it(family))


@pytest.mark.parametrize("family,changes,theta", [
    ("mixtral", {}, 1e6),  # transformers' default rope_parameters
    ("qwen3_moe", {}, 1e4),
    ("mixtral", dict(rope_parameters=None, rope_scaling=None, rope_theta=5e5), 5e5),  # older
    ("mixtral", dict(rope_scaling={"type": "default"}), 1e6),
    ("mixtral", dict(rope_parameters={"full_attention": {"rope_type": "default",
                                                         "rope_theta": 5e5}}), 5e5),
])
def test_default_rope_loads_with_its_theta(hf_configs, family, changes, theta):
  assert config_from_hf({**hf_configs[family], **changes}).rope_theta == theta


def _truncated_checkpoint(directory, hf_config: dict, sharded: bool) -> str:
  """A checkpoint directory whose (only) safetensors file lost its last bytes; returns that file."""
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f)
  name = "model-00001-of-00001.safetensors" if sharded else "model.safetensors"
  file = os.path.join(directory, name)
  save_file({"model.embed_tokens.weight": np.ones((96, 32), np.float32)}, file)
  if sharded:
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump({"weight_map": {"model.embed_tokens.weight": name}}, f)
  with open(file, "r+b") as f:
    f.truncate(os.path.getsize(file) - 16)
  return file


@pytest.mark.parametrize("sharded", [False, True])
def test_truncated_safetensors_file_is_named(hf_configs, tmp_path, sharded):
  file = _truncated_checkpoint(str(tmp_path), hf_configs["mixtral"], sharded)
  message = (re.escape(file) + r" is not a readable safetensors file; it is truncated or corrupt "
             r"\(.*\): download or save it again")
  with pytest.raises(tj.CheckpointError, match=message):
    tj.load_hf_checkpoint(str(tmp_path))


def test_the_model_takes_python_lists_and_names_a_bad_argument():
  import jax

  params = tj.init_params(CFG, jax.random.key(0))
  cache = tj.KVCache.create(CFG, 2)
  logits, cache = tj.extend(params, CFG, cache, [[1, 2, 3]], [1], [3])  # lists, as arrays
  np.testing.assert_allclose(np.asarray(logits[0]),
                             np.asarray(tj.forward(params, CFG, [[1, 2, 3]])[0, -1]), atol=1e-5)
  message = "extend: slots has shape (1, 1); expected i32[B]"
  with pytest.raises(ValueError, match=re.escape(message)):
    tj.extend(params, CFG, tj.KVCache.create(CFG, 2), [[1, 2]], [[0]], [2])
  with pytest.raises(ValueError, match=r"forward: tokens has dtype float64; give integers"):
    tj.forward(params, CFG, [[0.5, 1.0]])
