"""Train-step benchmark: our jitted VideoBERT step against transformers' BertForPreTraining.

Both sides run forward + backward + AdamW on the same generated batch, in train mode (dropout
on), f32, with 2 threads each, alternating rounds in one process. The shape is the `small`
variant: 4 layers, hidden 512, 8 heads, MLP 2048, sequence 128, batch 16, a joint vocabulary of
30522 text + 20736 visual tokens. The peer's vocabulary is our padded joint table
(30592 + 20736 = 51328 rows) so that both embedding tables have the same shape.

Contenders:
  ours       the `Trainer`'s own jitted step, as `vbert_jax.main` runs it (configs/pretrain.py
             at this shape: schedule, clipping, AdamW with the weight-decay mask, sharding
             constraints, state donated, dropout keys from `config.prng_impl`); the MLM / MVM
             heads run only at the gathered prediction slots, each over its own part of the
             vocabulary.
  peer       BertForPreTraining as normally used: logits over the joint vocabulary at every
             position, loss from `labels` / `next_sentence_label`; torch's fused AdamW.
  peer_same  the same peer at our positions: its `bert`, then its `cls` on the states gathered
             at our prediction slots (its head still scores the whole joint vocabulary there).

Reported: tokens/s of each (batch x sequence / median step time), `ratio` = ours / peer,
`same_work_ratio` = ours / peer_same, and `mfu` = our model FLOP/s over the peak f32 matmul
rate measured in this run (best of 5 runs of a 2048^3 matmul, the higher of jax and torch);
model FLOPs from `vbert_jax.flops` (heads counted at the real prediction slots only). The table
also gives CPU time per step, which moves far less than the wall clock when other processes
share the machine.

    python bench/train_step.py                    # the benchmark (2-6 minutes on 2 cores)
    python bench/train_step.py --demo             # one round, with what each number means
    python bench/train_step.py --profile /tmp/p   # also: where our step's time goes
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

common.setup(threads=2)

from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from vbert_jax import cli, flops, masking, sequence  # noqa: E402
from vbert_jax import model as model_lib  # noqa: E402

LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01
RATE = 0.15
PEAK_N, PEAK_RUNS = 2048, 5


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_bool("demo", False, "one round (1-2 minutes on an idle 2-core machine) that says "
                    "what each number means", flag_values=fv)
  flags.DEFINE_string("variant", "small", "model variant", flag_values=fv)
  flags.DEFINE_integer("batch", 16, "sequences per step", flag_values=fv)
  flags.DEFINE_integer("seq", 128, "sequence length", flag_values=fv)
  flags.DEFINE_integer("rounds", None, "alternating rounds (default 5; 1 with --demo)",
                       flag_values=fv)
  flags.DEFINE_integer("steps", 1, "steps per round", flag_values=fv)
  flags.DEFINE_enum("prng", "threefry2x32", ("threefry2x32", "rbg", "unsafe_rbg"),
                    "config.prng_impl of our dropout masks", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "seed of the batch and both models", flag_values=fv)
  flags.DEFINE_integer("sharded_steps", 3, "steps of the sharded trainer on 8 fake CPU devices, "
                       "in a child process (0: skip)", flag_values=fv)
  flags.DEFINE_bool("sharded_child", False, "internal: be that child process", flag_values=fv)
  flags.DEFINE_string("profile", None, "DIR: also trace 2 of our steps into DIR and print where "
                      "their time goes", flag_values=fv)


def parse_args(argv=None):
  args = cli.parse(define_flags, argv, __doc__)
  if args.rounds is None:
    args.rounds = 1 if args.demo else 5
  return args


# ----------------------------------------------------------------------------------------------
# The generated batch: video-text pairs, half of them LVA negatives, masked as in training.


def make_batch(vocab: sequence.JointVocab, batch_size: int, seq_len: int, seed: int
               ) -> tuple[dict[str, np.ndarray], int, int]:
  """Pairs filling the sequence (text 25-40% of it); returns (batch, Pt, Pv)."""
  rng = np.random.default_rng(seed)
  layout = sequence.Layout(vocab, seq_len)
  budget = seq_len - 3
  max_text = int(0.4 * budget)
  # Slots for 15% of the longest text and video a sequence can hold here.
  pt = int(np.ceil(RATE * max_text))
  pv = int(np.ceil(RATE * (budget - int(0.25 * budget))))
  text_pool = np.setdiff1d(np.arange(vocab.text_size), vocab.specials.as_array())
  packed = []
  for _ in range(batch_size):
    n_text = int(rng.integers(int(0.25 * budget), max_text + 1))
    text = rng.choice(text_pool, n_text).tolist()
    video = rng.integers(0, vocab.visual_size, budget - n_text).tolist()
    packed.append(layout.pair(text, video))
  batch = sequence.stack(packed)
  batch.update(masking.mask_batch(rng, batch["input_ids"], vocab, pt, pv, RATE))
  batch["lva_label"] = (np.arange(batch_size) % 2 == 0).astype(np.int32)
  batch["lva_weight"] = np.ones(batch_size, np.float32)
  return batch, pt, pv


# ----------------------------------------------------------------------------------------------
# Ours.


def make_config(args, cfg: model_lib.VideoBERTConfig, pt: int, pv: int, mesh=(1, 1, 1)):
  """configs/pretrain.py at the benchmark's shape: one example per row, dropout 0.1 (the
  paper's), AdamW at LEARNING_RATE with BERT's weight decay, mask and clipping."""
  config = common.pretrain_configs().get_config(f"variant={args.variant}")
  with config.unlocked():
    config.batch_size, config.max_len = args.batch, args.seq
    config.input.pack_examples = 1  # make_batch's rows: one example each
    config.model.max_position_embeddings = cfg.max_position_embeddings
    config.masking.max_predictions_text, config.masking.max_predictions_video = pt, pv
    config.optimizer.learning_rate, config.optimizer.warmup_steps = LEARNING_RATE, 0
    config.optimizer.weight_decay = WEIGHT_DECAY
    config.prng_impl = args.prng
    config.seed = args.seed
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    config.compilation_cache_dir = ""
  return config


def make_ours(config, batch: dict[str, np.ndarray]):
  """A (step, sync) pair running the `Trainer`'s own jitted step (the one `vbert_jax.main`
  runs: schedule, clipping, weight-decay mask, sharding constraints, state donated)."""
  from vbert_jax import pretrain as pretrain_lib  # pylint: disable=g-import-not-at-top
  from vbert_jax import train  # pylint: disable=g-import-not-at-top
  trainer = train.Trainer(pretrain_lib.make_trainable(config), config)
  holder = {"state": trainer.init_state()}
  device_batch = trainer.put_batch(batch)

  def step():
    holder["state"], sums = trainer.train_step(holder["state"], device_batch)
    return sums["loss"]

  def compiled_text() -> str:
    return trainer.lower_train_step().compile().as_text()

  return step, lambda loss: float(loss), compiled_text


# ----------------------------------------------------------------------------------------------
# The peer: transformers' BertForPreTraining of the same shape.


def make_peer(cfg: model_lib.VideoBERTConfig, batch: dict[str, np.ndarray], seed: int,
              same_work: bool, device: str = "cpu", bf16: bool = False):
  """A (step, sync) pair for BertForPreTraining, normal use or heads at our slots only
  (`bf16`: the forward pass under torch.autocast in bfloat16)."""
  torch.manual_seed(seed)
  bert_cfg = transformers.BertConfig(
      vocab_size=cfg.vocab.total_size, hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.mlp_dim, max_position_embeddings=cfg.max_position_embeddings,
      type_vocab_size=cfg.type_vocab_size, hidden_dropout_prob=cfg.dropout_rate,
      attention_probs_dropout_prob=cfg.attention_dropout_rate, hidden_act="gelu")
  peer = transformers.BertForPreTraining(bert_cfg).train().to(device)
  # The fused CPU kernel: torch's default (for-loop) AdamW takes 13x the CPU time here.
  opt = torch.optim.AdamW(peer.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                          fused=True)
  vocab = cfg.vocab
  t = {k: torch.from_numpy(np.asarray(v)).long().to(device) for k, v in batch.items()
       if k in ("input_ids", "segment_ids", "position_ids", "input_mask")}
  # Joint-id targets at our slots (-100 = padding slot, ignored), and NSP's "is next" = 0.
  slot_pos = np.concatenate([batch["mlm_positions"], batch["mvm_positions"]], 1)
  slot_ids = np.concatenate([batch["mlm_ids"], batch["mvm_ids"] + vocab.visual_offset], 1)
  slot_w = np.concatenate([batch["mlm_weights"], batch["mvm_weights"]], 1)
  slot_labels = torch.from_numpy(np.where(slot_w > 0, slot_ids, -100)).long().to(device)
  slot_pos_t = torch.from_numpy(slot_pos).long().to(device)
  full_labels = torch.full(t["input_ids"].shape, -100, dtype=torch.long, device=device)
  rows = np.repeat(np.arange(slot_pos.shape[0]), slot_pos.shape[1])
  keep = slot_w.reshape(-1) > 0
  full_labels[rows[keep], slot_pos.reshape(-1)[keep]] = torch.from_numpy(
      slot_ids.reshape(-1)[keep]).long().to(device)
  nsp = torch.from_numpy(1 - batch["lva_label"]).long().to(device)
  kwargs = dict(input_ids=t["input_ids"], attention_mask=t["input_mask"],
                token_type_ids=t["segment_ids"], position_ids=t["position_ids"])
  ce = torch.nn.CrossEntropyLoss(ignore_index=-100)

  def loss_full():
    return peer(**kwargs, labels=full_labels, next_sentence_label=nsp).loss

  def loss_same():
    hidden, pooled = peer.bert(**kwargs, return_dict=False)[:2]
    index = slot_pos_t[..., None].expand(-1, -1, hidden.shape[-1])
    scores, relationship = peer.cls(torch.gather(hidden, 1, index), pooled)
    return (ce(scores.reshape(-1, scores.shape[-1]), slot_labels.reshape(-1))
            + ce(relationship, nsp))

  loss_fn = loss_same if same_work else loss_full

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
      loss = loss_fn()
    loss.backward()
    opt.step()
    return loss

  return step, lambda loss: float(loss.detach())


# ----------------------------------------------------------------------------------------------


def sharded_child(args) -> None:
  """The same step through the project's trainer on a data=2 x fsdp=2 x tensor=2 mesh."""
  import json  # pylint: disable=g-import-not-at-top
  import resource  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  cfg = model_lib.VideoBERTConfig.from_variant(args.variant,
                                               max_position_embeddings=max(512, args.seq))
  batch, pt, pv = make_batch(cfg.vocab, args.batch, args.seq, args.seed)
  step, sync, _ = make_ours(make_config(args, cfg, pt, pv, mesh=(2, 2, 2)), batch)
  sync(step())  # compile
  start = time.perf_counter()
  for _ in range(args.sharded_steps):
    loss = step()
  sync(loss)
  seconds = (time.perf_counter() - start) / args.sharded_steps
  print(json.dumps({"devices": jax.device_count(), "seconds_per_step": seconds,
                    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def run_sharded(args) -> dict:
  """Runs `sharded_child` with 8 fake devices (they must be set before jax starts)."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.abspath(__file__), "--sharded_child", "--variant", args.variant,
         "--batch", str(args.batch), "--seq", str(args.seq), "--seed", str(args.seed),
         "--sharded_steps", str(args.sharded_steps), "--prng", args.prng]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"sharded step failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.sharded_child:
    sharded_child(args)
    return
  cfg = model_lib.VideoBERTConfig.from_variant(args.variant,
                                               max_position_embeddings=max(512, args.seq))
  batch, pt, pv = make_batch(cfg.vocab, args.batch, args.seq, args.seed)
  tokens = args.batch * args.seq
  if args.demo:
    print(f"VideoBERT '{args.variant}' ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads} heads, MLP {cfg.mlp_dim}), joint vocabulary "
          f"{cfg.text_vocab_size} text + {cfg.visual_vocab_size} visual tokens.")
    print(f"One training step = forward + backward + AdamW on {args.batch} video-text pairs of "
          f"{args.seq} tokens, 15% masked ({int(batch['mlm_weights'].sum())} text and "
          f"{int(batch['mvm_weights'].sum())} visual predictions).\n")

  ours_step, ours_sync, ours_hlo = make_ours(make_config(args, cfg, pt, pv), batch)
  peer_step, peer_sync = make_peer(cfg, batch, args.seed, same_work=False)
  same_step, same_sync = make_peer(cfg, batch, args.seed, same_work=True)
  contenders = {"ours": (ours_step, ours_sync), "peer": (peer_step, peer_sync),
                "peer_same": (same_step, same_sync)}
  losses = {name: sync(step()) for name, (step, sync) in contenders.items()}  # warm-up, compile
  if args.demo:
    print("first-step losses: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))

  def on_round(r, seconds):
    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
        f"{k} {seconds[k].wall:.2f} s/step" for k in contenders), flush=True)
  # The peak matmul runs once per round, beside the steps; best of 5 runs in all.
  matmuls = common.matmul_contenders(PEAK_N)
  times = common.alternate({**contenders, **matmuls}, args.rounds, args.steps, on_round)
  if args.rounds < PEAK_RUNS:
    extra = common.alternate(matmuls, PEAK_RUNS - args.rounds, 1)
    for name in matmuls:
      times[name] += extra[name]
  peak = common.peak_from_times({k: times[k][:PEAK_RUNS] for k in matmuls}, PEAK_N)
  med = {k: common.median(times[k]) for k in contenders}
  step_flops = flops.flops_per_step(cfg, args.batch, args.seq,
                                    mlm_slots=float(batch["mlm_weights"].sum()),
                                    mvm_slots=float(batch["mvm_weights"].sum()),
                                    lva_examples=float(batch["lva_weight"].sum()))
  if args.profile:
    print(common.profile_breakdown(args.profile, ours_step, ours_sync, ours_hlo()))
  sharded = run_sharded(args) if args.sharded_steps else None
  report(args, cfg, med, peak, step_flops, tokens, sharded)


def report(args, cfg, med, peak, step_flops, tokens, sharded=None) -> None:
  """The table, the FLOP accounting, and the BENCH line (last)."""
  tps = {name: tokens / t.wall for name, t in med.items()}
  rows = [(name, f"{t.wall:.3f}", f"{tps[name]:.0f}", f"{t.cpu:.3f}",
           f"{t.wall / med['ours'].wall:.3f}", f"{t.cpu / med['ours'].cpu:.3f}")
          for name, t in med.items()]
  print()
  print(common.table(rows, ("contender", "wall s/step", "tokens/s", "cpu s/step",
                            "ours faster x (wall)", "ours faster x (cpu)")))
  mfu = flops.mfu(step_flops.total, med["ours"].wall, peak["peak"])
  mfu_cpu = step_flops.total / med["ours"].cpu / peak["peak_cpu"]
  print(f"\nmodel FLOPs/step {step_flops.total / 1e9:.1f} G (encoder "
        f"{step_flops.encoder / 1e9:.1f}, MLM {step_flops.mlm / 1e9:.1f}, MVM "
        f"{step_flops.mvm / 1e9:.1f}, LVA {step_flops.lva / 1e9:.3f}); ours "
        f"{step_flops.total / med['ours'].wall / 1e9:.1f} GFLOP/s")
  print(f"peak f32 matmul (2048^3, best of 5): jax {peak['jax'] / 1e9:.1f} GFLOP/s, torch "
        f"{peak['torch'] / 1e9:.1f} GFLOP/s; mfu {mfu:.3f} (on CPU time: {mfu_cpu:.3f})")
  if args.demo:
    print("\nratio: ours over the peer as normally used (logits at every position);\n"
          "same_work_ratio: ours over the peer scoring only our prediction slots;\n"
          "mfu: our model FLOP/s over the measured peak matmul rate. The CPU-time columns\n"
          "divide out load from other processes; wall-clock figures on a busy machine are noisy.")
  extra = {}
  if sharded:
    extra = dict(sharded_tokens_per_s=round(tokens / sharded["seconds_per_step"], 1),
                 sharded_peak_rss_gb=round(sharded["peak_rss_gb"], 2))
    print(f"\nsharded trainer (data=2 x fsdp=2 x tensor=2 over {sharded['devices']} fake CPU "
          f"devices): {sharded['seconds_per_step']:.3f} s/step, host peak memory "
          f"{sharded['peak_rss_gb']:.2f} GB")
  print(common.bench_line("train_step", ours_tokens_per_s=round(tps["ours"], 1),
                          peer_tokens_per_s=round(tps["peer"], 1),
                          same_work_ratio=round(tps["ours"] / tps["peer_same"], 3),
                          mfu=round(mfu, 3), **extra, ratio=round(tps["ours"] / tps["peer"], 3)))


if __name__ == "__main__":
  main()
