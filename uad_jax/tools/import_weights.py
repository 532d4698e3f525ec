"""Imports torchvision ImageNet weights for a backbone into an orbax checkpoint directory.

  python -m uad_jax.tools.import_weights --arch wide_resnet50_2 --src FILE --out DIR

with FILE = wide_resnet50_2-95faca4d.pth, then set `model.backbone_weights=DIR`. The file's
sha256 must identify the torchvision file the paper used (e.g. IMAGENET1K_V1, not V2); anything
else is refused unless `--force`. Only the stages up to `--until` (default: the deepest tap any
method uses) are kept.

Sources:
* `.pth` (torchvision's file): needs torch (`pip install torch==2.13.0`, CPU build suffices).
* `.safetensors` / `.npz` (no torch needed): the same state_dict converted elsewhere. A converted
  file cannot carry the .pth's hash itself, so it may name its source: safetensors metadata
  `source_file` / `source_sha256`, or npz entries `__source_file__` / `__source_sha256__`
  (0-d strings). Without them the converted file's own hash is checked (and fails). E.g., where
  torch is installed:

    import hashlib, torch, safetensors.torch as st
    p = "wide_resnet50_2-95faca4d.pth"
    st.save_file({k: v.contiguous() for k, v in torch.load(p).items()}, "wrn50_2.safetensors",
                 metadata={"source_file": p,
                           "source_sha256": hashlib.sha256(open(p, "rb").read()).hexdigest()})
"""

import argparse
import logging
import sys
from pathlib import Path

from uad_jax.convert.torchvision import torchvision_to_flax
from uad_jax.convert.weight_files import read_state_dict
from uad_jax.errors import DataError, UadError
from uad_jax.utils.checksum import file_sha256
from uad_jax.networks.backbones import (BACKBONES, REFERENCE_NAMES, Backbone,
                                        check_torchvision_hash, get_backbone,
                                        save_backbone_weights)

def import_weights(src, out, arch: "str | Backbone", *, until: str | None = None,
                   force: bool = False, prefix: str = "") -> dict:
  """Reads, checks, converts and writes; returns the sidecar written to `out`/backbone.json."""
  src = Path(src)
  if not src.is_file():
    raise DataError(f"{src}: no such weight file")
  backbone = get_backbone(arch)
  until = until or backbone.default_until
  module = backbone.module((until,))
  file_sha = file_sha256(src)
  state, meta = read_state_dict(src)
  # A converted file vouches for its .pth source; otherwise the file itself is the source.
  tv_name = meta.get("source_file", src.name)
  tv_sha = meta.get("source_sha256", file_sha).lower()
  known = check_torchvision_hash(backbone, tv_sha, file_name=tv_name, force=force)
  variables = torchvision_to_flax(state, module, prefix=prefix)
  provenance = {
      "source_file": src.name, "source_sha256": file_sha,
      "torchvision_file": known.file_name if known else None,
      "torchvision_weights": known.enum if known else None,
      "torchvision_sha256": tv_sha, "paper_weights": bool(known and known.paper),
      "forced": bool(force and not (known and known.paper)), "prefix": prefix,
  }
  return save_backbone_weights(out, backbone, until, variables, provenance)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m uad_jax.tools.import_weights", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", required=True,
                      choices=sorted(BACKBONES) + sorted(REFERENCE_NAMES))
  parser.add_argument("--src", required=True, type=Path, help=".pth, .safetensors or .npz")
  parser.add_argument("--out", required=True, type=Path, help="output directory (replaced)")
  parser.add_argument("--until", default=None,
                      help="deepest stage to keep, e.g. layer3 or features.4 (default: the "
                           "deepest tap any method uses for this arch)")
  parser.add_argument("--prefix", default="",
                      help="read only keys with this prefix, stripped (e.g. "
                           "'extractor.backbone.' in a reference training checkpoint)")
  parser.add_argument("--force", action="store_true",
                      help="import a file that is not the paper's torchvision file")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  try:
    sidecar = import_weights(args.src, args.out, args.arch, until=args.until, force=args.force,
                             prefix=args.prefix)
  except UadError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out.resolve()}: {sidecar['arch']} up to {sidecar['until']}, "
        f"{sidecar['num_tensors']} tensors {sidecar['num_values']}, weights "
        f"{sidecar['torchvision_weights'] or 'UNKNOWN'} "
        f"({sidecar['torchvision_file'] or 'forced'})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
