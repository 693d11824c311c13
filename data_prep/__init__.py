"""Offline data jobs: corpus generation, sharding, tokenizer training, image tokenization."""
