"""Evaluation: FID/IS/CLIP score, dVAE reconstruction quality, the shapes corpus scorer."""
