"""The project's config files, read by path as the commands read them (they are no package)."""

from __future__ import annotations

import pathlib

from vbert_jax import config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"

pretrain = config_lib.load_module(CONFIGS / "pretrain.py")
demo = config_lib.load_module(CONFIGS / "demo.py")
captioner = config_lib.load_module(CONFIGS / "captioner.py")
