"""The DDPM++-style U-Net of the reference (`models/ANDi/DDPMpp.py`), shared by ANDi, DISYRE,
RIAD and (in its BatchNorm variant, `models/IterMask/UNet.py`) IterMask.

The network is described once by `module_plan`: the reference's `all_modules` list in its order
(index i of the plan = torch module `all_modules.{i}`), each entry naming its Flax submodule.
`DDPMpp` runs the plan; the PyTorch converter and the parameter order of the EMA shadow list are
derived from the same plan, so they cannot drift apart.

Configuration differences between the methods are attributes: ANDi/DISYRE use a positional time
embedding and rescaled (÷√2) residual sums; RIAD has no time embedding and no rescaling;
IterMask has neither and `norm='batch'` (BatchNorm everywhere, SiLU after the blocks' second
norm; train mode then updates the 'batch_stats' collection).
"""

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from uad_jax.errors import ConfigError
from uad_jax.networks import ddpmpp_layers as layers


@dataclasses.dataclass(frozen=True)
class PlannedModule:
  """One entry of the reference module list.

  kind: 'temb_dense' | 'conv' | 'resblock' | 'attn' | 'norm'.
  name: Flax submodule name. resolution: spatial size of the module's input.
  mode: ResBlock resampling ('plain' | 'down' | 'up'). pop_skip: concatenates the top of the skip
  stack to its input first. push_skip: its output is pushed onto the skip stack. zero_init:
  a convolution initialised to zero (the output head, so that f = 0 at initialisation).
  """
  kind: str
  name: str
  c_in: int
  c_out: int
  resolution: int
  mode: str = "plain"
  dropout: float = 0.0
  pop_skip: bool = False
  push_skip: bool = False
  zero_init: bool = False

  @property
  def has_skip_conv(self) -> bool:
    """Whether a ResBlock owns the 1×1 Conv_2 (channel change or resampling)."""
    return self.kind == "resblock" and (self.c_in != self.c_out or self.mode != "plain")


def module_plan(image_size: int, nf: int, ch_mult: Sequence[int],
                num_res_blocks: Sequence[int], attn_resolutions: Sequence[int], dropout: float,
                dropout_at: int, embedding_type: Optional[str], in_channels: int = 1,
                out_channels: int = 1) -> list[PlannedModule]:
  """The reference's `all_modules` list for one configuration, in torch order.

  Level i has resolution image_size / 2**i and nf·ch_mult[i] channels. Down level: num_res_blocks
  [i] ResBlocks (each followed by attention where the resolution is in attn_resolutions), then a
  down ResBlock unless last. Bottleneck: ResBlock, attention, ResBlock. Up level (reversed):
  num_res_blocks[i] + 1 ResBlocks that pop skips, one attention where the resolution is in
  attn_resolutions, then an up ResBlock unless i = 0. Dropout p = 0 at levels whose resolution
  exceeds dropout_at, else `dropout`; the bottleneck and every attention always use `dropout`.
  """
  if len(ch_mult) != len(num_res_blocks):
    raise ConfigError(f"model.ch_mult {tuple(ch_mult)} and model.num_res_blocks "
                      f"{tuple(num_res_blocks)} must have one entry per level")
  if image_size % 2 ** (len(ch_mult) - 1):
    raise ConfigError(f"image size {image_size} is not divisible by 2**{len(ch_mult) - 1} "
                      f"({len(ch_mult)} levels of model.ch_mult)")
  if embedding_type not in ("positional", None):
    raise ConfigError(f"model.embedding_type {embedding_type!r}: expected 'positional' or None")

  plan = []

  def add(kind, name, c_in, c_out, resolution, **kw):
    plan.append(PlannedModule(kind, name, c_in, c_out, resolution, **kw))

  def level_dropout(resolution):
    return 0.0 if resolution > dropout_at else dropout

  if embedding_type == "positional":
    add("temb_dense", "temb_dense_0", nf, 4 * nf, 0)
    add("temb_dense", "temb_dense_1", 4 * nf, 4 * nf, 0)
  res, ch = image_size, nf
  add("conv", "conv_in", in_channels, nf, res, push_skip=True)
  skip_channels = [nf]
  for i, (mult, n_blocks) in enumerate(zip(ch_mult, num_res_blocks)):
    p = level_dropout(res)
    for j in range(n_blocks):
      attn = res in attn_resolutions
      add("resblock", f"down_{i}_res_{j}", ch, nf * mult, res, dropout=p, push_skip=not attn)
      ch = nf * mult
      if attn:
        add("attn", f"down_{i}_attn_{j}", ch, ch, res, dropout=dropout, push_skip=True)
      skip_channels.append(ch)
    if i != len(ch_mult) - 1:
      add("resblock", f"down_{i}_downsample", ch, ch, res, mode="down", dropout=p, push_skip=True)
      skip_channels.append(ch)
      res //= 2

  add("resblock", "mid_res_0", ch, ch, res, dropout=dropout)
  add("attn", "mid_attn", ch, ch, res, dropout=dropout)
  add("resblock", "mid_res_1", ch, ch, res, dropout=dropout)

  for i in reversed(range(len(ch_mult))):
    p = level_dropout(res)
    for j in range(num_res_blocks[i] + 1):
      c_in = ch + skip_channels.pop()
      ch = nf * ch_mult[i]
      add("resblock", f"up_{i}_res_{j}", c_in, ch, res, dropout=p, pop_skip=True)
    if res in attn_resolutions:
      add("attn", f"up_{i}_attn", ch, ch, res, dropout=dropout)
    if i != 0:
      add("resblock", f"up_{i}_upsample", ch, ch, res, mode="up", dropout=p)
      res *= 2

  add("norm", "out_norm", ch, ch, res)
  add("conv", "conv_out", ch, out_channels, res, zero_init=True)
  return plan


class DDPMpp(nn.Module):
  """DDPM++ U-Net f(x, t) (NHWC).

  Call: x (B, H, W, C_in) with H = W = image_size; t (B,) float (fed unscaled to the embedding;
  ignored when embedding_type is None); train enables dropout (rng collection 'dropout') and,
  with norm 'batch', BatchNorm's batch statistics (apply with mutable=['batch_stats']).
  Returns (B, H, W, out_channels) float32. Parameters are float32, `dtype` is the computation
  dtype. The sinusoidal time embedding is sown as intermediates/temb_sinusoidal; the output of
  plan module m is intermediates/<m.name>/__call__ under `apply(..., capture_intermediates=True,
  mutable=['intermediates'])` (the head's `out_norm` output is before its SiLU).
  """
  image_size: int
  nf: int = 32
  ch_mult: Sequence[int] = (1, 1, 1, 2, 3, 4)
  num_res_blocks: Sequence[int] = (1, 1, 1, 2, 4, 2)
  attn_resolutions: Sequence[int] = (14, 7)
  attn_emb_dim: int = 32
  dropout: float = 0.1
  dropout_at: int = 14
  rescale: bool = True
  embedding_type: Optional[str] = "positional"
  in_channels: int = 1
  out_channels: int = 1
  conv_weight_grad: str = "xla"
  norm: str = "group"
  dtype: Any = jnp.float32

  def plan(self) -> list[PlannedModule]:
    return module_plan(self.image_size, self.nf, self.ch_mult, self.num_res_blocks,
                       self.attn_resolutions, self.dropout, self.dropout_at, self.embedding_type,
                       self.in_channels, self.out_channels)

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    if x.shape[1:] != (self.image_size, self.image_size, self.in_channels):
      # The reference places attention by the runtime width; other sizes would silently move it.
      raise ConfigError(f"DDPMpp built for {self.image_size}x{self.image_size}x"
                        f"{self.in_channels} inputs, got shape {x.shape}")
    temb = temb_in = None
    if self.embedding_type == "positional":
      temb_in = layers.timestep_embedding(t, self.nf)
      self.sow("intermediates", "temb_sinusoidal", temb_in)
    h = x.astype(self.dtype)
    skips = []
    for m in self.plan():
      if m.kind == "temb_dense":
        temb = nn.Dense(m.c_out, dtype=self.dtype, kernel_init=layers.default_init,
                        bias_init=layers.zeros_init, name=m.name)(temb_in)
        temb_in = nn.silu(temb)  # temb = Dense_1(SiLU(Dense_0(e))), no activation after Dense_1
      elif m.kind == "conv":
        h = layers.Conv3x3(m.c_out, m.zero_init, self.conv_weight_grad, self.dtype,
                           name=m.name)(h)
      elif m.kind == "resblock":
        if m.pop_skip:
          h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = layers.ResBlock(m.c_out, m.mode, m.dropout, self.rescale, self.conv_weight_grad,
                            self.norm, self.dtype, name=m.name)(h, temb, train)
      elif m.kind == "attn":
        h = layers.CausalSelfAttention(self.attn_emb_dim, m.dropout, self.rescale, self.norm,
                                       self.dtype, name=m.name)(h, train)
      else:  # 'norm': the output head's GroupNorm (BatchNorm), followed by SiLU
        h = nn.silu(layers.normalize(self.norm, h, train, self.dtype, m.name))
      if m.push_skip:
        skips.append(h)
    return h.astype(jnp.float32)


def ddpmpp_from_config(model_config, image_size: int, dtype: Any = jnp.float32,
                       in_channels: Optional[int] = None) -> DDPMpp:
  """A DDPMpp from `config.model` (keys as in spec `methods/andi.md` §2.1).

  model.num_channels: input and output channels; `in_channels` overrides the input's (IterMask's
  masked AE takes [image, condition], 2 channels, and outputs 1).
  model.norm (optional): 'group' (default) or 'batch' (IterMask).
  model.conv_weight_grad (optional, not a reference key): 'xla' | 'row_chunks' | 'auto' (the
  default: 'row_chunks' on a single CPU device, where it makes training faster, else 'xla'; its
  scan over rows would all-reduce every block under batch sharding).
  """
  if model_config.get("nonlinearity", "swish") not in ("swish", "silu"):
    raise ConfigError(f"model.nonlinearity {model_config.nonlinearity!r}: only 'swish' (SiLU) "
                      "is implemented (the reference configs use it)")
  weight_grad = model_config.get("conv_weight_grad", "auto")
  if weight_grad == "auto":
    single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    weight_grad = "row_chunks" if single_cpu else "xla"
  if weight_grad not in layers.CONV3X3_WEIGHT_GRADS:
    raise ConfigError(f"model.conv_weight_grad {weight_grad!r}: expected 'auto' or one of "
                      f"{sorted(layers.CONV3X3_WEIGHT_GRADS)}")
  norm = model_config.get("norm", "group")
  if norm not in layers.NORMS:
    raise ConfigError(f"model.norm {norm!r}: expected one of {layers.NORMS}")
  channels = model_config.get("num_channels", 1)
  return DDPMpp(image_size=image_size, nf=model_config.nf, ch_mult=tuple(model_config.ch_mult),
                num_res_blocks=tuple(model_config.num_res_blocks),
                attn_resolutions=tuple(model_config.attn_resolutions),
                attn_emb_dim=model_config.attn_emb_dim, dropout=model_config.dropout,
                dropout_at=model_config.dropout_at, rescale=model_config.rescale,
                embedding_type=model_config.embedding_type,
                in_channels=channels if in_channels is None else in_channels,
                out_channels=channels, conv_weight_grad=weight_grad, norm=norm, dtype=dtype)
