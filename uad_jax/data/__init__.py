"""Data layer: NIfTI volumes, split CSVs, LMDB slice databases, grain and evaluation loaders."""

from uad_jax.data.lmdb_source import SliceDataSource
from uad_jax.data.lmdb_writer import write_slice_database
from uad_jax.data.pipeline import TrainIterator, make_train_iterator
from uad_jax.data.splits import SubjectRecord, read_participants, read_split, write_split
from uad_jax.data.volume_loader import EvalVolume, iterate_volumes, load_eval_volume
from uad_jax.data.volumes import (center_crop_pad, load_mask, load_volume, mask_path_for,
                                  normalise_min_max)

__all__ = [
    "EvalVolume",
    "SliceDataSource",
    "SubjectRecord",
    "TrainIterator",
    "center_crop_pad",
    "iterate_volumes",
    "load_eval_volume",
    "load_mask",
    "load_volume",
    "make_train_iterator",
    "mask_path_for",
    "normalise_min_max",
    "read_participants",
    "read_split",
    "write_slice_database",
    "write_split",
]
