"""The demo world's recipes: the orders a dish allows and their probabilities, the draws, the
oracle, the step n-gram, and how foreseeable the next step is."""

import collections
import math

import numpy as np
import pytest

from vbert_jax.demo.world import predictability
from vbert_jax.demo.world import recipes
from vbert_jax.demo.world import words


def _dish(*stages):
  return recipes.Dish("test", tuple(tuple(recipes.parse_step(s) for s in st) for st in stages))


A, B, C, D = ("cut", "tomato"), ("cut", "onion"), ("drop", "egg"), ("flip", "egg")


def test_orders_follow_the_stages_with_their_probabilities():
  dish = _dish(("cut tomato", "cut onion"), ("drop egg?",), ("flip egg",))
  got = dict(recipes.orders(dish, 1, 10))
  # Two stage orders, the optional step in or out: each of the four with 1/4.
  assert got == pytest.approx({(A, B, C, D): 0.25, (B, A, C, D): 0.25, (A, B, D): 0.25,
                               (B, A, D): 0.25})
  # Lengths outside the range are dropped and the rest renormalised.
  assert dict(recipes.orders(dish, 4, 4)) == pytest.approx({(A, B, C, D): 0.5, (B, A, C, D): 0.5})
  assert dish.lengths == (3, 4) and dish.nouns == ("tomato", "onion", "egg")


def test_every_dish_is_a_valid_partial_order_and_the_words_are_covered():
  for dish in recipes.dishes():
    seqs = recipes.orders(dish, 1, 20)
    assert sum(p for _, p in seqs) == pytest.approx(1.0, abs=1e-12)
    lo, hi = dish.lengths
    assert {len(s) for s, _ in seqs} == set(range(lo, hi + 1))
    stage_of = {key: i for i, stage in enumerate(dish.stages) for key, _ in stage}
    for seq, _ in seqs:
      assert [stage_of[k] for k in seq] == sorted(stage_of[k] for k in seq)
      assert len(set(seq)) == len(seq)
  used = recipes.steps_of_dishes(recipes.dishes())
  assert {v for v, _ in used} == set(words.VERBS) and {n for _, n in used} == set(words.NOUNS)


def test_draws_match_the_enumerated_probabilities():
  dish = recipes.by_name("salad")
  expected = dict(recipes.orders(dish, 4, 7))
  rng = np.random.default_rng(0)
  counts = collections.Counter()
  n = 0
  while n < 4000:
    d, seq = recipes.draw(rng, 4, 7)
    if d.name == "salad":
      counts[seq] += 1
      n += 1
  assert set(counts) <= set(expected)
  for seq, p in expected.items():
    # Binomial: four standard deviations.
    assert abs(counts[seq] / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9, seq


def test_a_range_no_dish_fits_is_an_error_naming_the_dishes():
  with pytest.raises(ValueError, match=r"no dish has that many steps.*soup 4-6"):
    recipes.usable(20, 30)
  assert {d.name for d in recipes.usable(7, 7)} == {"omelette", "stir fry"}
  with pytest.raises(ValueError, match="from the world's words"):
    recipes.parse_step("chop tomato")


def test_the_oracle_picks_the_likeliest_next_step():
  dish = _dish(("cut tomato",), ("cut onion?",), ("drop egg", "flip egg"))
  # After A: B with 1/2; C or D with 1/4 each.
  assert recipes.oracle_next(dish, [A], 1, 10) == B
  assert recipes.oracle_next(dish, [A, B, C], 1, 10) == D
  assert recipes.oracle_next(dish, [A, B, C, D], 1, 10) is None
  # Without the optional step's orders (length 4 only), B is certain.
  assert recipes.oracle_next(_dish(("cut tomato",), ("cut onion?",), ("drop egg",)), [A], 3, 3) == B


def test_step_ngram_backs_off_to_shorter_contexts():
  x, y, z = "x", "y", "z"
  train = [[x, y, z], [x, y, z], [z, y, x], [y, x]]
  bigram = predictability.StepNgram(train, 2)
  assert bigram.predict([x]) == y  # x -> y twice
  assert bigram.predict([x, y]) == x  # y -> z twice, y -> x twice: the tie goes to x
  trigram = predictability.StepNgram(train, 3)
  assert trigram.predict([x, y]) == z  # the trigram knows (x, y) -> z
  assert trigram.predict([x, x]) == bigram.predict([x]) == y  # unseen (x, x): backs off
  assert bigram.predict([]) == trigram.predict([]) == x  # the commonest step (x, y tie: x)
  with pytest.raises(ValueError, match="no step"):
    predictability.StepNgram([[]])


def _truth(split, dish, steps):
  return {"split": split, "dish": dish.name,
          "steps": [{"verb": v, "noun": n} for v, n in steps]}


def test_next_step_scores_the_ngrams_and_the_oracle_on_held_out_videos():
  rng = np.random.default_rng(0)
  truths = []
  for i in range(400):
    dish, seq = recipes.draw(rng, 4, 7)
    truths.append(_truth("val" if i % 4 == 3 else "train", dish, seq))
  got = predictability.next_step(truths, 4, 7)
  held = [t for t in truths if t["split"] == "val"]
  assert got["boundaries"] == sum(len(t["steps"]) - 1 for t in held)
  assert got["distinct_steps"] == len(recipes.steps_of_dishes(recipes.usable(4, 7)))
  # Neither random nor fixed: the world's design band, with the oracle above every n-gram.
  assert 3 * got["chance"] < got["ngram2"] < got["ngram3"] < got["oracle"] < 0.9
  assert got["ngram3"] <= 0.8
