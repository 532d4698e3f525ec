"""UniAD reference state_dict (PyTorch) -> Flax params of `UniADTransformer` (spec
`methods/uniad.md` §3).

Only the trainable part is converted: `input_proj`, `output_proj`, `pos_embed.*` and
`transformer.*`. The frozen backbone (`extractor.*` in a reference checkpoint) comes from the
torchvision weight file (`uad_jax.tools.import_weights`), and the `step` buffer is not a
parameter; both are skipped, as is a `module.` prefix (multi-GPU DDP runs).

Layouts: Linear weight (out, in) -> Dense kernel w.T; torch nn.MultiheadAttention's packed
`in_proj_weight` (3E, E) / `in_proj_bias` (3E,) -> query, key, value kernels
W[iE:(i+1)E].T.reshape(E, heads, d) and biases (heads, d); `out_proj.weight` (E, E) -> out kernel
w.T.reshape(heads, d, E); LayerNorm weight/bias -> scale/bias; embedding tables as they are.
The table is derived from the model's configuration, so every key and shape is checked: a
missing, unexpected or misshapen key is a DataError naming it.
"""

import dataclasses
from pathlib import Path
from typing import Mapping

import numpy as np

from uad_jax.convert import accelerate
from uad_jax.errors import DataError
from uad_jax.methods import uniad
from uad_jax.networks.uniad_transformer import UniADTransformer

_WRAPPER_PREFIX = "module."
_SKIPPED = ("step",)
_SKIPPED_PREFIXES = ("extractor.",)
_QKV = ("query", "key", "value")


@dataclasses.dataclass(frozen=True)
class ParamEntry:
  """One reference tensor: torch name and shape, Flax path, layout.

  layout: 'dense' (Linear weight), 'vector', 'table' (as is), 'in_proj_weight', 'in_proj_bias'
  (flax_path is then the attention module; the leaves are query/key/value below it),
  'out_proj_weight'.
  """
  torch_name: str
  torch_shape: tuple[int, ...]
  flax_path: tuple[str, ...]
  layout: str


def parameter_table(model: UniADTransformer, feature_channels: int) -> list[ParamEntry]:
  """Every trainable reference tensor of `model` with C = feature_channels input channels."""
  e, ffn, c = model.hidden_dim, model.dim_feedforward, feature_channels
  num_tokens = model.feature_size ** 2
  table = []

  def linear(torch_module, path, n_in, n_out):
    table.append(ParamEntry(f"{torch_module}.weight", (n_out, n_in), path + ("kernel",), "dense"))
    table.append(ParamEntry(f"{torch_module}.bias", (n_out,), path + ("bias",), "vector"))

  def norm(torch_module, path):
    table.append(ParamEntry(f"{torch_module}.weight", (e,), path + ("scale",), "vector"))
    table.append(ParamEntry(f"{torch_module}.bias", (e,), path + ("bias",), "vector"))

  def attention(torch_module, path):
    table.append(ParamEntry(f"{torch_module}.in_proj_weight", (3 * e, e), path, "in_proj_weight"))
    table.append(ParamEntry(f"{torch_module}.in_proj_bias", (3 * e,), path, "in_proj_bias"))
    table.append(ParamEntry(f"{torch_module}.out_proj.weight", (e, e), path + ("out", "kernel"),
                            "out_proj_weight"))
    table.append(ParamEntry(f"{torch_module}.out_proj.bias", (e,), path + ("out", "bias"),
                            "vector"))

  half = e // 2
  for table_name in ("row_embed", "col_embed"):
    table.append(ParamEntry(f"pos_embed.{table_name}.weight", (model.feature_size, half),
                            ("pos_embed", table_name), "table"))
  for l in range(model.num_encoder_layers):
    t, p = f"transformer.encoder.layers.{l}", (f"encoder_{l}",)
    attention(f"{t}.self_attn", p + ("self_attn",))
    linear(f"{t}.linear1", p + ("linear1",), e, ffn)
    linear(f"{t}.linear2", p + ("linear2",), ffn, e)
    norm(f"{t}.norm1", p + ("norm1",))
    norm(f"{t}.norm2", p + ("norm2",))
  for l in range(model.num_decoder_layers):
    t, p = f"transformer.decoder.layers.{l}", (f"decoder_{l}",)
    table.append(ParamEntry(f"{t}.learned_embed.weight", (num_tokens, e), p + ("learned_embed",),
                            "table"))
    attention(f"{t}.self_attn", p + ("self_attn",))
    attention(f"{t}.multihead_attn", p + ("multihead_attn",))
    linear(f"{t}.linear1", p + ("linear1",), e, ffn)
    linear(f"{t}.linear2", p + ("linear2",), ffn, e)
    for i in (1, 2, 3):
      norm(f"{t}.norm{i}", p + (f"norm{i}",))
  norm("transformer.decoder.norm", ("decoder_norm",))
  linear("input_proj", ("input_proj",), c, e)
  linear("output_proj", ("output_proj",), e, c)
  return table


def _leaves(value: np.ndarray, entry: ParamEntry, heads: int) -> dict:
  """{flax path: array} of one reference tensor."""
  if entry.layout == "dense":
    return {entry.flax_path: value.T}
  if entry.layout in ("vector", "table"):
    return {entry.flax_path: value}
  e = entry.torch_shape[-1]
  if entry.layout == "in_proj_weight":
    return {entry.flax_path + (name, "kernel"): value[i * e:(i + 1) * e].T.reshape(e, heads, -1)
            for i, name in enumerate(_QKV)}
  if entry.layout == "in_proj_bias":
    e = entry.torch_shape[0] // 3
    return {entry.flax_path + (name, "bias"): value[i * e:(i + 1) * e].reshape(heads, -1)
            for i, name in enumerate(_QKV)}
  if entry.layout == "out_proj_weight":
    return {entry.flax_path: value.T.reshape(heads, -1, e)}
  raise ValueError(f"unknown layout {entry.layout!r}")


def torch_to_flax(state_dict: Mapping[str, np.ndarray], model: UniADTransformer,
                  feature_channels: int, source: str = "state_dict") -> dict:
  """Nested Flax params of `model` (float32) from a reference state_dict or checkpoint."""
  arrays = {}
  for name, value in state_dict.items():
    key = name[len(_WRAPPER_PREFIX):] if name.startswith(_WRAPPER_PREFIX) else name
    if key in _SKIPPED or key.startswith(_SKIPPED_PREFIXES):
      continue
    if key in arrays:
      raise DataError(f"{source}: parameter {key!r} appears twice (after stripping "
                      f"{_WRAPPER_PREFIX!r})")
    arrays[key] = np.asarray(value)
  params: dict = {}
  for entry in parameter_table(model, feature_channels):
    if entry.torch_name not in arrays:
      raise DataError(f"{source}: missing {entry.torch_name!r} (expected shape "
                      f"{entry.torch_shape})")
    value = arrays.pop(entry.torch_name)
    if value.shape != entry.torch_shape:
      raise DataError(f"{source}: {entry.torch_name!r} has shape {value.shape}, expected "
                      f"{entry.torch_shape} for this model config")
    for path, leaf in _leaves(value, entry, model.num_heads).items():
      node = params
      for part in path[:-1]:
        node = node.setdefault(part, {})
      node[path[-1]] = np.ascontiguousarray(leaf, dtype=np.float32)
  if arrays:
    raise DataError(f"{source}: unexpected keys for this model config: {sorted(arrays)[:10]}"
                    f"{' ...' if len(arrays) > 10 else ''}")
  return params


def reference_states(config, src: Path, ema_from_model: bool) -> tuple[dict, list[str]]:
  """({'model': {'params'}}, warnings) of an accelerate checkpoint folder of the reference's
  UniAD training (`model.safetensors` or `pytorch_model.bin`). UniAD trains and scores
  without EMA, so `ema_from_model` changes nothing. The frozen backbone of the state comes from
  `model.backbone_weights` (the stage's init), not from the checkpoint's `extractor.*`."""
  del ema_from_model
  weights, model_file = accelerate.read_model_weights(Path(src))
  params = torch_to_flax(weights, uniad.build_model(config), uniad.feature_channels(config),
                         str(model_file))
  return {uniad.STAGE_NAME: {"params": params}}, []
