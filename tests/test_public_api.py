"""The project reaches JAX through its public API only: private modules change without notice."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_no_private_jax_modules():
  private = re.compile(r"\bjax\._src\b|from jax import _src|jaxlib\._jax|jax\._src")
  found = [f"{path.relative_to(REPO)}:{number}"
           for folder in ("vbert_jax", "launch", "bench", "configs", "data")
           for path in sorted((REPO / folder).rglob("*.py"))
           for number, line in enumerate(path.read_text().splitlines(), start=1)
           if private.search(line)]
  assert not found, found
