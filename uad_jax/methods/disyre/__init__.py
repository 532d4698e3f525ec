"""DISYRE: restoration of synthetic anomalies of graded severity, scored by sliding-window
one-step restorations under several severity conditionings (spec `methods/disyre.md`).

`method.py` (the method: training step, feed, scoring, `METHOD`), `augment.py` (spatial and
intensity augmentation), `anomaly.py` (the 'dag' synthetic anomaly: shapes, foreign-patch
texture, intensity bias), `severity.py` (severity -> label schedule), `sliding_window.py`
(window layout, extraction and Gaussian-weighted folding), `codebook.py` (k-means intensity
codebook, the prepared artefact).
"""
