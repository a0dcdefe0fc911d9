"""The package's imports point down the layers (STYLE: no imports back up): the model, PEFT and
data layers import no training code, and training imports neither the public API (`api.py`), the
evaluations nor the command line, whether at module level or inside a function."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxtune"
ABOVE_TRAIN = ("jaxtune.api", "jaxtune.eval", "jaxtune.commands", "jaxtune.cli")
# Layer -> the modules it must not import (nor any module under them).
FORBIDDEN = {
  "model": ("jaxtune.train", "jaxtune.data", *ABOVE_TRAIN),
  "peft": ("jaxtune.train", *ABOVE_TRAIN),
  "data": ("jaxtune.train", "jaxtune.model", *ABOVE_TRAIN),
  "train": ABOVE_TRAIN,
}


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) of every import in the file; `from a import b` counts as a.b too."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      out += [(node.lineno, node.module)]
      out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
  return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_down(layer):
  bad = [
    f"{path.relative_to(PACKAGE.parent)}:{line}: imports {name}"
    for path in sorted((PACKAGE / layer).rglob("*.py"))
    for line, name in _imports(path)
    if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer])
  ]
  assert not bad, "\n".join(bad)
