"""dalle-ds: DALL·E (Ramesh et al. 2021) on DeepSpeed."""

__version__ = "0.1.0"
