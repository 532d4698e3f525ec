"""uad_jax: unsupervised anomaly detection in brain MRI with JAX/Flax (UAD-IMAG methods)."""

__version__ = "0.1.0"
