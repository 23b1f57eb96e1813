"""The demo world's dishes: partially ordered steps, some optional, as real recipes have them.

A dish is a list of stages. A stage's steps come in any order, and every step of a stage comes
before the next stage's; a step marked "?" is optional. A video of a dish draws each optional
step with probability one half and each stage's order uniformly, keeping only the orders whose
length the world allows. Every such order, with its probability, is enumerated (`orders`): the
sampler draws from that list, and the oracle that knows the dish reads its next step from it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
from typing import Iterable, Sequence

import numpy as np

from vbert_jax.demo.world import words

StepKey = tuple[str, str]  # (verb, noun)

# Which order the cook follows is a matter of taste where the stage allows it; what comes
# before what is not. Nouns and verbs recur across dishes (onions are cut in three of them), so
# the last step alone does not tell the dish.
DISHES: dict[str, tuple[tuple[str, ...], ...]] = {
    "salad": (("cut tomato", "cut cucumber", "slide cucumber?"), ("shake lemon?", "spin tomato?"),
              ("pour lemon",)),
    "mashed potatoes": (("drop potato",), ("stir potato", "shrink cheese?"), ("mash potato",),
                        ("pour cheese",)),
    "omelette": (("spin egg?", "shake cheese?"), ("drop egg",), ("stir egg", "cut onion?"),
                 ("pour egg",), ("flip egg",)),
    "fried fish": (("slide fish", "mash lemon?"), ("shake fish",), ("flip fish",),
                   ("pour lemon", "spin fish?")),
    "soup": (("cut carrot", "cut onion?"), ("drop carrot", "drop potato", "shrink onion?"),
             ("stir potato",)),
    "cheese toast": (("slide bread", "spin bread?"), ("shrink cheese", "cut bread?"),
                     ("drop cheese",), ("flip bread",)),
    "stir fry": (("slide carrot?", "cut onion"), ("shrink onion", "shrink carrot"),
                 ("stir onion", "shake fish?"), ("flip fish",)),
    "tomato sauce": (("drop tomato",), ("mash tomato", "shake tomato?"), ("stir tomato",),
                     ("pour cheese?",)),
    "pickles": (("cut cucumber",), ("spin cucumber?",), ("drop cucumber",),
                ("shake cucumber", "mash lemon?"), ("pour lemon",)),
}


@dataclasses.dataclass(frozen=True)
class Dish:
  name: str
  stages: tuple[tuple[tuple[StepKey, bool], ...], ...]  # ((verb, noun), optional) per stage

  @property
  def nouns(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n for stage in self.stages for (_, n), _ in stage))

  @property
  def lengths(self) -> tuple[int, int]:
    steps = [opt for stage in self.stages for _, opt in stage]
    return steps.count(False), len(steps)


def parse_step(text: str) -> tuple[StepKey, bool]:
  optional = text.endswith("?")
  verb, noun = text.rstrip("?").split()
  if verb not in words.VERBS or noun not in words.NOUNS:
    raise ValueError(f"recipe step {text!r}: expected '<verb> <noun>' from the world's words")
  return (verb, noun), optional


@functools.lru_cache(maxsize=None)
def dishes() -> tuple[Dish, ...]:
  """DISHES parsed, once: every video's draw and every oracle call reads them."""
  return tuple(Dish(name, tuple(tuple(parse_step(s) for s in stage) for stage in stages))
               for name, stages in DISHES.items())


def steps_of_dishes(ds: Iterable[Dish]) -> list[StepKey]:
  """Every (verb, noun) that some dish uses, in a fixed order."""
  return sorted({key for d in ds for stage in d.stages for key, _ in stage})


@functools.lru_cache(maxsize=None)
def orders(dish: Dish, min_steps: int, max_steps: int) -> tuple[tuple[tuple[StepKey, ...],
                                                                      float], ...]:
  """Every order of the dish a video may follow, with its probability, lengths within range."""
  optional = [key for stage in dish.stages for key, opt in stage if opt]
  out: dict[tuple[StepKey, ...], float] = collections.defaultdict(float)
  for kept in itertools.product((False, True), repeat=len(optional)):
    keep = {key for key, k in zip(optional, kept) if k}
    stages = [[key for key, opt in stage if not opt or key in keep] for stage in dish.stages]
    if not min_steps <= sum(map(len, stages)) <= max_steps:
      continue
    weight = 0.5 ** len(optional) / math.prod(math.factorial(len(s)) for s in stages)
    for perms in itertools.product(*(itertools.permutations(s) for s in stages)):
      out[tuple(itertools.chain(*perms))] += weight
  total = sum(out.values())
  return tuple((seq, p / total) for seq, p in sorted(out.items()))


def usable(min_steps: int, max_steps: int) -> tuple[Dish, ...]:
  """The dishes that some order of fits the range; a ValueError when none does."""
  fits = tuple(d for d in dishes() if orders(d, min_steps, max_steps))
  if not fits:
    have = ", ".join(f"{d.name} {d.lengths[0]}-{d.lengths[1]}" for d in dishes())
    raise ValueError(f"steps_per_video ({min_steps}, {max_steps}): no dish has that many steps "
                     f"(steps per dish: {have})")
  return fits


def draw(rng: np.random.Generator, min_steps: int, max_steps: int
         ) -> tuple[Dish, tuple[StepKey, ...]]:
  """A dish, uniformly among those that fit, and one of its orders by its probability."""
  fits = usable(min_steps, max_steps)
  dish = fits[int(rng.integers(len(fits)))]
  seqs = orders(dish, min_steps, max_steps)
  k = int(rng.choice(len(seqs), p=np.array([p for _, p in seqs])))
  return dish, seqs[k][0]


def oracle_next(dish: Dish, prefix: Sequence[StepKey], min_steps: int, max_steps: int
                ) -> StepKey | None:
  """The likeliest next step given the dish and the steps so far (None if the dish is done)."""
  mass: dict[StepKey, float] = collections.defaultdict(float)
  n = len(prefix)
  for seq, p in orders(dish, min_steps, max_steps):
    if len(seq) > n and tuple(seq[:n]) == tuple(prefix):
      mass[seq[n]] += p
  return max(sorted(mass), key=mass.__getitem__) if mass else None


def by_name(name: str) -> Dish:
  for d in dishes():
    if d.name == name:
      return d
  raise KeyError(f"no dish {name!r}; the world's dishes are {list(DISHES)}")
