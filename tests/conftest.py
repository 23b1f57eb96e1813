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



def pytest_collection_modifyitems(config, items):
  """Modules with slow tests first, each module's tests kept together (so that its module-scoped
  fixtures are built once): the workers start on the long ones and share out the short ones
  after, so that the run ends at about the same time on each (`--dist loadgroup`)."""
  del config
  slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.module.__name__ not in slow_modules)
