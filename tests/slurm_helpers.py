"""A real single-node Slurm for the tests (Debian's ``slurm-wlm`` and ``munge``): munged, slurmctld and slurmd in
the foreground with a throw-away configuration, state and logs in one folder, stopped (jobs cancelled, daemons
killed) on exit. Clients reach it through ``SLURM_CONF``, which :func:`single_node_cluster` yields."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from helpers import free_port

#: The programs the cluster needs: the daemons, and the clients submitit and the executor call.
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scancel", "sinfo")


def missing_programs() -> list[str]:
    """The programs of :data:`PROGRAMS` that are not installed."""
    return [p for p in PROGRAMS if shutil.which(p) is None and not Path("/usr/sbin", p).is_file()]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))  # the daemons live in /usr/sbin, not always on PATH


def _config(folder: Path, munge_socket: Path) -> str:
    host = socket.gethostname().split(".")[0]  # what slurmd takes as its node name (hostname -s)
    cpus = min(2, os.cpu_count() or 1)  # more than the machine has would drain the node
    return "\n".join([
        "ClusterName=dgsttest",
        f"SlurmctldHost={host}(127.0.0.1)",  # the loopback address: no name resolution needed
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",  # memory is not scheduled: jobs without --mem run side by side
        "ReturnToService=2",
        "KillWait=0",  # scancel: SIGKILL right after the SIGTERM that submitit's job process ignores
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _tail(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(folder.glob("*.log")))


@contextmanager
def single_node_cluster(folder: Path) -> Iterator[dict[str, str]]:
    """A Slurm cluster of this machine alone, its files in ``folder``; yields the clients' environment.

    The node is idle when this yields (``sinfo``). On exit every job is cancelled, then the daemons are killed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "munge"):
        (folder / sub).mkdir(exist_ok=True)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = folder / "munge" / "munge.sock"
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, munge_socket), encoding="utf-8")
    env = {"SLURM_CONF": str(conf)}
    client_env = {**os.environ, **env}
    with ExitStack() as stack:
        daemons: list[subprocess.Popen] = []

        def start(argv: list[str], log: str) -> None:
            out = stack.enter_context(open(folder / log, "ab"))
            daemons.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=client_env))

        @stack.callback
        def stop() -> None:
            try:  # cancel the jobs and wait for their processes to end: slurmd leaves them running otherwise
                subprocess.run([_program("scancel"), f"--user={os.getuid()}"], env=client_env, timeout=30, check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and subprocess.run(
                    [_program("squeue"), "--noheader", "--states=RUNNING,COMPLETING"], env=client_env,
                    capture_output=True, text=True, timeout=30, check=False,
                ).stdout.strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass  # a controller that does not answer: its daemons are killed all the same
            finally:
                for process in reversed(daemons):  # slurmd, slurmctld, then munged
                    process.kill()
                    process.wait(timeout=30)

        m = folder / "munge"
        start([_program("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
               f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'seed'}"],
              "munged.out.log")
        deadline = time.monotonic() + 30
        while not munge_socket.exists():
            assert daemons[0].poll() is None and time.monotonic() < deadline, _tail(folder) + _tail(m)
            time.sleep(0.1)
        start([_program("slurmctld"), "-D", "-f", str(conf)], "slurmctld.out.log")
        start([_program("slurmd"), "-D", "-f", str(conf)], "slurmd.out.log")
        deadline = time.monotonic() + 60
        while True:
            states = subprocess.run([_program("sinfo"), "--noheader", "--format=%T"], env=client_env,
                                    capture_output=True, text=True, timeout=30, check=False).stdout.split()
            if states == ["idle"]:
                break
            assert all(d.poll() is None for d in daemons), f"a Slurm daemon ended:\n{_tail(folder)}"
            assert time.monotonic() < deadline, f"the node is not idle after 60 s ({states}):\n{_tail(folder)}"
            time.sleep(0.5)
        yield env
