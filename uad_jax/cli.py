"""What every command-line entry point shares: one-line errors, `--debug`, checked configs.

A deliberate error (`uad_jax.errors.UadError`: a missing path, an unknown config key, a missing
calibration or step, corrupt data) is one line on stderr, `<prog>: error: <message>`, and exit
code 2. `--debug` (or the environment variable `UAD_DEBUG=1`) shows the traceback instead.

For the absl entry points (`uad_jax.train`, `uad_jax.eval`) the `--config` flag is checked
before absl parses it: the config file and preset must exist, every `--config.KEY=VALUE` must
name an existing key (new test cohorts `--config.eval.cohorts.NAME.csv=...` / `.lesion=...`
are added), and after parsing every value must have the type of the preset's default
(`--config.model.ch_mult=foo` is refused). `--print_config` prints every key with its value.
"""

import difflib
import os
import re
import sys
import traceback

import ml_collections
from absl import app, flags

from uad_jax.engine.config import REPO_ROOT, check_types, flatten, load_config
from uad_jax.errors import ConfigError, UadError

DEBUG_ENV = "UAD_DEBUG"
_COHORT_KEY = re.compile(r"^eval\.cohorts\.([A-Za-z0-9_\-]+)\.(csv|lesion)$")


def config_help() -> str:
  """`--config` help: the config files of `configs/` and their presets."""
  lines = ["configs/<method>.py[:preset]; the file alone is the paper's settings. Presets:"]
  for path in sorted((REPO_ROOT / "configs").glob("*.py")):
    presets = re.findall(r'preset == "(\w+)"', path.read_text())
    if presets:
      lines.append(f"  configs/{path.name}: " + ", ".join(f":{p}" for p in presets))
  lines.append("Override any value with --config.KEY=VALUE; list every key with its value: "
               "--config configs/andi.py:demo --print_config")
  return "\n".join(lines)


def define_flags(module_name: str) -> None:
  """`--print_config` and `--debug`, listed in `--help` of the entry point `module_name`."""
  module_name = sys.argv[0] if module_name == "__main__" else module_name   # as absl does
  flags.DEFINE_bool("print_config", False, "print every config key with its value and exit",
                    module_name=module_name)
  flags.DEFINE_bool("debug", False, f"show tracebacks of errors (or set {DEBUG_ENV}=1)",
                    module_name=module_name)


def _debug(argv) -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv


def report_error(prog: str, error: BaseException, *, debug: bool = False) -> int:
  """Prints a deliberate error in one line (after its traceback with `debug` or UAD_DEBUG=1);
  returns the exit code, 2."""
  if debug or _debug([]):
    traceback.print_exception(error)
  message = " ".join(str(error).split())   # messages of nested errors may span lines
  print(f"{prog}: error: {message}", file=sys.stderr)
  return 2


def fail(prog: str, error: BaseException, argv) -> None:
  sys.exit(report_error(prog, error, debug=_debug(argv)))


def run_absl(main, *, prog: str, config_flag: str | None = "config") -> None:
  """`absl.app.run(main)` with one-line errors and, when the entry point has one, a checked
  config flag."""
  def parse(argv):
    try:
      if config_flag is None:
        try:
          return flags.FLAGS(argv)
        except flags.Error as e:
          raise ConfigError(str(e)) from e
      return _parse_flags(argv, config_flag)
    except UadError as e:
      fail(prog, e, argv)

  def guarded(argv):
    try:
      return main(argv)
    except UadError as e:
      fail(prog, e, sys.argv)

  app.run(guarded, flags_parser=parse)


def _config_spec(argv, name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _parse_flags(argv, name: str):
  """absl flag parsing after our own checks of `--config` and its overrides."""
  if any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
    flags.FLAGS.mark_as_parsed()
    app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True, exitcode=0)
  spec = _config_spec(argv[1:], name)
  if spec is None:
    raise ConfigError(f"--{name} is required, e.g. --{name} configs/andi.py:demo")
  defaults = load_config(spec)
  keys = flatten(defaults)
  kept, cohorts = [argv[0]], {}
  for arg in argv[1:]:
    if not arg.startswith(f"--{name}."):
      kept.append(arg)
      continue
    key, has_value, value = arg[len(name) + 3:].partition("=")
    match = _COHORT_KEY.match(key)
    if match and match.group(1) not in defaults.eval.cohorts:
      if not has_value:
        raise ConfigError(f"--{name}.{key} needs a value (--{name}.{key}=...)")
      cohorts.setdefault(match.group(1), {})[match.group(2)] = value
      continue
    if key not in keys and not any(k.startswith(key + ".") for k in keys):
      close = difflib.get_close_matches(key, keys, n=3)
      raise ConfigError(f"--{name}.{key}: no such key in {spec}"
                        + (f"; did you mean {', '.join(close)}?" if close else "")
                        + f" (list them: --{name} {spec} --print_config)")
    kept.append(arg)
  sys.argv[:] = kept   # config_flags reads its overrides from sys.argv
  try:
    rest = flags.FLAGS(kept)
  except (flags.Error, ValueError, KeyError, AttributeError, TypeError) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    raise ConfigError(lines[-1] if lines else type(e).__name__) from e
  config = flags.FLAGS[name].value
  _add_cohorts(config, cohorts)
  check_types(config, defaults)
  if flags.FLAGS.print_config:
    for key, value in flatten(config).items():
      print(f"{key} = {value!r}")
    sys.exit(0)
  return rest


def _add_cohorts(config, cohorts: dict) -> None:
  """Adds the test cohorts named only on the command line (`csv` required, `lesion`: true)."""
  for cohort, fields in cohorts.items():
    if "csv" not in fields:
      raise ConfigError(f"new cohort {cohort!r} needs --config.eval.cohorts.{cohort}.csv=PATH")
    lesion = fields.get("lesion", "true").lower()
    if lesion not in ("true", "false", "1", "0"):
      raise ConfigError(f"--config.eval.cohorts.{cohort}.lesion={fields['lesion']}: "
                        "expected true or false")
    with config.unlocked():
      config.eval.cohorts[cohort] = ml_collections.ConfigDict(
          {"csv": fields["csv"], "lesion": lesion in ("true", "1")})

