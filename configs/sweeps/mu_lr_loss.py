"""Example sweep: two learning rates x two weightings of the video losses, on the `mu` model.

    python -m vbert_jax.sweep --sweep=configs/sweeps/mu_lr_loss.py --workdir=runs/mu_lr_loss \
        -- --config.total_steps=100 --config.eval.every_steps=0

Four runs on a laptop CPU. The loss weights move together (zipit): the paper's equal weighting
against MVM and LVA at half weight, the question being whether the text objective learns faster
when the video objectives pull less. With different weights the total `loss` is not comparable
across runs; compare `mlm_loss`, `mvm_loss` and `lva_loss` (`--metric=mlm_loss`).
"""

CONFIG = "configs/pretrain.py:variant=mu,runlocal"


def get_sweep(h):
  return h.product(
      h.sweep("optimizer.learning_rate", [1e-3, 3e-3]),
      h.zipit(h.sweep("loss.beta", [1.0, 0.5]), h.sweep("loss.gamma", [1.0, 0.5])),
  )
