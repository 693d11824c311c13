"""Plain-torch models: the transformer prior, its attention backends and masks, the KV cache, the dVAE and its loss.

Nothing here knows about ranks or DeepSpeed; dalle_ds.parallel wraps these modules."""
