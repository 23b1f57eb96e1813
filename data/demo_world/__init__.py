"""The demo world: generated cooking-like instructional videos with narration and ground truth.

`generate_world(WorldConfig(...), out_dir)` writes the videos; `VERBS`, `NOUNS` and `TEMPLATES`
are the label sets and phrasings later stages use.
"""

from data.demo_world.vocabulary import (ADVERBS, AFFORDANCES, FILLERS, NOUNS, TEMPLATES, VERB_ING,
                                        VERBS, step_sentence)
from data.demo_world.world import (Cue, NarrationConfig, Step, WorldConfig, clip_labels,
                                   generate_video, generate_world, load_manifest, load_truth,
                                   video_id, webvtt)
