"""Experiment configs: one file per method, `get_config(preset)` with presets such as `demo`."""
