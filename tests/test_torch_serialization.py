"""The torch-free reader of torch.save files: real files (zip and legacy) and hostile ones."""

import hashlib
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from uad_jax.convert import torch_serialization as ts
from uad_jax.convert.weight_files import read_state_dict, torch_load
from uad_jax.errors import DataError

FILES = Path(__file__).parent / "fixtures" / "torch_files"
NAMES = ("tensors", "module_state_dict", "ema")


def _leaves(obj, prefix=""):
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield from _leaves(v, f"{prefix}{k}/")
  elif isinstance(obj, (list, tuple)):
    for i, v in enumerate(obj):
      yield from _leaves(v, f"{prefix}{i}/")
  else:
    yield prefix.rstrip("/"), obj


@pytest.mark.parametrize("suffix", ["", "_legacy"])
@pytest.mark.parametrize("name", NAMES)
def test_real_files_equal_torch_load(name, suffix):
  """Every leaf as torch.load(weights_only=True) returned it when the files were written."""
  expected_json = json.loads((FILES / "expected.json").read_text())
  with np.load(FILES / "expected.npz") as z:
    expected = {k: z[k] for k in z.files}
  got = dict(_leaves(torch_load(FILES / f"{name}{suffix}.pth")))
  keys = {k[len(name) + 1:] for k in expected_json if k.startswith(name + "/")}
  assert set(got) == keys
  for path, leaf in got.items():
    ref = expected_json[f"{name}/{path}"]
    if "dtype" in ref:
      assert isinstance(leaf, np.ndarray) and str(leaf.dtype) == ref["dtype"], path
      assert leaf.flags.c_contiguous and leaf.flags.owndata, path
      want = expected[f"{name}/{path}"]
      assert leaf.shape == want.shape, path
      np.testing.assert_array_equal(leaf.astype(want.dtype), want, err_msg=path)
    else:
      value = leaf.decode("latin1") if isinstance(leaf, bytes) else leaf
      assert (value, type(leaf).__name__) == (ref["value"], ref["type"]), path


def test_state_dict_reader_hashes_the_bytes_it_parses():
  src = FILES / "module_state_dict.pth"
  state, meta = read_state_dict(src)
  assert meta == {"sha256": hashlib.sha256(src.read_bytes()).hexdigest()}
  assert list(state) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                         "1.running_var", "1.num_batches_tracked"]
  with pytest.raises(DataError, match="expected a state_dict"):
    read_state_dict(FILES / "ema.pth")


# --- hostile and malformed files ------------------------------------------------------------

class _WritesAFile:
  """Unpickling this calls open(path, 'w'): creates the file."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (open, (self.path, "w"))


def _zip(pickle_bytes: bytes, storages: dict | None = None) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("archive/data.pkl", pickle_bytes)
    z.writestr("archive/version", "3\n")
    for key, raw in (storages or {}).items():
      z.writestr(f"archive/data/{key}", raw)
  return buf.getvalue()


def _legacy(pickle_bytes: bytes) -> bytes:
  return (ts.LEGACY_MAGIC + pickle.dumps(1001, protocol=2)
          + pickle.dumps({"little_endian": True}, protocol=2) + pickle_bytes
          + pickle.dumps([], protocol=2))


@pytest.mark.parametrize("container", [_zip, _legacy])
def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, container):
  target = tmp_path / "pwned"
  payload = pickle.dumps({"w": _WritesAFile(target)}, protocol=2)
  pickle.loads(payload)   # the payload works: plain pickle creates the file
  assert target.exists()
  target.unlink()
  src = tmp_path / "evil.pth"
  src.write_bytes(container(payload))
  with pytest.raises(DataError, match=r"evil.pth: refused to unpickle the global "
                                      r"(builtins|io)\.open"):
    torch_load(src)
  assert not target.exists()


def _g(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def _s(text: str) -> bytes:
  return b"X" + struct.pack("<I", len(text.encode())) + text.encode()


def _int(n: int) -> bytes:
  return b"J" + struct.pack("<i", n)


def _ints(values) -> bytes:
  return b"(" + b"".join(_int(v) for v in values) + b"t"


def _tensor_pickle(numel, offset, size, stride, storage_class="FloatStorage") -> bytes:
  """Protocol-2 opcodes of {'w': tensor} exactly as torch.save's zip format writes them."""
  storage = b"(" + _s("storage") + _g("torch", storage_class) + _s("0") + _s("cpu") + _int(
      numel) + b"tQ"
  args = (b"(" + storage + _int(offset) + _ints(size) + _ints(stride) + b"\x89"
          + _g("collections", "OrderedDict") + b")R" + b"t")
  return (b"\x80\x02" + _g("collections", "OrderedDict") + b")R(" + _s("w")
          + _g("torch._utils", "_rebuild_tensor_v2") + args + b"Ru.")


def test_handwritten_tensor_pickle_reads_and_checks_bounds(tmp_path):
  raw = np.arange(12, dtype="<f4").tobytes()
  ok = ts.load(_zip(_tensor_pickle(12, 1, (2, 3), (4, 1)), {"0": raw}), "ok.pth")
  np.testing.assert_array_equal(ok["w"], np.array([[1, 2, 3], [5, 6, 7]], np.float32))
  with pytest.raises(DataError, match="reads past its storage"):   # last element 4 + 6 + 2
    ts.load(_zip(_tensor_pickle(12, 4, (2, 3), (6, 1)), {"0": raw}), "oob.pth")
  with pytest.raises(DataError, match="has 48 bytes, 52 expected"):
    ts.load(_zip(_tensor_pickle(13, 0, (13,), (1,)), {"0": raw}), "short.pth")
  with pytest.raises(DataError, match="storage archive/data/0 is missing"):
    ts.load(_zip(_tensor_pickle(12, 0, (12,), (1,))), "nostorage.pth")
  with pytest.raises(DataError, match="does not fit its size"):
    ts.load(_zip(_tensor_pickle(12, 0, (3, 4), (1,)), {"0": raw}), "rank.pth")
  with pytest.raises(DataError, match="refused to unpickle the global torch.QInt8Storage"):
    ts.load(_zip(_tensor_pickle(12, 0, (12,), (1,), "QInt8Storage"), {"0": raw}), "q.pth")


def test_other_refusals_name_the_file(tmp_path):
  with pytest.raises(DataError, match="^g.pth: not a PyTorch file"):
    ts.load(b"\x00" * 100, "g.pth")
  with pytest.raises(DataError, match="^z.pth: a zip archive without one <archive>/data.pkl"):
    ts.load(_zip_without_pickle(), "z.pth")
  with pytest.raises(DataError, match="^t.pt: a TorchScript archive"):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
      z.writestr("m/data.pkl", pickle.dumps({}, protocol=2))
      z.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
    ts.load(buf.getvalue(), "t.pt")
  with pytest.raises(DataError, match="^c.pth: corrupt pickle"):
    ts.load(_zip(b"\x80\x02}q\x00(X"), "c.pth")
  with pytest.raises(DataError, match="^p.pth: refused to unpickle the persistent id"):
    ts.load(_zip(b"\x80\x02(X\x06\x00\x00\x00moduletQ."), "p.pth")
  # BUILD on anything but an OrderedDict (e.g. setting state on a storage type) is refused.
  build = b"\x80\x02" + _g("torch", "FloatStorage") + b"}b."
  with pytest.raises(DataError, match="^b.pth: refused to unpickle BUILD of a _StorageType"):
    ts.load(_zip(build), "b.pth")
  for suffix in (".safetensors", ".npz", ".pth"):
    bad = tmp_path / f"garbage{suffix}"
    bad.write_bytes(b"\x01garbage" * 50)
    with pytest.raises(DataError) as e:
      read_state_dict(bad)
    assert str(e.value).startswith(str(bad)) and "\n" not in str(e.value)


def _zip_without_pickle() -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("archive/version", "3\n")
  return buf.getvalue()
