"""Data: rank/worker-aware shard loaders, augmentation, local/S3 storage, the caption tokenizer, shard formats."""
