"""Example sweep: two learning rates x two weightings of the video losses, on the `mu` model.

Command:

    python -m vbert_jax.sweep --sweep=configs/sweeps/mu_lr_loss.py --workdir=runs/mu_lr_loss \
        -- --config.total_steps=100 --config.eval.every_steps=0

Expected result: the four runs one after another, then runs/mu_lr_loss/results.csv and a printed
table of each run's final losses with the lowest total marked. On this project's 2-core Intel Xeon
(Emerald Rapids), 2026-12-06: about a minute in all (12-17 s a run); at step 100 mlm_loss was
3.59 / 3.60 at 1e-3 (equal / half video weights) and 1.76 / 1.72 at 3e-3, lva_loss 0.693 (chance)
in all four. So in 100 steps the learning rate moves the text objective and the weighting barely
does; the table marks 3e-3 with half weights best by total loss, which half weights lower anyway.

Four runs on a laptop CPU. The loss weights move together (zipit): the paper's equal weighting
against MVM and LVA at half weight, the question being whether the text objective learns faster
when the video objectives pull less. With different weights the total `loss` is not comparable
across runs; compare `mlm_loss`, `mvm_loss` and `lva_loss` (`--metric=mlm_loss`).
"""

# The smallest model on generated tokens: the four runs take about a minute of a laptop CPU.
CONFIG = "configs/pretrain.py:variant=mu,runlocal"


def get_sweep(h):
  return h.product(
      # Either side of runlocal's 2e-3.
      h.sweep("optimizer.learning_rate", [1e-3, 3e-3]),
      # The paper's equal weights, and MVM and LVA at half.
      h.zipit(h.sweep("loss.beta", [1.0, 0.5]), h.sweep("loss.gamma", [1.0, 0.5])),
  )
