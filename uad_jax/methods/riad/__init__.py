"""RIAD: reconstruction by inpainting of random cell partitions (spec `methods/riad.md`).

`method.py` (network, losses, train step, scoring, `METHOD`), `masks.py` (partition masks).
"""
