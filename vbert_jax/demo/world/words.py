"""The demo world's words: verbs, nouns, narration templates and filler sentences.

Later stages use these lists as label sets (zero-shot verb and noun prediction) and to check
that narration was parsed; the renderer gives every verb its own motion and every noun its own
look, so a clip's pixels say which step it shows.
"""

from __future__ import annotations

# Each verb is one visible motion or change of the object (see render.py for the motion).
VERBS: tuple[str, ...] = ("slide", "drop", "spin", "cut", "shrink", "shake", "pour", "flip",
                          "stir", "mash")

# Present participles for templates like "we're cutting the tomato".
VERB_ING: dict[str, str] = {
    "slide": "sliding", "drop": "dropping", "spin": "spinning", "cut": "cutting",
    "shrink": "shrinking", "shake": "shaking", "pour": "pouring", "flip": "flipping",
    "stir": "stirring", "mash": "mashing",
}

# Each noun has its own shape, colour and texture (see render.py).
NOUNS: tuple[str, ...] = ("tomato", "egg", "carrot", "bread", "cheese", "cucumber", "onion",
                          "potato", "lemon", "fish")

# Narration of one step. {verb} is the base form, {ving} the participle, {adv} an adverb with a
# trailing space or nothing.
TEMPLATES: tuple[str, ...] = (
    "now we {verb} the {noun}",
    "next, {adv}{verb} the {noun}",
    "let's {verb} the {noun}",
    "okay, now I'm going to {verb} the {noun}",
    "then you {verb} the {noun}",
    "now let me show you how to {verb} the {noun}",
    "first, {adv}{verb} the {noun}",
    "and now {ving} the {noun}",
    "we're {ving} the {noun} here",
    "you want to {adv}{verb} the {noun}",
    "after that, {verb} the {noun}",
    "go ahead and {verb} the {noun}",
    "I like to {verb} the {noun} at this point",
    "time to {verb} the {noun}",
    "so here I'm {adv}{ving} the {noun}",
    "make sure you {verb} the {noun}",
    "just {verb} the {noun} like this",
    "now {adv}{verb} your {noun}",
    "take the {noun} and {verb} it",
    "the {noun}, we {verb} it {adv}now",
    "right, {ving} the {noun} now",
    "we need to {verb} the {noun}",
    "and then {adv}{verb} the {noun}",
    "here we {verb} the {noun} again",
)

# How an annotator captions each step, in the style of YouCook II's segment sentences: the
# action, the ingredient and the tool or place the renderer draws with that action. Ground
# truth: it trains and scores the demo's captioner, as YouCook II's captions did the paper's.
ANNOTATIONS: dict[str, str] = {
    "slide": "slide the {noun} along the board",
    "drop": "drop the {noun} into the pot",
    "spin": "spin the {noun} on the plate",
    "cut": "cut the {noun} in half on the board",
    "shrink": "shrink the {noun} in the pan",
    "shake": "shake the {noun} in a jar",
    "pour": "pour the {noun} into the bowl",
    "flip": "flip the {noun} with a spatula",
    "stir": "stir the {noun} in the pot",
    "mash": "mash the {noun} with a masher",
}
assert set(ANNOTATIONS) == set(VERBS)

ADVERBS: tuple[str, ...] = ("gently ", "quickly ", "carefully ", "slowly ", "just ", "")

# Sentences that describe nothing on screen; none contains a verb or noun above.
FILLERS: tuple[str, ...] = (
    "hi everyone, welcome back to my kitchen",
    "this is one of my favourite recipes",
    "don't forget to subscribe",
    "it smells really good already",
    "my grandmother used to make this every sunday",
    "you can find the full recipe below",
    "okay",
    "so yeah",
    "let me know in the comments what you think",
    "this part is really easy",
    "I'm using a little bit of everything today",
    "it's been a long week",
    "look at that colour",
    "alright, moving on",
    "that's looking pretty good",
    "I'll explain why in a second",
)


def step_sentence(template: str, verb: str, noun: str, adverb: str = "") -> str:
  """Fills one template; the result is lower-case apart from the pronoun "I"."""
  return template.format(verb=verb, ving=VERB_ING[verb], noun=noun, adv=adverb)


def annotation(verb: str, noun: str) -> str:
  """A step's caption as an annotator writes it (ANNOTATIONS)."""
  return ANNOTATIONS[verb].format(noun=noun)
