"""BUILD lists every module and test file, with the deps their imports imply."""

import importlib.util
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _generator():
  spec = importlib.util.spec_from_file_location("update_build", ROOT / "scripts/update_build.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_python_file_has_a_rule():
  build = (ROOT / "BUILD").read_text()
  srcs = set(re.findall(r'srcs = \["([^"]+)"\]', build))
  files = {str(p.relative_to(ROOT)) for d in ("tarragon_jax", "experiments", "configs", "tests")
           for p in (ROOT / d).rglob("*.py")}
  assert files - srcs == set(), f"files without a BUILD rule: {sorted(files - srcs)}"
  assert srcs - files == set(), f"BUILD rules for missing files: {sorted(srcs - files)}"


def test_each_test_file_is_a_py_test():
  build = (ROOT / "BUILD").read_text()
  for path in (ROOT / "tests").glob("test_*.py"):
    rel = str(path.relative_to(ROOT))
    assert re.search(r'py_test\(\n    name = "[^"]+",\n    srcs = \["' + re.escape(rel), build), rel


def test_build_is_up_to_date():
  assert (ROOT / "BUILD").read_text() == _generator().render(), (
      "BUILD is stale: run `python scripts/update_build.py`")
