"""Train-step throughput and MFU on one GPU: our jitted step against transformers'
BertForPreTraining, in bfloat16, in one process.

The `base` variant (12 layers, hidden 768, 12 heads, MLP 3072) at sequence 512, batch 32, with
the joint vocabulary of bench/train_step.py (30522 text + 20736 visual tokens), dropout on,
AdamW, on the same generated batch (that benchmark's `make_batch`, `make_ours`, `make_peer`),
alternating rounds.

Contenders (ours: the `Trainer`'s own step, as `vbert_jax.main` runs it):
  ours        bf16 compute, f32 parameters; attention by XLA, with attention dropout 0.1;
              dropout keys from threefry2x32 (the default: the same on any mesh)
  ours_rbg    the same with config.prng_impl="rbg" (faster bits, which depend on the sharding)
  ours_no_attn_dropout  the same without attention dropout (XLA's dot_product_attention)
  ours_cudnn  the same with attention_impl="cudnn" (jax.nn.dot_product_attention's fused cuDNN
              kernel), also without attention dropout, which that kernel's path in model.py skips
  peer        BertForPreTraining as normally used (logits over the joint vocabulary at every
              position), torch.autocast bf16, torch's scaled-dot-product attention, fused AdamW
  peer_same   its heads at our prediction slots only

Ablations (named with --contenders, not run by default), to see where our step's time goes:
  ours_no_dropout        no dropout at all (no random masks)
  ours_cudnn_no_dropout  the cuDNN attention kernel, no dropout at all
  ours_bf16_params       bf16 parameters (no f32-to-bf16 casts of the weights at every use)

Reported: tokens/s and milliseconds per step, `ratio` = ours / peer, and MFU = model FLOPs
(`vbert_jax.flops`, heads at the real prediction slots) over the device's dense bf16 peak
(`flops.peak_flops`). It needs a CUDA GPU with jax's CUDA plugin and torch; no test runs it.

    python bench/train_step_gpu.py [--variant=base] [--batch=32] [--seq=512] [--rounds=5] \
        [--contenders=ours,ours_cudnn,peer,ours_no_dropout]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cuda")  # before bench.common's CPU default
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402
from bench import train_step as ts  # noqa: E402

from absl import flags  # noqa: E402
import jax  # noqa: E402
import torch  # noqa: E402

from vbert_jax import cli  # noqa: E402
from vbert_jax import flops  # noqa: E402
from vbert_jax import model as model_lib  # noqa: E402


DEFAULT_CONTENDERS = ("ours", "ours_rbg", "ours_no_attn_dropout", "ours_cudnn", "peer",
                      "peer_same")


def contenders(args, batch):
  shape = dict(max_position_embeddings=max(512, args.seq), dtype="bfloat16")
  cfg = model_lib.VideoBERTConfig.from_variant(args.variant, **shape)

  def ours(prng: str = "threefry2x32", **overrides):
    """The Trainer's step on configs/pretrain.py at this shape, bf16, with `overrides` of
    config.model."""
    def make():
      run = argparse.Namespace(**{**vars(args), "prng": prng})
      config = ts.make_config(run, cfg, batch["mlm_weights"].shape[1],
                              batch["mvm_weights"].shape[1])
      with config.unlocked():
        for key, value in {"dtype": "bfloat16", **overrides}.items():
          config.model[key] = value
      return ts.make_ours(config, batch)[:2]
    return make

  no_dropout = dict(dropout_rate=0.0, attention_dropout_rate=0.0)
  makers = {
      "ours": ours(),
      "ours_no_attn_dropout": ours(attention_dropout_rate=0.0),
      "ours_rbg": ours("rbg"),
      "ours_cudnn": ours(attention_impl="cudnn", attention_dropout_rate=0.0),
      "peer": lambda: ts.make_peer(cfg, batch, args.seed, False, device="cuda", bf16=True),
      "peer_same": lambda: ts.make_peer(cfg, batch, args.seed, True, device="cuda", bf16=True),
      "ours_no_dropout": ours(**no_dropout),
      "ours_cudnn_no_dropout": ours(attention_impl="cudnn", **no_dropout),
      "ours_bf16_params": ours(param_dtype="bfloat16"),
  }
  unknown = sorted(set(args.contenders) - set(makers))
  if unknown:
    raise SystemExit(f"--contenders: unknown {unknown}; expected some of {sorted(makers)}")
  out, failed = {}, {}
  for name in args.contenders:
    make = makers[name]
    try:
      step, sync = make()
      for _ in range(2):  # compile, then one warm step
        sync(step())
      out[name] = (step, sync)
    except Exception as e:  # pylint: disable=broad-except
      failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      print(f"{name}: could not run ({failed[name]})", flush=True)
  return cfg, out, failed


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("variant", "base", "model variant", flag_values=fv)
  flags.DEFINE_integer("batch", 32, "sequences per step", flag_values=fv)
  flags.DEFINE_integer("seq", 512, "sequence length", flag_values=fv)
  flags.DEFINE_integer("rounds", 5, "alternating rounds", flag_values=fv)
  flags.DEFINE_integer("steps", 5, "steps per round", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "seed of the batch and the models", flag_values=fv)
  flags.DEFINE_list("contenders", list(DEFAULT_CONTENDERS), "comma-separated, from the list "
                    "above", flag_values=fv)


def parse_args(argv=None):
  args = cli.parse(define_flags, argv, __doc__)
  # An empty item (a trailing comma) names no contender.
  args.contenders = [name for name in args.contenders if name]
  return args


def main() -> None:
  args = parse_args()
  if jax.default_backend() != "gpu" or not torch.cuda.is_available():
    raise SystemExit(f"needs a CUDA GPU for both jax (backend: {jax.default_backend()}) and "
                     f"torch (cuda available: {torch.cuda.is_available()})")
  vocab = model_lib.VideoBERTConfig.from_variant(args.variant).vocab
  batch, _, _ = ts.make_batch(vocab, args.batch, args.seq, args.seed)
  cfg, runs, failed = contenders(args, batch)
  times = common.alternate(runs, args.rounds, args.steps)
  med = {name: common.median(t).wall for name, t in times.items()}
  tokens = args.batch * args.seq
  step_flops = flops.flops_per_step(cfg, args.batch, args.seq, float(batch["mlm_weights"].sum()),
                                    float(batch["mvm_weights"].sum())).total
  kind = jax.devices()[0].device_kind
  peak = flops.peak_flops(kind)
  rows = [(name, f"{sec * 1e3:.1f}", f"{tokens / sec:,.0f}",
           f"{flops.mfu(step_flops, sec, peak):.3f}" if peak else "?") for name, sec in med.items()]
  print(common.table(rows, ("contender", "ms/step", "tokens/s", "MFU (our model FLOPs)")))
  print(f"{args.variant}, batch {args.batch} x seq {args.seq}, bf16; {kind}, dense bf16 peak "
        f"{(peak or 0) / 1e12:.0f} TFLOP/s; model {step_flops / 1e12:.2f} TFLOP per step; "
        f"jax {jax.__version__}, torch {torch.__version__}")
  for name, why in failed.items():
    print(f"not run: {name}: {why}")
  value = lambda name, f: f(med[name]) if name in med else float("nan")
  print(common.bench_line(
      "train_step_gpu",
      ours_tokens_per_s=value("ours", lambda s: tokens / s),
      cudnn_tokens_per_s=value("ours_cudnn", lambda s: tokens / s),
      peer_tokens_per_s=value("peer", lambda s: tokens / s),
      mfu=value("ours", lambda s: flops.mfu(step_flops, s, peak) if peak else float("nan")),
      mfu_cudnn=value("ours_cudnn",
                      lambda s: flops.mfu(step_flops, s, peak) if peak else float("nan")),
      ratio=value("ours", lambda s: med["peer"] / s if "peer" in med else float("nan"))))


if __name__ == "__main__":
  main()
