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
# One cache in the checkout for the workers and every process they start (the commands' own
# default is the user's ~/.cache, which a test run must neither read nor fill).
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(REPO / ".cache" / "jax")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return REPO


# The modules that take longest, in the order the workers should start them: the end-to-end demo
# (its real and shuffled runs are two scopes, one per worker), the README's commands, the TPU
# compilations, the multi-process runs.
FIRST = ("test_demo", "test_readme", "test_aot", "test_multihost", "test_resume", "test_sweep",
         "test_captioner", "test_caption_features", "test_dataset_builder", "test_sharding",
         "test_train", "test_flops")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """The longest modules first, each module's tests together: with `--dist loadscope
  --no-loadscope-reorder` a worker takes a whole module (so that its module-scoped fixtures are
  built once), the long ones first, and the run ends at about the same time on each."""
  del config
  rank = {name: i for i, name in enumerate(FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__, len(FIRST)))
