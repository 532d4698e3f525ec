"""UniAD's feature reconstructor (`models/UniAD/UniAD.py`): a neighbour-masked transformer, NHWC.

Spec `methods/uniad.md` §2.4–2.6. Feature tokens (B, h, w, C), t = h_idx * w + w_idx (row-major),
are optionally jittered (training), projected to `hidden_dim`, given a learned position
embedding, encoded by post-norm layers with masked self-attention and decoded by post-norm
layers whose queries are per-layer learned tables (not the previous output): the first attention
reads the encoder memory, the second the previous decoder output. A final LayerNorm and a linear
projection back to C give the reconstruction R (B, h, w, C).

Attention is flax's `MultiHeadDotProductAttention` (all heads in one einsum, packed torch
`in_proj` split into the query/key/value kernels (E, heads, E / heads) by the converter), with
dropout on the attention probabilities drawn per batch element and head as in torch
(`broadcast_dropout=False`). The neighbour mask is a numpy constant built once per geometry
(`neighbour_mask`): query (h1, w1) may NOT attend to keys with |h1 - h2| <= nh // 2 and
|w1 - w2| <= nw // 2 (self included); Flax masks say True = may attend. LayerNorm eps is torch's
1e-5.

Parameter names: `input_proj`, `output_proj` (Dense), `pos_embed/{row_embed, col_embed}` (h, E / 2),
`encoder_{l}/{self_attn, linear1, linear2, norm1, norm2}`,
`decoder_{l}/{learned_embed (T, E), self_attn, multihead_attn, linear1, linear2, norm1..3}`,
`decoder_norm`.
"""

import functools
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LAYER_NORM_EPS = 1e-5   # torch nn.LayerNorm (Flax's default is 1e-6)

# Reference init (spec §2.6): Xavier-uniform Linear weights, zero biases.
xavier_uniform = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
# torch MHA draws its packed (3E, E) in_proj with Xavier-uniform over the whole matrix, bound
# sqrt(6 / 4E); flax initialises each (E, heads, d) block flattened to (E, E), so scale 1/2 gives
# the same bound. The out projection is an nn.Linear, re-initialised like the others.
in_proj_init = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")
out_proj_init = xavier_uniform


@functools.lru_cache(maxsize=None)
def neighbour_mask(feature_size: int, neighbor_size: tuple[int, int]) -> np.ndarray:
  """(T, T) bool, T = feature_size², True where query t1 MAY attend to key t2.

  The reference's `generate_mask` blocks (−inf) every key within the (nh, nw) window centred on
  the query, clipped at the borders, the query itself included; this is its negation.
  """
  hm, wm = neighbor_size
  idx = np.arange(feature_size)
  near_h = np.abs(idx[:, None] - idx[None, :]) <= hm // 2   # (h1, h2)
  near_w = np.abs(idx[:, None] - idx[None, :]) <= wm // 2   # (w1, w2)
  blocked = near_h[:, None, :, None] & near_w[None, :, None, :]   # (h1, w1, h2, w2)
  allowed = ~blocked.reshape(feature_size ** 2, feature_size ** 2)
  allowed.setflags(write=False)
  return allowed


def feature_jitter(tokens: jnp.ndarray, noise: jnp.ndarray, scale: float) -> jnp.ndarray:
  """x + ε · ‖x‖₂ / C · scale per token (reference `add_jitter`).

  tokens: (B, T, C); noise: ε ~ N(0, 1) of the same shape. The norm runs over the C channels and
  is divided by C (not √C), as in the reference.
  """
  num_channels = tokens.shape[-1]
  norm = jnp.linalg.norm(tokens, axis=-1, keepdims=True)
  return tokens + noise * (norm / num_channels) * scale


def _attention(num_heads: int, dropout: float, precision, name: str):
  """torch nn.MultiheadAttention(E, heads, dropout); call attn(q, k, v, mask=, deterministic=)."""
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, dropout_rate=dropout, broadcast_dropout=False, precision=precision,
      kernel_init=in_proj_init, out_kernel_init=out_proj_init, name=name)


def _mask(allowed: Optional[np.ndarray]):
  """(T, T) allowed-mask -> (1, 1, T, T) broadcast over batch and heads (None: unmasked)."""
  return None if allowed is None else allowed[None, None]


def _feed_forward(x, dim_feedforward: int, dropout: float, train: bool, precision):
  """linear2(dropout(relu(linear1(x)))) of the reference layers (inside a compact method)."""
  dense = functools.partial(nn.Dense, kernel_init=xavier_uniform, precision=precision)
  h = nn.relu(dense(dim_feedforward, name="linear1")(x))
  h = nn.Dropout(dropout, deterministic=not train)(h)
  return dense(x.shape[-1], name="linear2")(h)


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, name=name)


class EncoderLayer(nn.Module):
  """Post-norm encoder layer: S = LN1(S + drop(MHA(S+P, S+P, S))); S = LN2(S + drop(FFN(S)))."""
  num_heads: int
  dim_feedforward: int
  dropout: float
  precision: Any = None

  @nn.compact
  def __call__(self, src, pos, mask, train: bool):
    drop = lambda h: nn.Dropout(self.dropout, deterministic=not train)(h)
    q = src + pos
    attn = _attention(self.num_heads, self.dropout, self.precision, "self_attn")
    src = _layer_norm("norm1")(src + drop(attn(q, q, src, mask=_mask(mask),
                                               deterministic=not train)))
    ffn = _feed_forward(src, self.dim_feedforward, self.dropout, train, self.precision)
    return _layer_norm("norm2")(src + drop(ffn))


class DecoderLayer(nn.Module):
  """Post-norm decoder layer with its own learned query table (spec §2.5 item 5).

  T = Q_l; T = LN1(T + drop(MHA(T+P, M+P, M))); T = LN2(T + drop(MHA(T+P, O+P, O)));
  T = LN3(T + drop(FFN(T))), with M the encoder memory and O the previous decoder output.
  """
  num_heads: int
  dim_feedforward: int
  dropout: float
  precision: Any = None

  @nn.compact
  def __call__(self, out, memory, pos, memory_mask, out_mask, train: bool):
    drop = lambda h: nn.Dropout(self.dropout, deterministic=not train)(h)
    num_tokens, hidden = pos.shape[-2:]
    queries = self.param("learned_embed", nn.initializers.normal(1.0), (num_tokens, hidden))
    tgt = jnp.broadcast_to(queries, out.shape)
    attn1 = _attention(self.num_heads, self.dropout, self.precision, "self_attn")
    tgt = _layer_norm("norm1")(tgt + drop(attn1(tgt + pos, memory + pos, memory,
                                                mask=_mask(memory_mask), deterministic=not train)))
    attn2 = _attention(self.num_heads, self.dropout, self.precision, "multihead_attn")
    tgt = _layer_norm("norm2")(tgt + drop(attn2(tgt + pos, out + pos, out, mask=_mask(out_mask),
                                                deterministic=not train)))
    ffn = _feed_forward(tgt, self.dim_feedforward, self.dropout, train, self.precision)
    return _layer_norm("norm3")(tgt + drop(ffn))


class PositionEmbedding(nn.Module):
  """(T, E) learned table: pos[h·fs + w] = concat(col_embed[w], row_embed[h]), column half first.

  Both tables are drawn U[0, 1) as in the reference (which re-initialises torch's N(0, 1)).
  """
  feature_size: int
  hidden_dim: int

  @nn.compact
  def __call__(self) -> jnp.ndarray:
    fs, half = self.feature_size, self.hidden_dim // 2
    row = self.param("row_embed", nn.initializers.uniform(1.0), (fs, half))
    col = self.param("col_embed", nn.initializers.uniform(1.0), (fs, half))
    grid = jnp.concatenate([jnp.broadcast_to(col[None, :, :], (fs, fs, half)),
                            jnp.broadcast_to(row[:, None, :], (fs, fs, half))], axis=-1)
    return grid.reshape(fs * fs, self.hidden_dim)


class UniADTransformer(nn.Module):
  """Feature maps F (B, h, w, C) float32 -> reconstruction R (B, h, w, C) float32.

  feature_size: h = w of F (the token grid; its square is T).
  neighbor_size: (nh, nw) blocked window; neighbor_mask: (encoder, decoder first attention,
    decoder second attention) switches, False leaves that attention unmasked.
  jitter_scale: scale of `feature_jitter`, applied when `jitter_noise` is given.
  Call with `train=True` for dropout (rng collection 'dropout').
  """
  feature_size: int
  hidden_dim: int = 256
  num_heads: int = 8
  num_encoder_layers: int = 4
  num_decoder_layers: int = 4
  dim_feedforward: int = 1024
  dropout: float = 0.1
  neighbor_size: Sequence[int] = (7, 7)
  neighbor_mask: Sequence[bool] = (True, True, True)
  jitter_scale: float = 5.0
  precision: Any = None

  @nn.compact
  def __call__(self, features: jnp.ndarray, jitter_noise: Optional[jnp.ndarray] = None, *,
               train: bool = False, return_intermediates: bool = False):
    """features (B, h, w, C); jitter_noise None or ε (B, T, C).

    Returns R (B, h, w, C), or with `return_intermediates` (R, {'jittered_tokens',
    'encoder_memory', 'decoder_output' (B, T, ·), 'pos_embed' (T, E)}) for parity tests.
    """
    b, h, w, c = features.shape
    if h != self.feature_size or w != self.feature_size:
      raise ValueError(f"features {features.shape}: expected a {self.feature_size}² grid")
    tokens = features.reshape(b, h * w, c)
    if jitter_noise is not None:
      tokens = feature_jitter(tokens, jitter_noise, self.jitter_scale)
    dense = functools.partial(nn.Dense, kernel_init=xavier_uniform, precision=self.precision)
    x = dense(self.hidden_dim, name="input_proj")(tokens)
    pos = PositionEmbedding(self.feature_size, self.hidden_dim, name="pos_embed")()

    allowed = neighbour_mask(self.feature_size, tuple(self.neighbor_size))
    enc_mask, dec_mask1, dec_mask2 = (allowed if on else None for on in self.neighbor_mask)
    layer_kw = dict(num_heads=self.num_heads, dim_feedforward=self.dim_feedforward,
                    dropout=self.dropout, precision=self.precision)
    memory = x
    for l in range(self.num_encoder_layers):
      memory = EncoderLayer(**layer_kw, name=f"encoder_{l}")(memory, pos, enc_mask, train)
    out = memory
    for l in range(self.num_decoder_layers):
      out = DecoderLayer(**layer_kw, name=f"decoder_{l}")(out, memory, pos, dec_mask1,
                                                          dec_mask2, train)
    out = _layer_norm("decoder_norm")(out)
    recon = dense(c, name="output_proj")(out).reshape(b, h, w, c)
    if return_intermediates:
      return recon, {"jittered_tokens": tokens, "encoder_memory": memory, "decoder_output": out,
                     "pos_embed": pos}
    return recon


def tie_initial_clones(params: dict) -> dict:
  """The reference's deep-copy init (spec §2.6): every encoder layer starts with encoder 0's
  attention in_proj, every decoder layer with decoder 0's in_proj of both attentions and its
  query table. Only the initial values are tied: every copy is its own array (a train state
  donated to a jitted step must not hold one buffer twice), updated separately."""
  params = jax.tree.map(lambda a: a, params)   # a fresh container tree, leaves shared
  in_proj = ("query", "key", "value")
  for prefix, attentions, extra in (("encoder_", ("self_attn",), ()),
                                    ("decoder_", ("self_attn", "multihead_attn"),
                                     ("learned_embed",))):
    layers = sorted((k for k in params if re.fullmatch(prefix + r"\d+", k)),
                    key=lambda k: int(k[len(prefix):]))
    first = params[layers[0]]
    for name in layers[1:]:
      layer = dict(params[name])
      for attn in attentions:
        layer[attn] = {**layer[attn],
                       **{p: jax.tree.map(jnp.copy, first[attn][p]) for p in in_proj}}
      layer.update({p: jnp.copy(first[p]) for p in extra})
      params[name] = layer
  return params
