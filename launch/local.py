"""Start N cooperating processes of a uad_jax command on this machine (multi-process testing).

  python launch/local.py --num_processes 2 --devices_per_process 2 -- \
      -m uad_jax.train --config configs/andi.py:demo --workdir runs/andi_mp

Each process gets `UAD_COORDINATOR`, `UAD_NUM_PROCESSES`, `UAD_PROCESS_ID` (read by
`uad_jax.engine.distributed`) and, on CPU, `--xla_force_host_platform_device_count`. The exit code
is the first non-zero exit code of the processes; if one fails the others are stopped.
"""

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="CPU devices per process (XLA host platform device count)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="arguments of `python` after `--`, e.g. -m uad_jax.train ...")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command after --, e.g. -- -m uad_jax.train --config ...")
  coordinator = f"127.0.0.1:{args.port or free_port()}"
  procs = []
  for i in range(args.num_processes):
    env = dict(os.environ, UAD_COORDINATOR=coordinator, UAD_NUM_PROCESSES=str(args.num_processes),
               UAD_PROCESS_ID=str(i))
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                        f"{args.devices_per_process}").strip()
    procs.append(subprocess.Popen([sys.executable] + command, env=env))
  while True:
    codes = [p.poll() for p in procs]
    failed = [c for c in codes if c not in (None, 0)]
    if failed or all(c == 0 for c in codes):
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.terminate()
    p.wait()
  return failed[0] if failed else 0


if __name__ == "__main__":
  sys.exit(main())
