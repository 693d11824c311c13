"""Generation: batched autoregressive sampling, the text-to-image pipeline, CLIP reranking, image grids."""
