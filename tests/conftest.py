"""Shared pytest setup: grain's absl flags, one CPU device by default."""

import absl.flags

absl.flags.FLAGS.mark_as_parsed()
