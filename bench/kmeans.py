"""Hierarchical k-means: ours (vbert_jax.vocab.kmeans) against faiss-cpu, in one process.

Both fit depth 4 x branching 12 (20736 leaves) to the same 50,000 seeded 1024-d vectors from a
Gaussian mixture, with the same number of Lloyd iterations per node and every point of a node used
(faiss: max_points_per_centroid >= node size, one redo, 2 threads). Ours runs with tol=0, so it
only stops early at a fixed point, where further iterations change nothing. A node with fewer points
than branches gets its points repeated as centroids on both sides.

Reported: fit seconds and their ratio, leaf inertia ratio, our tree assignment in vectors/s and
against faiss IndexFlatL2 search over the 20736 leaves (each index is built before its searches
are timed: our `TreeIndex` puts the prepared tree on the devices, faiss's `add` copies the
leaves), and (unless --nofit_1m) the peak anonymous resident memory (RssAnon, in GB of 10^9
bytes) of a fit over 1,000,000 float16 vectors memory-mapped from disk, run in a child process
whose /proc status this one reads every 5 ms.

  python bench/kmeans.py [--nofit_1m] [--rows=50000] [--repeats=3]
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from vbert_jax import cli  # noqa: E402

DEPTH, BRANCHING, ITERATIONS, DIM, SEED = 4, 12, 20, 1024, 0


def mixture(rows: int, dim: int, seed: int, centers: int = 4096) -> np.ndarray:
  """A seeded Gaussian mixture: unit-variance blobs around well-spread random centres."""
  rng = np.random.default_rng(seed)
  mu = rng.normal(size=(centers, dim)).astype(np.float32) * 2.0
  out = np.empty((rows, dim), np.float32)
  for start in range(0, rows, 65536):
    stop = min(start + 65536, rows)
    lab = rng.integers(0, centers, stop - start)
    out[start:stop] = mu[lab] + rng.standard_normal((stop - start, dim), np.float32)
  return out


def faiss_tree(x: np.ndarray, depth: int, k: int, niter: int, seed: int):
  """The same hierarchical fit with faiss.Kmeans at every node; returns (leaf, leaf sq. dist)."""
  import faiss
  n, dim = x.shape
  node = np.zeros(n, np.int64)
  dist = np.zeros(n, np.float32)
  for level in range(depth):
    order = np.argsort(node, kind="stable")
    bounds = np.searchsorted(node[order], np.arange(k**level + 1))
    child = np.zeros(n, np.int64)
    for nd in range(k**level):
      idx = order[bounds[nd]:bounds[nd + 1]]
      if len(idx) == 0:
        continue
      pts = np.ascontiguousarray(x[idx])
      if len(pts) < k:  # repeat points as centroids, as ours does
        index = faiss.IndexFlatL2(dim)
        index.add(pts[np.arange(k) % len(pts)])
      else:
        km = faiss.Kmeans(dim, k, niter=niter, nredo=1, seed=seed + nd, verbose=False,
                          max_points_per_centroid=len(pts), min_points_per_centroid=1)
        km.train(pts)
        index = km.index
      d, lab = index.search(pts, 1)
      child[idx] = lab[:, 0]
      dist[idx] = d[:, 0]
    node = node * k + child
  return node, dist


def ours_tree(x: np.ndarray, depth: int, k: int, niter: int, seed: int, chunk: int = 1 << 20,
              seed_sample: int = 128):
  from vbert_jax.vocab import kmeans
  cfg = kmeans.KMeansConfig(depth=depth, branching=k, iterations=niter, tol=0.0, seed=seed,
                            chunk_size=chunk, seed_sample=seed_sample)
  return kmeans.fit_tree(x, cfg)


def rss_anon_gb(pid: int) -> float:
  """Anonymous resident memory of process `pid` in GB (10^9 bytes, the target's unit; the kernel
  counts in KiB)."""
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("RssAnon:"):
        return int(line.split()[1]) * 1024 / 1e9
  raise RuntimeError(f"/proc/{pid}/status has no RssAnon line")


def child_fit(path: str, chunk: int) -> None:
  """Runs in a subprocess: fits from the memory-mapped file."""
  from vbert_jax.vocab import kmeans
  cfg = kmeans.KMeansConfig(depth=DEPTH, branching=BRANCHING, iterations=ITERATIONS,
                            seed=SEED, chunk_size=chunk)
  t = time.perf_counter()
  fit = kmeans.fit_tree(path, cfg, log=lambda m: print(m, flush=True))
  secs = time.perf_counter() - t
  print(f"fit_1m: rows={fit.num_rows} seconds={secs:.1f} leaf_inertia={fit.inertia[-1]:.6g} "
        f"iterations={fit.iterations_run}", flush=True)


def peak_rss_anon_gb(cmd: list[str]) -> tuple[float, str]:
  """Runs `cmd`, reading its RssAnon every 5 ms from this process (a sampler thread inside the
  child would wait for its GIL, and miss peaks while the fit holds it); (peak GB, its output)."""
  with tempfile.TemporaryFile("w+") as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    peak = 0.0
    while proc.poll() is None:
      try:
        peak = max(peak, rss_anon_gb(proc.pid))
      except (OSError, RuntimeError):  # the child is exiting
        pass
      time.sleep(0.005)
    out.seek(0)
    text = out.read()
  if proc.returncode != 0:
    sys.stderr.write(text[-4000:])
    raise RuntimeError(f"the 1M-row fit failed with exit code {proc.returncode}")
  return peak, text


def fit_1m(rows: int, chunk: int) -> float:
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "features.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, DIM))
    for start in range(0, rows, 100_000):
      stop = min(start + 100_000, rows)
      arr[start:stop] = mixture(stop - start, DIM, seed=SEED + 1 + start)
    arr.flush()
    del arr
    peak, text = peak_rss_anon_gb([sys.executable, __file__, f"--child_fit={path}",
                                   f"--chunk={chunk}"])
  sys.stdout.write("".join(line + "\n" for line in text.splitlines()
                           if line.startswith(("level", "fit_1m"))))
  print(f"RSS_ANON_PEAK_GB={peak:.3f}")
  return peak


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("rows", 50_000, "vectors of the in-memory fits", flag_values=fv)
  flags.DEFINE_integer("repeats", 3, "timed fits of each side", flag_values=fv)
  flags.DEFINE_bool("fit_1m", True, "also run the 1M-row on-disk fit (about 4 minutes)",
                    flag_values=fv)
  flags.DEFINE_integer("rows_1m", 1_000_000, "rows of the on-disk fit", flag_values=fv)
  flags.DEFINE_integer("chunk", 32768, "chunk rows of the on-disk fit", flag_values=fv)
  flags.DEFINE_integer("seed_sample", 128, "k-means++ rows per node", flag_values=fv)
  flags.DEFINE_bool("only_1m", False, "run only the 1M-row on-disk fit", flag_values=fv)
  flags.DEFINE_string("child_fit", None, "internal: the .npy file the child process of the "
                      "on-disk fit reads", flag_values=fv)


def parse_args(argv=None):
  return cli.parse(define_flags, argv, __doc__)


def main() -> None:
  args = parse_args()
  if args.child_fit:
    child_fit(args.child_fit, args.chunk)
    return
  if args.only_1m:
    print(f"fit_1m_rss_anon_gb={fit_1m(args.rows_1m, args.chunk):.3f}")
    return

  import faiss
  import jax
  from vbert_jax.vocab import kmeans
  faiss.omp_set_num_threads(2)
  x = mixture(args.rows, DIM, SEED)
  print(f"data: {args.rows} x {DIM} float32, depth {DEPTH}, branching {BRANCHING}, "
        f"{ITERATIONS} iterations; jax devices: {jax.devices()}")

  # One untimed fit compiles every shape the timed ones use (the fit is deterministic), so
  # that each side's figure is its best of `repeats` warm runs.
  ours_tree(x, DEPTH, BRANCHING, ITERATIONS, SEED, seed_sample=args.seed_sample)
  ours_s, faiss_s = [], []
  for rep in range(args.repeats):  # alternate the two, keep the best time of each
    t = time.perf_counter()
    fit = ours_tree(x, DEPTH, BRANCHING, ITERATIONS, SEED, seed_sample=args.seed_sample)
    ours_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    f_leaf, f_dist = faiss_tree(x, DEPTH, BRANCHING, ITERATIONS, SEED)
    faiss_s.append(time.perf_counter() - t)
    print(f"repeat {rep}: ours {ours_s[-1]:.2f} s (iterations per level {fit.iterations_run}), "
          f"faiss {faiss_s[-1]:.2f} s")
  ours_inertia = float(fit.leaf_dist.astype(np.float64).sum())
  faiss_inertia = float(f_dist.astype(np.float64).sum())
  inertia_ratio = ours_inertia / faiss_inertia
  print(f"leaf inertia: ours {ours_inertia:.6g}, faiss {faiss_inertia:.6g}; used leaves: ours "
        f"{len(np.unique(fit.leaf))}, faiss {len(np.unique(f_leaf))}")

  # Assignment: our tree descent against exhaustive search over the same leaves.
  queries = np.concatenate([x, x[::-1]])[:max(100_000, args.rows)]
  index = kmeans.TreeIndex(fit.centroids, fit.mean, distance=False)
  index.search(queries)  # compiles the timed shape
  assign_s = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    leaf, _ = index.search(queries)
    assign_s.append(time.perf_counter() - t)
  assign_per_s = len(queries) / min(assign_s)
  leaves = np.ascontiguousarray(fit.centroids[-1].reshape(-1, DIM))
  flat = faiss.IndexFlatL2(DIM)
  flat.add(leaves)
  nq = 4096
  t = time.perf_counter()
  _, flat_leaf = flat.search(queries[:nq], 1)
  flat_per_s = nq / (time.perf_counter() - t)
  agree = float(np.mean(leaf[:nq] == flat_leaf[:, 0]))
  print(f"assignment: ours {assign_per_s:,.0f} vectors/s, faiss IndexFlatL2 {flat_per_s:,.0f} "
        f"vectors/s; tree leaf == nearest leaf for {agree:.3f} of queries")

  rss = "skipped(--nofit_1m)"
  if args.fit_1m:
    rss = f"{fit_1m(args.rows_1m, args.chunk):.3f}"
  ours_best, faiss_best = min(ours_s), min(faiss_s)
  print(f"BENCH kmeans: ours_s={ours_best:.2f} faiss_s={faiss_best:.2f} "
        f"inertia_ratio={inertia_ratio:.4f} assign_per_s={assign_per_s:.0f} "
        f"assign_vs_flat={assign_per_s / flat_per_s:.1f} fit_1m_rss_anon_gb={rss} "
        f"ratio={ours_best / faiss_best:.3f}")


if __name__ == "__main__":
  main()
