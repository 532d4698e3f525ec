"""Reading PyTorch weight files: `.pth`/`.bin` (needs torch), `.safetensors`, `.npz`.

torch is imported only for the pickle-based formats, with a clear message when it is missing.
"""

from pathlib import Path

import numpy as np

from uad_jax.errors import DataError

NPZ_META = ("__source_file__", "__source_sha256__")
TORCH_HINT = ("pip install torch==2.13.0 (CPU), or convert to .safetensors/.npz elsewhere "
              "(see `python -m uad_jax.tools.import_weights --help`)")


def torch_load(path: Path):
  """`torch.load` on the CPU with `weights_only=True` (tensors, containers and numbers only: a
  file from a stranger cannot run code); a clear error when torch is not installed."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError(f"{path}: reading a {path.suffix} file needs PyTorch, which is not "
                    f"installed: {TORCH_HINT}") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # corrupt or unsafe pickle
    raise DataError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})") from e


def to_numpy(value) -> np.ndarray:
  """A torch tensor (or array-like) as a numpy array."""
  return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def read_state_dict(path: Path) -> tuple[dict, dict]:
  """(state_dict {key: numpy array}, source metadata {source_file, source_sha256} or {})."""
  path = Path(path)
  suffix = path.suffix.lower()
  if suffix in (".pth", ".pt", ".bin"):
    obj = torch_load(path)
    if not isinstance(obj, dict):
      raise DataError(f"{path}: expected a state_dict (name -> tensor), got {type(obj).__name__}")
    return {k: to_numpy(v) for k, v in obj.items()}, {}
  if suffix == ".safetensors":
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(str(path), framework="np") as f:
      meta = f.metadata() or {}
      state = {k: f.get_tensor(k) for k in f.keys()}
    return state, {k: meta[k] for k in ("source_file", "source_sha256") if k in meta}
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as z:
      state = {k: z[k] for k in z.files if k not in NPZ_META}
      meta = {k.strip("_"): str(z[k]) for k in NPZ_META if k in z.files}
    return state, meta
  raise DataError(f"{path}: unsupported weight file type {suffix!r} (.pth, .bin, .safetensors, .npz)")


