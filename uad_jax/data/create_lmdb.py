"""Command line: build the LMDB slice database of a split CSV.

  python -m uad_jax.data.create_lmdb -d train_T1w.csv -p out_dir

writes `out_dir/slices/` (`data.mdb`, `lock.mdb`). Same flags as the reference's
`utils/create_LMDB.py`; `--reference-compatible` writes the reference's pickled float64 format. Errors are one line and
exit code 2 (`--debug` shows the traceback).
"""

import argparse
import sys

from uad_jax import cli
from uad_jax.data.lmdb_writer import write_slice_database
from uad_jax.errors import UadError


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m uad_jax.data.create_lmdb", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("-d", "--dataset", required=True, help="split CSV with a 'Path' column")
  p.add_argument("-p", "--path", required=True, help="output folder; the database is PATH/slices")
  p.add_argument("--reference-compatible", action="store_true",
                 help="write pickled float64 slices without header, as the reference tool does")
  p.add_argument("--clip-percentiles", type=float, nargs=2, metavar=("PMIN", "PMAX"),
                 help="clip each volume to these percentiles before min-max scaling (off in the "
                      "reference)")
  p.add_argument("--map-size", type=int, help="initial LMDB map size in bytes (grows as needed)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--debug", action="store_true", help="show the traceback of errors")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    db = write_slice_database(args.dataset, args.path,
                              reference_compatible=args.reference_compatible,
                              clip_percentiles=args.clip_percentiles, map_size=args.map_size,
                              progress=not args.no_progress)
  except UadError as e:
    return cli.report_error("create_lmdb", e, debug=args.debug)
  print(f"wrote {db}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
