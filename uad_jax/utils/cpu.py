"""What this CPU is, from /proc/cpuinfo (XLA's CPU speed depends a lot on its vector ISA)."""

import platform
from pathlib import Path


def _cpuinfo() -> str:
  try:
    return Path("/proc/cpuinfo").read_text()
  except OSError:
    return ""


def vector_isa() -> str:
  """'AVX-512', 'AVX2' or 'other': the widest vector ISA the CPU reports."""
  info = _cpuinfo()
  return "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "other"


def model_name() -> str:
  """The CPU model as the kernel names it (else the platform's machine type)."""
  return next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
               if line.startswith("model name")), platform.processor() or platform.machine())
