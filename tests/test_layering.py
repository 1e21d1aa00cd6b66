"""Imports run one way: ground <- worker code <- resilience <- runtime <- serving <- experiments.

A module may import its own layer and the layers below it, never one above. Read from the
source (every `import` statement, at any depth), so an import inside a function counts too.
"""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Lowest first. A module is in the layer of the longest prefix of its dotted name listed here.
LAYERS = [
    ("ground", ["tarragon_jax.config", "tarragon_jax.layers", "tarragon_jax.mesh",
                "tarragon_jax.hf_import", "tarragon_jax.checkpoint", "tarragon_jax.weights_source",
                "tarragon_jax.checkpoint_parts", "tarragon_jax.training", "tarragon_jax.flax_nnx"]),
    ("worker", ["tarragon_jax.worker"]),
    ("resilience", ["tarragon_jax.resilience"]),
    ("runtime", ["tarragon_jax.runtime"]),
    ("serving", ["tarragon_jax.serving"]),
    ("experiments", ["experiments", "configs", "scripts"]),
]
# The package's root is the public API: the model code, and (imported on first use) the serving
# and training API, so it sits in the serving layer: no library module may import it.
PACKAGE = ("tarragon_jax", "serving")


def layer_of(module: str) -> int | None:
  best, rank = -1, None
  for i, (_, prefixes) in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and len(p) > best:
        best, rank = len(p), i
  if rank is None and module == PACKAGE[0]:
    rank = [name for name, _ in LAYERS].index(PACKAGE[1])
  return rank


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out.append((node.lineno, node.module))
      # `from tarragon_jax import launch` names a module, not an attribute.
      out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
              if (ROOT / node.module.replace(".", "/") / f"{a.name}.py").exists()
              or (ROOT / node.module.replace(".", "/") / a.name / "__init__.py").exists()]
  return out


def sources() -> list[pathlib.Path]:
  return sorted(p for d in ("tarragon_jax", "experiments", "configs", "scripts")
                for p in (ROOT / d).rglob("*.py"))


def test_every_module_is_in_a_layer():
  unplaced = [module_name(p) for p in sources() if layer_of(module_name(p)) is None]
  assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"


def test_no_import_runs_back_up():
  names = [name for name, _ in LAYERS]
  upward = []
  for path in sources():
    me = module_name(path)
    mine = layer_of(me)
    for line, target in imports(path):
      theirs = layer_of(target)
      if theirs is not None and theirs > mine:
        upward.append(f"{path.relative_to(ROOT)}:{line} ({names[mine]}) imports {target} "
                      f"({names[theirs]})")
  assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_the_layer_rule_sees_an_upward_import():
  # The check itself: a worker module importing serving code would be reported.
  assert layer_of("tarragon_jax.worker.datapath") < layer_of("tarragon_jax.serving.engine")
  assert layer_of("tarragon_jax.resilience.tarragon") < layer_of("tarragon_jax.runtime.local")
  assert layer_of("tarragon_jax.layers.moe") == 0 and layer_of("experiments.failover") == 5


def test_the_root_api_imports_the_serving_stack_only_on_use():
  code = ("import sys, tarragon_jax as tj; "
          "assert 'tarragon_jax.serving.engine' not in sys.modules; "
          "names = [getattr(tj, n) for n in tj._ON_USE]; "
          "assert tj.Engine is sys.modules['tarragon_jax.serving.engine'].Engine; "
          "assert set(tj._ON_USE) <= set(dir(tj)) and set(tj._ON_USE) <= set(tj.__all__)")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
