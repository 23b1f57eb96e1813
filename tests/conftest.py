"""Test set-up: 8 fake CPU devices, the persistent compilation cache, a safe import order."""

import os
import pathlib

# Must happen before jax is imported anywhere.
_DEVICES = "--xla_force_host_platform_device_count=8"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):  # test workers inherit it already set
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Importing tensorflow before torchvision segfaults with these pins; torchvision first is safe.
try:
  import torchvision  # noqa: F401
except ImportError:
  pass

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
jax.config.update("jax_compilation_cache_dir", str(REPO / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return REPO



# The modules that take longest, in the order the workers should start them: the end-to-end demo
# (two runs, one per worker), the README's commands, the TPU compilations, the multi-process runs.
FIRST = ("test_demo", "test_readme", "test_aot", "test_multihost", "test_resume", "test_sweep",
         "test_captioner", "test_caption_features", "test_dataset_builder", "test_sharding",
         "test_train", "test_flops")
# Modules whose tests the workers share out one by one: their costly set-up is either per test or
# built once for the session on disk (helpers/shared.py). Every other module goes to one worker as
# a whole, so that its module-scoped fixtures are built once.
SPLIT = ("test_readme", "test_aot", "test_multihost", "test_resume")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """The longest modules first, each module's tests together, in the xdist group of their module
  unless they have one: with `--dist loadgroup --no-loadscope-reorder` the workers start on the
  long ones and share out the short ones after, so that the run ends at about the same time on
  each."""
  del config
  rank = {name: i for i, name in enumerate(FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__, len(FIRST)))
  for item in items:
    name = item.module.__name__
    if name not in SPLIT and item.get_closest_marker("xdist_group") is None:
      item.add_marker(pytest.mark.xdist_group(name))
