"""The demo world: generated cooking-like instructional videos with narration and ground truth.

`generate_world(WorldConfig(...), out_dir)` writes the videos; `DISHES` are the recipes they
follow; `VERBS`, `NOUNS` and `TEMPLATES` are the label sets and phrasings later stages use.
"""

from vbert_jax.demo.world.recipes import DISHES
from vbert_jax.demo.world.words import (ADVERBS, FILLERS, NOUNS, TEMPLATES, VERB_ING, VERBS,
                                        step_sentence)
from vbert_jax.demo.world.world import (Cue, NarrationConfig, Step, WorldConfig, clip_labels,
                                        generate_video, generate_world, load_manifest,
                                        load_truth, video_id, webvtt)
