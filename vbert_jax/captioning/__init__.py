"""Video captioning on VideoBERT's features: features, the captioner, decoding, metrics, CLIs."""
