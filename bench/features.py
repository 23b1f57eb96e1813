"""Feature extraction speed: our jitted S3D against torchvision's S3D, and our clip reader against PyAV.

S3D: the same random network (torchvision's, converted) on the same uint8 clips (30 frames, batch 4,
2 threads each), at 224 and 112 pixels, timed alternately in one process; normalisation is
included on both sides. Decoding: a generated 60 fps 1080p H.264 file, read by `read_clips`
(20 fps, 224-pixel clips) and by PyAV's plain decoding loop over every frame with the same
threading and no conversion (what any reader of the file must pay); both report seconds of video
per second of wall time.

Decode workers: `--decode_copies` copies of that file decoded into 224-pixel clips by the
extractor's worker pool (vbert_jax.video.decode_pool, as `extract --decode_workers=N` runs it,
without S3D) with 1 and with 2 single-threaded workers, each clip copied out of shared memory
into a batch buffer as the extractor does; the clock starts once the workers are up. For
comparison, the same files in one process with FFmpeg's own threads (thread_type AUTO): our
reader (`--decode_workers=0`) and PyAV's plain loop. `decode_scaling` is 2 workers' throughput
over 1 worker's. `--skip_s3d` runs only the decoding parts.

    python bench/features.py [--reps=3] [--sizes=224,112] [--skip_decode] [--skip_s3d]
        [--skip_workers] [--decode_copies=4]

Last line: BENCH features: ours_clips_per_s=... peer_clips_per_s=... ratio_112=... decode_ratio=...
decode_scaling=... workers2_vs_pyav_threads=... ratio=...
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
THREADS = 2
# XLA's CPU client sizes its thread pool from the CPUs this process may use: pinning the process
# to two CPUs (before jax starts) gives both sides the same two threads on any machine.
if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > THREADS:
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:THREADS])

import torch  # noqa: E402  (torch before anything that may import tensorflow)
import torchvision  # noqa: E402
import av  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from absl import flags  # noqa: E402

from vbert_jax import cli  # noqa: E402
from vbert_jax.video import convert_s3d, s3d  # noqa: E402

BATCH = 4
FRAMES = 30


def torch_model(seed: int = 0) -> torch.nn.Module:
  """torchvision's S3D with He-initialised convolutions, so activations keep a realistic scale."""
  torch.manual_seed(seed)
  model = torchvision.models.video.s3d().eval()
  for module in model.modules():
    if isinstance(module, torch.nn.Conv3d):
      torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
  return model


def torch_features(model: torch.nn.Module, clips_uint8: np.ndarray) -> np.ndarray:
  """torchvision's pre-classifier features, with its video normalisation, for [B,T,H,W,3] uint8."""
  with torch.inference_mode():
    x = torch.from_numpy(clips_uint8).permute(0, 4, 1, 2, 3).float().div_(255)
    mean = torch.tensor(s3d.MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(s3d.STD).view(1, 3, 1, 1, 1)
    y = model.features((x - mean) / std)
    if s3d.pooling_mode(*clips_uint8.shape[1:4]) == s3d.POOL_AVG:
      y = model.avgpool(y)
    return y.mean((2, 3, 4)).numpy()


def bench_s3d(model: torch.nn.Module, variables, size: int, reps: int) -> tuple[float, float]:
  """(ours, torchvision) clips per second at one image size."""
  rng = np.random.default_rng(size)
  clips = rng.integers(0, 256, (BATCH, FRAMES, size, size, 3), dtype=np.uint8)
  apply = jax.jit(lambda v, x: s3d.S3D().apply(v, s3d.normalize(x)))
  variables = jax.device_put(variables)
  ours = np.asarray(apply(variables, clips))  # compile + warm up
  peer = torch_features(model, clips)
  err = float(np.abs(ours - peer).max())
  times = {"ours": [], "peer": []}
  for _ in range(reps):
    t0 = time.perf_counter()
    apply(variables, clips).block_until_ready()
    times["ours"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    torch_features(model, clips)
    times["peer"].append(time.perf_counter() - t0)
  ours_cps, peer_cps = (BATCH / min(times[k]) for k in ("ours", "peer"))
  print(f"s3d {size}px batch {BATCH}x{FRAMES}: ours {ours_cps:.3f} clips/s, torchvision "
        f"{peer_cps:.3f} clips/s, ratio {ours_cps / peer_cps:.3f} (max abs diff {err:.2e}; "
        f"per-batch s ours {['%.2f' % t for t in times['ours']]} peer "
        f"{['%.2f' % t for t in times['peer']]})", flush=True)
  return ours_cps, peer_cps


def make_video(path: pathlib.Path, seconds: float = 6.0, fps: int = 60,
               width: int = 1920, height: int = 1080) -> None:
  """H.264 1080p60: gradients that pan and drift plus changing noise, so every frame is new work."""
  rng = np.random.default_rng(0)
  margin = 4 * int(seconds * fps)
  yy, xx = np.mgrid[0:height + margin, 0:width + margin].astype(np.float32)
  canvas = np.stack([127 + 120 * np.sin(xx / 97.0), 127 + 120 * np.sin(yy / 61.0),
                     127 + 120 * np.sin((xx + yy) / 143.0)], -1).astype(np.uint8)
  noise = rng.integers(0, 24, (7, height, width, 3), dtype=np.uint8)
  with av.open(str(path), "w") as out:
    stream = out.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"preset": "ultrafast", "crf": "23"}
    for i in range(int(seconds * fps)):
      img = canvas[2 * i:2 * i + height, 4 * i:4 * i + width] + noise[i % len(noise)]
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


def pyav_decode(path: pathlib.Path) -> float:
  """Seconds of video in `path`, decoding every frame with PyAV's plain loop (the same threading
  as the reader, no conversion): the floor that any reader of the file pays."""
  with av.open(str(path)) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    last = None
    for frame in container.decode(stream):
      last = frame
    return float(last.time) + float(last.duration * last.time_base)


def bench_decode(path: pathlib.Path, reps: int) -> float:
  """ours / PyAV seconds of video decoded per second."""
  from vbert_jax.video import reader
  times = {"ours": [], "peer": []}
  duration, clips = {}, []
  for _ in range(reps):
    t0 = time.perf_counter()
    clips = list(reader.read_clips(path))
    times["ours"].append(time.perf_counter() - t0)
    duration["ours"] = clips[-1].end if clips else 0.0
    t0 = time.perf_counter()
    duration["peer"] = pyav_decode(path)
    times["peer"].append(time.perf_counter() - t0)
  # Both read the whole file; the peer's duration (every frame) is the video's length.
  ours_vps, peer_vps = (duration["peer"] / min(times[k]) for k in ("ours", "peer"))
  print(f"decode 1080p60 H.264 ({duration['peer']:.2f}s; {len(clips)} clips to "
        f"{duration['ours']:.2f}s): ours "
        f"{ours_vps:.2f} video-s/s, PyAV {peer_vps:.2f} video-s/s, ratio {ours_vps / peer_vps:.3f}",
        flush=True)
  return ours_vps / peer_vps


def _copy_out(clips, batch: np.ndarray) -> int:
  """Copies every clip into a batch buffer, as the extractor's batch thread does; the count."""
  n = 0
  for clip in clips:
    batch[n % len(batch)] = clip.frames
    n += 1
  return n


def _time_pool(paths, workers: int, batch: np.ndarray) -> tuple[float, int]:
  from vbert_jax.video import decode_pool, extract
  settings = decode_pool.Settings(extract.FPS, extract.CLIP_FRAMES, batch.shape[2])
  with decode_pool.DecodePool(paths, workers=workers, slots=extract.DECODE_SLOTS,
                              settings=settings) as pool:
    pool.wait_ready()  # spawned workers import this script (torch, jax): not decoding time
    t0 = time.perf_counter()
    n = sum(_copy_out(pool.clips(i), batch) for i in range(len(paths)))
    return time.perf_counter() - t0, n


def _time_in_process(paths, batch: np.ndarray) -> tuple[float, int]:
  from vbert_jax.video import reader
  t0 = time.perf_counter()
  n = sum(_copy_out(reader.read_clips(p, size=batch.shape[2]), batch) for p in paths)
  return time.perf_counter() - t0, n


def _time_pyav(paths) -> tuple[float, int]:
  t0 = time.perf_counter()
  for p in paths:
    pyav_decode(p)
  return time.perf_counter() - t0, 0


def bench_decode_workers(path: pathlib.Path, copies: int, reps: int) -> tuple[float, float]:
  """(2 workers / 1 worker, 2 workers / PyAV with FFmpeg threads), in seconds of video per
  second, over `copies` hard links of `path`; contenders alternate within each round."""
  paths = []
  for i in range(copies):
    paths.append(path.with_name(f"copy{i}_{path.name}"))
    os.link(path, paths[-1])
  seconds = copies * pyav_decode(path)
  batch = np.empty((32, FRAMES, 224, 224, 3), np.uint8)
  contenders = {
      "1 worker": lambda: _time_pool(paths, 1, batch),
      "2 workers": lambda: _time_pool(paths, 2, batch),
      "reader, FFmpeg threads": lambda: _time_in_process(paths, batch),
      "PyAV loop, FFmpeg threads": lambda: _time_pyav(paths),
  }
  times = {name: [] for name in contenders}
  clips = {}
  for _ in range(reps):
    for name, run in contenders.items():
      elapsed, clips[name] = run()
      times[name].append(elapsed)
  if len({clips[k] for k in list(contenders)[:3]}) != 1:
    raise RuntimeError(f"the contenders decoded different numbers of clips: {clips}")
  rate = {name: seconds / min(t) for name, t in times.items()}
  print(f"decode {copies} x 1080p60 H.264 ({seconds:.1f} s of video, {clips['1 worker']} clips "
        f"of 224 px), video-s/s: " + ", ".join(f"{k} {v:.2f}" for k, v in rate.items()) +
        "; per round s: " + ", ".join(f"{k} {['%.2f' % x for x in t]}" for k, t in times.items()),
        flush=True)
  return (rate["2 workers"] / rate["1 worker"],
          rate["2 workers"] / rate["PyAV loop, FFmpeg threads"])


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("reps", 3, "timed repetitions of each side", flag_values=fv)
  flags.DEFINE_bool("skip_decode", False, "skip the decoding benchmark", flag_values=fv)
  flags.DEFINE_bool("skip_s3d", False, "skip the S3D benchmark", flag_values=fv)
  flags.DEFINE_bool("skip_workers", False, "skip the decode workers' benchmark", flag_values=fv)
  flags.DEFINE_integer("decode_copies", 4, "copies of the 1080p file that the decode workers "
                       "share out", flag_values=fv)
  flags.DEFINE_string("sizes", "224,112", "comma-separated crop sizes of the S3D benchmark",
                      flag_values=fv)


def parse_args(argv=None):
  return cli.parse(define_flags, argv, __doc__)


def main() -> None:
  args = parse_args()
  torch.set_num_threads(THREADS)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus), torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads", flush=True)
  model = torch_model()
  variables = convert_s3d.convert_torch_state_dict(model.state_dict())
  sizes = [] if args.skip_s3d else [int(v) for v in args.sizes.split(",")]
  results = {size: bench_s3d(model, variables, size, args.reps) for size in sizes}
  nan = float("nan")
  decode_ratio, scaling, vs_pyav = nan, nan, nan
  if not (args.skip_decode and args.skip_workers):
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / "noise_1080p60.mp4"
      t0 = time.perf_counter()
      make_video(path)
      print(f"generated {path.name} in {time.perf_counter() - t0:.1f}s", flush=True)
      if not args.skip_decode:
        decode_ratio = bench_decode(path, args.reps)
      if not args.skip_workers:
        scaling, vs_pyav = bench_decode_workers(path, args.decode_copies, args.reps)
  ours, peer = results.get(224, (nan,) * 2)
  ratio_112 = np.divide(*results[112]) if 112 in results else nan
  print(f"BENCH features: ours_clips_per_s={ours:.3f} peer_clips_per_s={peer:.3f} "
        f"ratio_112={ratio_112:.3f} decode_ratio={decode_ratio:.3f} decode_scaling={scaling:.3f} "
        f"workers2_vs_pyav_threads={vs_pyav:.3f} ratio={ours / peer:.3f}")


if __name__ == "__main__":
  main()
