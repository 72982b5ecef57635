"""A real single-node SLURM on localhost for the cluster test (Debian slurm-wlm + munge).

Writes /etc/slurm/slurm.conf (marked as ours; an existing foreign one is never touched),
starts munged, slurmctld and slurmd with state in a temporary folder, and stops them after.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MARK = "# histoalign-wsi test cluster"
CONF = Path("/etc/slurm/slurm.conf")
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "sinfo")


def available() -> str | None:
    """Why the cluster cannot run here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return f"SLURM binaries missing: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the test cluster needs root (it runs slurmd)"
    if CONF.exists() and MARK not in CONF.read_text():
        return f"{CONF} belongs to a real cluster; not touching it"
    return None


def _conf(state: Path) -> str:
    host = socket.gethostname()
    return f"""{MARK}
ClusterName=histoalign
SlurmctldHost={host}(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmdSpoolDir={state}/spool
StateSaveLocation={state}/state
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MinJobAge=600
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs=8 Boards=1 SocketsPerBoard=1 CoresPerSocket=8 ThreadsPerCore=1 \
RealMemory=32000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _start_munge() -> int | None:
    """Start munged unless one runs; the pid of the one we started (ours to stop)."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return None
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create"], check=True)
        shutil.chown(key, "munge", "munge")
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    pidfile = Path("/run/munge/munged.pid")  # munged's own pid file: the daemon, not its parent
    pidfile.unlink(missing_ok=True)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    for _ in range(100):
        text = pidfile.read_text().strip() if pidfile.is_file() else ""
        if text.isdigit() and Path(f"/proc/{text}").exists():
            return int(text)
        time.sleep(0.05)
    return None


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)


def _stop(state: Path, munged: int | None, env: dict[str, str]) -> None:
    """Stop everything this test started, by pid: jobs, slurmstepd, slurmd, slurmctld,
    and munged if we started it. Safe to call twice (finally, atexit, SIGTERM)."""
    subprocess.run(["scancel", "--user", "root"], capture_output=True, env=env, timeout=20)
    pids = [
        int(p.read_text().strip()) for name in ("slurmd.pid", "slurmctld.pid") if (p := state / name).exists()
    ]
    steps = subprocess.run(["pgrep", "-x", "slurmstepd"], capture_output=True, text=True).stdout.split()
    for pid in [*map(int, steps), *pids, *([munged] if munged else [])]:
        _kill(pid)
    time.sleep(1)
    if CONF.exists() and MARK in CONF.read_text():
        CONF.unlink()


@contextmanager
def slurm_cluster(state: Path) -> Iterator[Path]:
    """Run the cluster while the block runs; yields the slurmctld log path. The daemons
    are stopped on every exit: normal, an exception, Ctrl-C, or SIGTERM (a timeout)."""
    for d in ("spool", "state"):
        (state / d).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    munged = _start_munge()
    stop = functools.partial(_stop, state, munged, env)
    atexit.register(stop)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        stop()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(_conf(state))
    try:
        subprocess.run(["slurmctld", "-i"], check=True, env=env)
        subprocess.run(["slurmd"], check=True, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout
            if "idle" in out:
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"SLURM node did not come up: {(state / 'slurmctld.log').read_text()[-2000:]}")
        yield state / "slurmctld.log"
    finally:
        stop()
        atexit.unregister(stop)
        signal.signal(signal.SIGTERM, previous)
