"""PyTorch reference DDPMpp state_dict <-> Flax params (spec `methods/andi.md` §2.8,
`methods/itermask.md` §5 for the BatchNorm variant).

The parameter table is derived from the network's module plan (`DDPMpp.plan()`), so it follows
any configuration (ANDi, DISYRE, RIAD, IterMask, the small fixture configs). Its order is the
reference's `named_parameters()` order, which is also the order of the unnamed EMA
`shadow_params` list in `custom_checkpoint_0.pkl`. Never zip that list with the keys of
`model.safetensors`: safetensors sorts keys as strings (`all_modules.10` before `all_modules.2`).

BatchNorm networks (norm 'batch') also have buffers `running_mean`/`running_var` (Flax
collection 'batch_stats': `mean`/`var`) and `num_batches_tracked` (dropped): `torch_to_flax`
takes the parameters and accepts these buffers, `batch_stats_from_torch` takes the statistics.
The reference's EMA never covers buffers, so its scoring weights are the EMA parameters with the
raw model's running statistics.
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
# BatchNorm buffers: running statistics (converted) and the update counter (dropped).
_BN_STATS = (("running_mean", "mean"), ("running_var", "var"))
_BN_COUNTER = "num_batches_tracked"


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

  # Torch names inside a ResBlock: ANDi's layerspp (GroupNorm_0, Conv_0, out_layers =
  # [GN, Dropout, conv]) or IterMask's (norm, Conv_1, out_layers = [BN, SiLU, Dropout, conv]).
  batch = model.norm == "batch"
  nrm = "BN" if batch else "GN"
  rb_norm_0, rb_conv_0 = ("norm.", "Conv_1.") if batch else ("GroupNorm_0.", "Conv_0.")
  rb_conv_1 = "out_layers.3." if batch else "out_layers.2."
  for i, m in enumerate(model.plan()):
    p = (m.name,)
    if m.kind == "temb_dense":
      add_dense(i, "", p, m.c_in, m.c_out)
    elif m.kind == "conv":
      add_conv(i, "", p, m.c_in, m.c_out, 3)
    elif m.kind == "norm":
      add_norm(i, "", p, m.c_out)
    elif m.kind == "resblock":
      add_norm(i, rb_norm_0, p + (f"{nrm}_0",), m.c_in)
      add_conv(i, rb_conv_0, p + ("Conv_0",), m.c_in, m.c_out, 3)
      if model.embedding_type is not None:
        add_dense(i, "emb_layers.1.", p + ("Dense_emb",), temb_dim, 2 * m.c_out)
      add_norm(i, "out_layers.0.", p + (f"{nrm}_1",), m.c_out)
      add_conv(i, rb_conv_1, p + ("Conv_1",), m.c_out, m.c_out, 3)
      if m.has_skip_conv:
        add_conv(i, "Conv_2.", p + ("Conv_2",), m.c_in, m.c_out, 1)
    elif m.kind == "attn":
      c = m.c_out
      add_norm(i, "norm.", p + (nrm,), c)
      add_dense(i, "proj_in.", p + ("Dense_in",), c, c)
      add_dense(i, "qkv.", p + ("Dense_qkv",), c, 3 * c, bias=False)
      add_dense(i, "proj_out.", p + ("Dense_out",), c, c)
    else:
      raise ValueError(f"unknown module kind {m.kind!r} in the DDPMpp plan")
  return table


def batch_stats_table(model: DDPMpp) -> list[ParamEntry]:
  """The running statistics of a BatchNorm network (empty for GroupNorm), in state_dict order:
  one (running_mean, running_var) pair per norm layer, each beside its `weight` entry."""
  if model.norm != "batch":
    return []
  table = []
  for e in parameter_table(model):
    if e.flax_path[-1] == "scale":
      module = e.torch_name[:-len("weight")]
      for torch_stat, flax_stat in _BN_STATS:
        table.append(ParamEntry(module + torch_stat, e.torch_shape,
                                e.flax_path[:-1] + (flax_stat,), "vector"))
  return table


def _bn_buffer_names(model: DDPMpp) -> set[str]:
  """Every BatchNorm buffer key of the state_dict (statistics and counters)."""
  names = {e.torch_name for e in batch_stats_table(model)}
  return names | {n.rsplit(".", 1)[0] + "." + _BN_COUNTER
                  for n in names if n.endswith("running_mean")}


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


def _stripped_arrays(state_dict: Mapping[str, np.ndarray], source: str) -> dict:
  arrays = {}
  for name, value in state_dict.items():
    key = _strip(name)
    if key in arrays:
      raise DataError(f"{source}: parameter {key!r} appears twice (after stripping prefixes)")
    arrays[key] = np.asarray(value)
  return arrays


def _take(arrays: dict, table: list[ParamEntry], source: str, what: str) -> dict:
  """Pops every entry of `table` from `arrays` into a nested Flax tree (float32, Flax layout)."""
  tree: dict = {}
  for entry in table:
    if entry.torch_name not in arrays:
      raise DataError(f"{source}: missing {what} {entry.torch_name!r} "
                      f"(expected shape {entry.torch_shape})")
    value = arrays.pop(entry.torch_name)
    if value.shape != entry.torch_shape:
      raise DataError(f"{source}: {what} {entry.torch_name!r} has shape {value.shape}, "
                      f"expected {entry.torch_shape} for this model config")
    node = tree
    for part in entry.flax_path[:-1]:
      node = node.setdefault(part, {})
    node[entry.flax_path[-1]] = np.ascontiguousarray(_to_flax(value, entry.layout),
                                                     dtype=np.float32)
  return tree


def torch_to_flax(state_dict: Mapping[str, np.ndarray], model: DDPMpp, source: str = "state_dict"
                  ) -> dict:
  """Maps a reference state_dict (name -> NCHW-layout array) to a Flax params tree of `model`.

  `module.` / `_orig_mod.` prefixes are stripped and the `step` buffer ignored (as are the
  BatchNorm buffers of a norm 'batch' model: `batch_stats_from_torch`). Every expected parameter
  must be present with its exact shape and no unknown key may remain; errors name `source` (e.g.
  the checkpoint file) and the key. Returns nested dicts of float32 numpy arrays.
  """
  arrays = _stripped_arrays(state_dict, source)
  for buffer in set(_BUFFERS) | _bn_buffer_names(model):
    arrays.pop(buffer, None)
  params = _take(arrays, parameter_table(model), source, "parameter")
  if arrays:
    raise DataError(f"{source}: {len(arrays)} keys that this model config does not have, e.g. "
                    f"{sorted(arrays)[:5]}")
  return params


def batch_stats_from_torch(state_dict: Mapping[str, np.ndarray], model: DDPMpp,
                           source: str = "state_dict") -> dict:
  """The Flax 'batch_stats' tree ({..: {mean, var}}) of a norm 'batch' model from the reference
  state_dict's running statistics ({} for GroupNorm models); parameters and other buffers are
  ignored (`torch_to_flax` checks those). Every running statistic must be present."""
  arrays = _stripped_arrays(state_dict, source)
  return _take(arrays, batch_stats_table(model), source, "BatchNorm buffer")


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
