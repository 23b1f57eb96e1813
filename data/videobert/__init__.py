"""The videobert TFDS dataset: one record per video of a user's corpus (see README.md)."""
