"""The results report: tables, bias analysis, figures and index.html from `uad_jax.eval` outputs.

  python -m uad_jax.report --runs WORKDIR [WORKDIR ...] --out REPORT_DIR

or `write_report(runs, out_dir)`. Inputs, tables and statistics: `load`, `tables`, `stats`.
"""

from uad_jax.report.load import load_cohorts
from uad_jax.report.tables import Options
from uad_jax.report.write import Report, write_report

__all__ = ["Options", "Report", "load_cohorts", "write_report"]
