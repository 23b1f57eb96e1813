"""Scripts that launch vbert_jax on Cloud TPU VMs (run from the repository root)."""
