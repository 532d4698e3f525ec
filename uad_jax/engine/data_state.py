"""The grain iterator state of every process, as one JSON-able dict for the checkpoint."""

import base64
import json

import jax
import numpy as np
from jax.experimental import multihost_utils


def _encode(state) -> str:
  if isinstance(state, (bytes, bytearray)):
    return "b64:" + base64.b64encode(bytes(state)).decode("ascii")
  return "json:" + json.dumps(state)


def _decode(text: str):
  kind, _, payload = text.partition(":")
  return base64.b64decode(payload) if kind == "b64" else json.loads(payload)


def gather(state) -> dict:
  """This process's iterator state -> {"process_<i>": encoded state} for all processes."""
  text = _encode(state)
  if jax.process_count() == 1:
    return {"process_0": text}
  raw = np.frombuffer(text.encode("utf-8"), np.uint8)
  length = multihost_utils.process_allgather(np.array([raw.size], np.int32))
  padded = np.zeros(int(length.max()), np.uint8)
  padded[:raw.size] = raw
  everything = multihost_utils.process_allgather(padded)
  return {f"process_{i}": bytes(everything[i, :int(length[i, 0])]).decode("utf-8")
          for i in range(jax.process_count())}


def local(saved: dict):
  """The state this process saved (its own shard of the data)."""
  key = f"process_{jax.process_index()}"
  if key not in saved:
    raise ValueError(f"checkpoint has no data-iterator state for {key} (saved with "
                     f"{len(saved)} processes, now running {jax.process_count()})")
  return _decode(saved[key])
