"""Exceptions with messages that name the offending file, key or config entry."""


class UadError(Exception):
  """Base class of every error uad_jax raises on purpose."""


class DataError(UadError, ValueError):
  """Bad input data: missing/corrupt file, wrong shape, NaN, constant volume, bad CSV or LMDB."""


class ConfigError(UadError, ValueError):
  """Bad configuration: unknown key, wrong type, inconsistent settings."""


class EvaluationError(UadError, ValueError):
  """Inputs the evaluation protocol cannot score (shape mismatch, NaN scores, empty cohort...)."""


class TrainingError(UadError, RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message names the step."""
