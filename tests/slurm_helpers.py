"""A real single-node Slurm for tests: munged, slurmctld and slurmd as root, all state in a temp dir.

Needs Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them when root). Memory is enforced
without cgroups or systemd: ``proctrack/linuxproc`` + ``jobacct_gather/linux`` with ``OverMemoryKill``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from cluster_helpers import free_port, stop_groups

MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
MUNGE_PID = Path("/run/munge/munged.pid")


def slurm_missing() -> str | None:
    """Why a local Slurm cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "a local Slurm needs root"
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (apt-get install slurm-wlm munge)"
    return None


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal")


class LocalSlurm:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started_munge = False

    def write_conf(self) -> None:
        for d in ("state", "spool", "logs"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        real = max(1024, _mem_total_mib() - 2048)
        self.conf.write_text(f"""
ClusterName=batchalign-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/logs/slurmctld.log
SlurmdLogFile={self.root}/logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherParams=OverMemoryKill
JobAcctGatherFrequency=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        self._stepds_before = _stepds()
        self.write_conf()
        if not _munge_works():
            MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
            shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
            for d in ("/var/lib/munge", "/var/log/munge"):
                Path(d).mkdir(parents=True, exist_ok=True)
                shutil.chown(d, "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", _tool("munged")], check=True, timeout=20)
            self.started_munge = True
            deadline = time.monotonic() + 10
            while not _munge_works():
                if time.monotonic() > deadline:
                    raise RuntimeError("munged did not start")
                time.sleep(0.1)
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.root / "logs" / f"{daemon}.out", "wb")
            self.procs.append(subprocess.Popen([_tool(daemon), "-D", "-f", str(self.conf)], env=self.env,
                                               stdout=log, stderr=log, start_new_session=True))
            time.sleep(0.5)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout
            if out.strip() in ("idle", "mixed", "allocated"):
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited {p.returncode}: " + self.logs())
            time.sleep(0.2)
        raise RuntimeError(f"Slurm node not idle after 60 s: {out!r} " + self.logs())

    def logs(self) -> str:
        text = []
        for f in sorted((self.root / "logs").glob("*")):
            text.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-2000:])
        return "\n".join(text)

    def jobs(self) -> list[dict[str, str]]:
        """Every job Slurm still remembers (MinJobAge keeps finished ones), as scontrol shows them."""
        out = subprocess.run(["scontrol", "-o", "show", "job"], env=self.env, capture_output=True, text=True).stdout
        jobs = []
        for line in out.splitlines():
            if not line.startswith("JobId="):
                continue
            fields = {}
            for token in line.split():
                k, _, v = token.partition("=")
                fields[k] = v
            jobs.append(fields)
        return jobs

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True, timeout=10)
        deadline = time.monotonic() + 20  # let slurmd see its jobs end, or their stepds wait for ever
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True).stdout
            if not out.strip():
                break
            time.sleep(0.2)
        stop_groups(self.procs)
        if self.started_munge:  # leave the machine as we found it
            try:
                os.kill(int(MUNGE_PID.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                pass
        for pid in _stepds() - getattr(self, "_stepds_before", set()):
            try:  # a step daemon of ours still retrying a slurmctld that is gone
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stepds() -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "slurmstepd":
                    out.add(int(d.name))
            except OSError:
                continue
    return out
