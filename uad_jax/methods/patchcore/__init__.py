"""PatchCore: frozen ImageNet features, a coreset memory bank, nearest-neighbour scoring.

`method.py` (the method's functions), `features.py` (patch descriptors), `bank.py` (streaming bank
building), `coreset.py` (greedy k-center selection), `knn.py` (exact sharded search).
"""
