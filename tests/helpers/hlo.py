"""Reading compiled HLO text."""

import re


def square_f32_buffers(text: str, length: int) -> set[tuple[int, ...]]:
  """Shapes of the f32 buffers with two axes of `length` (a query and a key axis: attention
  logits or probabilities), in whatever order and layout XLA gave them."""
  shapes = {tuple(map(int, dims.split(","))) for dims in re.findall(r"f32\[([\d,]+)\]", text)}
  return {s for s in shapes if s.count(length) >= 2}
