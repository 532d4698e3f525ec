"""PyTorch reference DDPMpp state_dict <-> Flax params (spec `methods/andi.md` §2.8).

The parameter table is derived from the network's module plan (`DDPMpp.plan()`), so it follows
any configuration (ANDi, DISYRE, RIAD, the small fixture configs). Its order is the reference's
`named_parameters()` order, which is also the order of the unnamed EMA `shadow_params` list in
`custom_checkpoint_0.pkl`. Never zip that list with the keys of `model.safetensors`: safetensors
sorts keys as strings (`all_modules.10` before `all_modules.2`).
"""

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from uad_jax.errors import DataError
from uad_jax.networks.ddpmpp import DDPMpp

# Prefixes added by DistributedDataParallel (`module.`) and torch.compile (`_orig_mod.`).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Buffers of the reference module that are not parameters.
_BUFFERS = ("step",)


@dataclasses.dataclass(frozen=True)
class ParamEntry:
  """One reference parameter: torch name and shape, Flax path, layout ('conv'|'dense'|'vector')."""
  torch_name: str
  torch_shape: tuple[int, ...]
  flax_path: tuple[str, ...]
  layout: str


def parameter_table(model: DDPMpp) -> list[ParamEntry]:
  """Every parameter of `model` in the reference's named_parameters() order."""
  table = []
  temb_dim = 4 * model.nf

  def add(index, torch_sub, shape, flax_path, layout):
    table.append(ParamEntry(f"all_modules.{index}.{torch_sub}", tuple(shape), flax_path, layout))

  def add_conv(index, torch_mod, path, c_in, c_out, k):
    add(index, f"{torch_mod}weight", (c_out, c_in, k, k), path + ("kernel",), "conv")
    add(index, f"{torch_mod}bias", (c_out,), path + ("bias",), "vector")

  def add_dense(index, torch_mod, path, c_in, c_out, bias=True):
    add(index, f"{torch_mod}weight", (c_out, c_in), path + ("kernel",), "dense")
    if bias:
      add(index, f"{torch_mod}bias", (c_out,), path + ("bias",), "vector")

  def add_norm(index, torch_mod, path, c):
    add(index, f"{torch_mod}weight", (c,), path + ("scale",), "vector")
    add(index, f"{torch_mod}bias", (c,), path + ("bias",), "vector")

  for i, m in enumerate(model.plan()):
    p = (m.name,)
    if m.kind == "temb_dense":
      add_dense(i, "", p, m.c_in, m.c_out)
    elif m.kind == "conv":
      add_conv(i, "", p, m.c_in, m.c_out, 3)
    elif m.kind == "norm":
      add_norm(i, "", p, m.c_out)
    elif m.kind == "resblock":
      add_norm(i, "GroupNorm_0.", p + ("GN_0",), m.c_in)
      add_conv(i, "Conv_0.", p + ("Conv_0",), m.c_in, m.c_out, 3)
      if model.embedding_type is not None:
        add_dense(i, "emb_layers.1.", p + ("Dense_emb",), temb_dim, 2 * m.c_out)
      add_norm(i, "out_layers.0.", p + ("GN_1",), m.c_out)
      add_conv(i, "out_layers.2.", p + ("Conv_1",), m.c_out, m.c_out, 3)
      if m.has_skip_conv:
        add_conv(i, "Conv_2.", p + ("Conv_2",), m.c_in, m.c_out, 1)
    elif m.kind == "attn":
      c = m.c_out
      add_norm(i, "norm.", p + ("GN",), c)
      add_dense(i, "proj_in.", p + ("Dense_in",), c, c)
      add_dense(i, "qkv.", p + ("Dense_qkv",), c, 3 * c, bias=False)
      add_dense(i, "proj_out.", p + ("Dense_out",), c, c)
    else:
      raise ValueError(f"unknown module kind {m.kind!r} in the DDPMpp plan")
  return table


def named_parameters(model: DDPMpp) -> list[str]:
  """Torch parameter names in named_parameters() order (the EMA shadow list order)."""
  return [e.torch_name for e in parameter_table(model)]


def _to_flax(array: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv":
    return array.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
  if layout == "dense":
    return array.T  # (O, I) -> (I, O)
  return array


def _to_torch(array: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv":
    return array.transpose(3, 2, 0, 1)
  if layout == "dense":
    return array.T
  return array


def _strip(name: str) -> str:
  for prefix in _WRAPPER_PREFIXES:
    while name.startswith(prefix):
      name = name[len(prefix):]
  return name


def torch_to_flax(state_dict: Mapping[str, np.ndarray], model: DDPMpp, source: str = "state_dict"
                  ) -> dict:
  """Maps a reference state_dict (name -> NCHW-layout array) to a Flax params tree of `model`.

  `module.` / `_orig_mod.` prefixes are stripped and the `step` buffer ignored. Every expected
  parameter must be present with its exact shape and no unknown key may remain; errors name
  `source` (e.g. the checkpoint file) and the key. Returns nested dicts of float32 numpy arrays.
  """
  arrays = {}
  for name, value in state_dict.items():
    key = _strip(name)
    if key in arrays:
      raise DataError(f"{source}: parameter {key!r} appears twice (after stripping prefixes)")
    arrays[key] = np.asarray(value)
  for buffer in _BUFFERS:
    arrays.pop(buffer, None)

  params: dict = {}
  for entry in parameter_table(model):
    if entry.torch_name not in arrays:
      raise DataError(f"{source}: missing parameter {entry.torch_name!r} "
                      f"(expected shape {entry.torch_shape})")
    value = arrays.pop(entry.torch_name)
    if value.shape != entry.torch_shape:
      raise DataError(f"{source}: parameter {entry.torch_name!r} has shape {value.shape}, "
                      f"expected {entry.torch_shape} for this model config")
    node = params
    for part in entry.flax_path[:-1]:
      node = node.setdefault(part, {})
    node[entry.flax_path[-1]] = np.ascontiguousarray(_to_flax(value, entry.layout),
                                                     dtype=np.float32)
  if arrays:
    raise DataError(f"{source}: {len(arrays)} keys that this model config does not have, e.g. "
                    f"{sorted(arrays)[:5]}")
  return params


def shadow_params_to_state_dict(shadow_params: Sequence[np.ndarray], model: DDPMpp,
                                source: str = "shadow_params") -> dict:
  """Names the unnamed EMA `shadow_params` list by the architecture's named_parameters order."""
  table = parameter_table(model)
  if len(shadow_params) != len(table):
    raise DataError(f"{source}: {len(shadow_params)} tensors, the model config has "
                    f"{len(table)} parameters")
  return {e.torch_name: np.asarray(a) for e, a in zip(table, shadow_params)}


def flax_to_torch(params: Mapping, model: DDPMpp) -> dict:
  """Inverse of `torch_to_flax`: torch name -> array in torch layout, named_parameters order."""
  out = {}
  for entry in parameter_table(model):
    node = params
    for part in entry.flax_path:
      node = node[part]
    out[entry.torch_name] = np.ascontiguousarray(_to_torch(np.asarray(node), entry.layout))
  return out
