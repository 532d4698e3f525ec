"""IterMask: iterative spatial and frequency masking (spec `methods/itermask.md`).

`method.py` (networks, training stages, calibration, scoring, `METHOD`), `condition.py` (the
high-frequency condition), `masks.py` (the AE's random training masks), `scoring.py` (the
iterative mask-shrinking loop).
"""
