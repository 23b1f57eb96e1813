"""Tolerances from the arithmetic compared: how far two float32 orders of one sum can differ.

A gradient is a sum over every token of the batch. A mesh, a micro-batch split or another CPU
adds those terms in another order, and each order's rounding error is at most
(n - 1) * eps / 2 * sum(|terms|) (Higham, Accuracy and Stability of Numerical Algorithms, 4.2),
so two orders differ by at most (n - 1) * eps * sum(|terms|). For each parameter, the largest
sum over examples of the per-example gradients' magnitudes stands in for sum(|terms|): it is what
the sum adds up before cancellation between examples, where sharding changes the order. A bias
takes its kernel's magnitude where that is larger: its terms are the per-token output gradients,
the kernel's divided by inputs of order one (every projection reads LayerNorm outputs), and a
bias whose gradient cancels within each example (attention's key bias: softmax ignores a shift of
every key) would otherwise be held to zero.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def _leaf_scales(abs_sum: Any) -> Any:
  if not isinstance(abs_sum, Mapping):
    return float(np.max(abs_sum))
  out = {k: _leaf_scales(v) for k, v in abs_sum.items()}
  if "bias" in out and "kernel" in out:
    out["bias"] = max(out["bias"], out["kernel"])
  return out


def reordered_sum_atol(abs_sum: Any, num_terms: int) -> Any:
  """Per parameter, the bound on the difference of two float32 sums of `num_terms` terms, from
  the per-example magnitudes `abs_sum` (a nested dict of parameters)."""
  return jax.tree.map(lambda s: (num_terms - 1) * EPS32 * s, _leaf_scales(abs_sum))


def per_example_abs_grads(loss: Callable[..., Any], params: Any, batch: dict, over: Any
                          ) -> Any:
  """sum over examples of |d loss_b / d params|, where loss_b is example b's share of the
  batch's loss (`over` holds the whole batch's denominators); no dropout."""
  def one(example):
    single = jax.tree.map(lambda x: x[None], example)
    return jax.grad(lambda p: loss(p, single, None, over=over)[0])(params)
  grads = jax.jit(jax.vmap(one))(batch)
  return jax.tree.map(lambda g: np.abs(np.asarray(g, np.float64)).sum(axis=0), grads)


def assert_trees_within(got: Any, want: Any, atol: Any, what: str) -> float:
  """Asserts |got - want| <= atol leaf by leaf; returns the largest |got - want| / atol."""
  worst = 0.0
  flat = jax.tree_util.tree_flatten_with_path(want)[0]
  for (path, w), g, a in zip(flat, jax.tree.leaves(got), jax.tree.leaves(atol)):
    diff = np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))
    a = np.maximum(np.asarray(a, np.float64), np.finfo(np.float32).tiny)
    ratio = float((diff / a).max())
    worst = max(worst, ratio)
    assert ratio <= 1.0, (f"{what} {jax.tree_util.keystr(path)}: differs by "
                          f"{diff.max():.3g}, {ratio:.3g} times the bound")
  return worst
