"""Reading PyTorch weight files without PyTorch: `.pth`/`.pt`/`.bin`/`.pkl`, `.safetensors`, `.npz`.

A file is read into memory once; its SHA-256 is computed from exactly the bytes that are then
parsed (`read_state_dict` returns it as `meta['sha256']`), so a file cannot be swapped between
hashing and reading. torch.save files go through the restricted reader of
`torch_serialization` (no code in them runs). Every unreadable file is a one-line DataError
naming it.
"""

import hashlib
import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np

from uad_jax.convert import torch_serialization
from uad_jax.errors import DataError

NPZ_META = ("__source_file__", "__source_sha256__")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".pkl")


def read_bytes(path: Path) -> tuple[bytes, str]:
  """(the file's bytes, their hex SHA-256)."""
  path = Path(path)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
  return data, hashlib.sha256(data).hexdigest()


def torch_load(path: Path):
  """What `torch.save` stored in `path` (tensors as numpy arrays); see `torch_serialization`."""
  data, _ = read_bytes(path)
  return torch_serialization.load(data, str(path))


def to_numpy(value) -> np.ndarray:
  """A torch tensor (or array-like) as a numpy array."""
  return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _safetensors(data: bytes, path: Path) -> tuple[dict, dict]:
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
  try:
    # The header (a little-endian u64 length, then JSON) carries the metadata.
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    state = load(data)
  except (SafetensorError, struct.error, ValueError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not a readable .safetensors file ({e})") from e
  meta = header.get("__metadata__") or {}
  return state, {k: meta[k] for k in ("source_file", "source_sha256") if k in meta}


def _npz(data: bytes, path: Path) -> tuple[dict, dict]:
  if data[:4] != b"PK\x03\x04":
    raise DataError(f"{path}: not a readable .npz file (not a zip archive)")
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
      state = {k: z[k] for k in z.files if k not in NPZ_META}
      meta = {k.strip("_"): str(z[k]) for k in NPZ_META if k in z.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f"{path}: not a readable .npz file ({e})") from e
  return state, meta


def read_state_dict(path: Path) -> tuple[dict, dict]:
  """(state_dict {key: numpy array}, meta).

  meta['sha256']: the SHA-256 of the bytes that were parsed (the file's own digest).
  meta['source_file'], meta['source_sha256']: what a converted .safetensors/.npz file SAYS its
    source was, when it says so (a claim: never use it to identify the weights).
  """
  path = Path(path)
  suffix = path.suffix.lower()
  if suffix not in TORCH_SUFFIXES + (".safetensors", ".npz"):
    raise DataError(f"{path}: unsupported weight file type {suffix!r} "
                    f"({', '.join(TORCH_SUFFIXES)}, .safetensors, .npz)")
  data, sha256 = read_bytes(path)
  if suffix in TORCH_SUFFIXES:
    obj = torch_serialization.load(data, str(path))
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
      raise DataError(f"{path}: expected a state_dict (name -> tensor), got "
                      f"{type(obj).__name__}")
    state, meta = dict(obj), {}
  elif suffix == ".safetensors":
    state, meta = _safetensors(data, path)
  else:
    state, meta = _npz(data, path)
  return state, {**meta, "sha256": sha256}
