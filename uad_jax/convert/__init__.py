"""Converters from the PyTorch reference layout (NCHW state_dicts) to Flax params."""
