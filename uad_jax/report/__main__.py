"""Writes the results report of one or more evaluated runs.

  python -m uad_jax.report --runs DIR [DIR ...] --out REPORT_DIR

DIR: a training workdir (its newest `eval/step_<N>`), an `eval/step_<N>` folder or one cohort
folder of `python -m uad_jax.eval`; runs of any methods, modalities and cohorts are combined.
"""

import argparse
import sys

from uad_jax.errors import UadError
from uad_jax.report import stats
from uad_jax.report.tables import Options
from uad_jax.report.write import write_report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m uad_jax.report", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", nargs="+", required=True, metavar="DIR",
                      help="workdirs, eval/step_<N> folders or cohort folders")
  parser.add_argument("--out", required=True, metavar="REPORT_DIR",
                      help="report folder (replaced if it exists)")
  parser.add_argument("--resamples", type=int, default=stats.N_RESAMPLES,
                      help="bootstrap resamples (default %(default)s)")
  parser.add_argument("--seed", type=int, default=stats.SEED,
                      help="bootstrap seed (default %(default)s)")
  parser.add_argument("--min-stratum", type=int, default=stats.MIN_STRATUM,
                      help="fewest subjects for a stratum to get a number (default %(default)s)")
  parser.add_argument("--no-tensorboard", action="store_true",
                      help="do not add the figures to the runs' TensorBoard folders")
  args = parser.parse_args(argv)
  if args.resamples < 1 or args.min_stratum < 1:
    parser.error("--resamples and --min-stratum must be positive")
  try:
    report = write_report(args.runs, args.out,
                          options=Options(args.resamples, args.seed, args.min_stratum),
                          write_tensorboard=not args.no_tensorboard)
  except UadError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report.summary_markdown)
  for events in report.tensorboard:
    print(f"TensorBoard: {events}")
  print(f"report written to {report.index}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
