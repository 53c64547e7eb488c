"""Start N processes of one command on this machine, as one JAX job over loopback.

    python -m jaxnet.launch --nproc 2 --devices-per-process 2 -- python -m experiments.vision --mesh data=4

Each process gets ``JAXNET_COORDINATOR`` (``127.0.0.1:PORT``), ``JAXNET_NUM_PROCESSES`` and
``JAXNET_PROCESS_ID``, which ``jaxnet.parallel.initialize()`` (called by every experiment's
``prepare_process``) hands to ``jax.distributed.initialize``; with ``--devices-per-process D``
also ``JAX_NUM_CPU_DEVICES=D``. Every output line is prefixed with ``[i]``. When a process
fails, the others are stopped (SIGTERM, then SIGKILL after ``--grace-s``) and the launcher exits
with the failed process's status, saying which one it was.

Several hosts: run the same command on each host with the variables set by hand, one process per
host (or per accelerator), the coordinator being host 0's address::

    JAXNET_COORDINATOR=host0:12355 JAXNET_NUM_PROCESSES=2 JAXNET_PROCESS_ID=0 python -m experiments.lm --mesh data=16
    JAXNET_COORDINATOR=host0:12355 JAXNET_NUM_PROCESSES=2 JAXNET_PROCESS_ID=1 python -m experiments.lm --mesh data=16
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(prefix + line)
        out.flush()
    stream.close()


def launch(command: list[str], nproc: int, *, devices_per_process: int | None = None,
           coordinator: str | None = None, grace_s: float = 10.0, out=None) -> int:
    """Runs ``command`` as ``nproc`` processes of one job; returns the job's exit status (0 when
    every process succeeded, else the first failure's status, 128 + N for a signal N)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if not command:
        raise ValueError("no command to launch: put it after '--'")
    out = out or sys.stdout
    coordinator = coordinator or f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(nproc):
        env = {**os.environ, "JAXNET_COORDINATOR": coordinator, "JAXNET_NUM_PROCESSES": str(nproc),
               "JAXNET_PROCESS_ID": str(i), "PYTHONUNBUFFERED": "1"}
        if devices_per_process is not None:
            env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
        p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1)
        threading.Thread(target=_copy, args=(p.stdout, f"[{i}] ", out), daemon=True).start()
        procs.append(p)
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]  # every one polled (any() would stop at the first running)
            if all(code is not None for code in codes):
                break
            failed = next(((i, code) for i, code in enumerate(codes) if code not in (None, 0)), None)
            if failed is not None:
                i, code = failed
                why = f"signal {-code}" if code < 0 else f"status {code}"
                out.write(f"[launch] process {i} exited with {why}; stopping the other {nproc - 1}\n")
                out.flush()
                status = 128 - code if code < 0 else code
                _stop(procs, grace_s)
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs, grace_s)
        return 130
    for i, p in enumerate(procs):
        code = p.wait()
        if code != 0 and status == 0:
            status = 128 - code if code < 0 else code
            out.write(f"[launch] process {i} exited with {'signal ' + str(-code) if code < 0 else 'status ' + str(code)}\n")
    time.sleep(0.05)  # let the copying threads flush the last lines
    return status


def _stop(procs, grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        print("usage: python -m jaxnet.launch --nproc N [--devices-per-process D] -- COMMAND ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m jaxnet.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, required=True, help="processes to start")
    parser.add_argument("--devices-per-process", type=int, default=None,
                        help="JAX_NUM_CPU_DEVICES for each process (CPU devices per process)")
    parser.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (default: a free loopback port)")
    parser.add_argument("--grace-s", type=float, default=10.0,
                        help="seconds the others get after a failure before SIGKILL (default: %(default)s)")
    args = parser.parse_args(argv[:split])
    return launch(argv[split + 1:], args.nproc, devices_per_process=args.devices_per_process,
                  coordinator=args.coordinator, grace_s=args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
