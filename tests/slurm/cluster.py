"""A throwaway single-node SLURM cluster (munged + slurmctld + slurmd) under a temporary folder, for tests.

Used by tests/test_slurm.py; also a command line tool for trying the SLURM profile by hand:

    python tests/slurm/cluster.py run -- snakemake --workflow-profile profiles/slurm \\
        --profile tests/slurm/profile --configfile configs/tiny.yaml
    python tests/slurm/cluster.py up /tmp/sl       # start and leave running; prints the env to use
    python tests/slurm/cluster.py down /tmp/sl     # stop what `up` started

Nothing global is touched: the packages are installed with apt when missing (root only), and every
file (slurm.conf, munge key and socket, state, spool, pid and log files) lives in the cluster's folder.
The daemons listen on free ports picked at start. `stop()` cancels this cluster's jobs and ends exactly
the three daemons it started, by the PIDs in their pid files (checked against the process name first),
then any process still left from this cluster's jobs (its environment names this cluster's slurm.conf).

Why the odd bits:
- the slurm jobstep executor plugin strips every SLURM_* variable, SLURM_CONF included, before it calls
  `srun` inside a job, so SLURM's client commands are wrapped (bin/ first on PATH) to export SLURM_CONF;
- the node declares 2 fake GPUs (plain files stand in for the devices), so jobs that ask `--gpus=1` are
  scheduled and counted as on a real cluster instead of being refused; they compute on the CPU;
- `SlurmdParameters=config_overrides` lets the node declare more memory than the machine has, so the
  profile's real memory requests are accepted on a small CI machine (memory is not enforced here).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")  # start order; stopped in reverse
CLIENT_COMMANDS = ("sbatch", "srun", "squeue", "scancel", "sinfo", "scontrol", "sacct")
NEEDED = ("munged", "slurmctld", "slurmd", *CLIENT_COMMANDS)
APT_PACKAGES = ("slurm-wlm", "munge")
FAKE_GPUS = 2
FAKE_GPU_MODEL = "testgpu"  # jobs may ask --gpus=testgpu:1 (the gpu_model resource)
NODE_MEMORY_MB = 64000
MIN_JOB_AGE_S = 7200


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be installed here (not root, or no apt-get)."""


def _missing() -> list[str]:
    return [cmd for cmd in NEEDED if shutil.which(cmd, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]


def ensure_installed(log=print) -> None:
    """Install slurm-wlm and munge with apt when a daemon or client command is missing.

    Raises SlurmUnavailable when that cannot work here (not root, no apt-get); raises RuntimeError when
    apt itself fails (a real error on CI, not a reason to skip).
    """
    missing = _missing()
    if os.geteuid() != 0:
        raise SlurmUnavailable("a test SLURM cluster needs root (slurmd runs jobs as root)")
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    # Keep the packages' init scripts from starting system-wide munge/slurm daemons during the install
    # (the standard Debian mechanism); only when no policy is in place already.
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    try:
        if own_policy:
            policy.write_text("#!/bin/sh\n# instsim tests/slurm: no service starts while installing SLURM\nexit 101\n")
            policy.chmod(0o755)
        log(f"installing {' '.join(APT_PACKAGES)} with apt-get ({', '.join(missing)} missing)")
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:  # stale package lists: update once and try again
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
            proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(install)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    if _missing():
        raise RuntimeError(f"apt-get installed {APT_PACKAGES} but {', '.join(_missing())} still missing")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _which(cmd: str) -> str:
    path = shutil.which(cmd, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        raise SlurmUnavailable(f"{cmd} not found")
    return path


def _pid_alive_as(pid: int, name: str) -> bool:
    """Whether process `pid` exists and is the daemon `name` (guards against a reused PID)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm == name[:15]


@contextlib.contextmanager
def interrupt_on_sigterm():
    """While active, SIGTERM (e.g. from `timeout`) raises KeyboardInterrupt in the main thread instead of
    ending Python on the spot, so that `finally` blocks and pytest's fixture teardown still stop the daemons."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class TestCluster:
    """One node, one partition, under `root`. Use as a context manager or call start()/stop()."""

    __test__ = False  # not a pytest test class

    def __init__(self, root: Path | str | None = None, cpus: int | None = None):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="instsim-slurm-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)  # munged refuses group/world-writable folders
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus or len(os.sched_getaffinity(0))  # the CPUs this process may use (containers, CI)
        self.partition = "test"
        self.conf = self.root / "slurm.conf"
        self.bin = self.root / "bin"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.started: dict[str, int] = {}

    # ---- paths -------------------------------------------------------------------------------------------
    def pid_file(self, daemon: str) -> Path:
        return self.root / "run" / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"

    @property
    def env(self) -> dict[str, str]:
        """The environment to run snakemake (and any SLURM command) against this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{self.bin}:{env.get('PATH', '')}"
        return env

    # ---- configuration ---------------------------------------------------------------------------------
    def write_config(self) -> None:
        for sub in ("munge", "run", "log", "state", "spool", "bin"):
            (self.root / sub).mkdir(mode=0o700, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            if shutil.which("mungekey", path=os.environ.get("PATH", "") + ":/usr/sbin"):
                subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
            else:
                key.write_bytes(os.urandom(1024))
            key.chmod(0o600)
        ctld_port, slurmd_port = _free_ports(2)
        lines = [
            "# Test cluster written by tests/slurm/cluster.py; everything lives under this folder.",
            "ClusterName=instsimtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.pid_file('slurmctld')}",
            f"SlurmdPidFile={self.pid_file('slurmd')}",
            f"SlurmctldLogFile={self.log_file('slurmctld')}",
            f"SlurmdLogFile={self.log_file('slurmd')}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            # No accounting here, so squeue is the status command: finished jobs must stay visible to it (and
            # to the test's checks after a long run) for the whole run. The plugin needs >= 3 x init seconds.
            f"MinJobAge={MIN_JOB_AGE_S}",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "GresTypes=gpu",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={NODE_MEMORY_MB} "
            f"Gres=gpu:{FAKE_GPU_MODEL}:{FAKE_GPUS} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        # Fake GPUs: plain files stand in for /dev/nvidiaN (SLURM drops GPUs without a File). SLURM schedules
        # and counts them as on a real cluster; the jobs themselves compute on the CPU.
        (self.root / "dev").mkdir(mode=0o700, exist_ok=True)
        for i in range(FAKE_GPUS):
            (self.root / "dev" / f"gpu{i}").touch()
        (self.root / "gres.conf").write_text(
            f"NodeName={self.node} Name=gpu Type={FAKE_GPU_MODEL} File={self.root / 'dev'}/gpu[0-{FAKE_GPUS - 1}]\n"
        )
        for cmd in CLIENT_COMMANDS:
            wrapper = self.bin / cmd
            wrapper.write_text(f'#!/bin/sh\nexport SLURM_CONF="{self.conf}"\nexec {_which(cmd)} "$@"\n')
            wrapper.chmod(0o755)

    # ---- daemons ---------------------------------------------------------------------------------------
    def _start(self, daemon: str, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        pid_file = self.pid_file(daemon)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if pid_file.exists():
                text = pid_file.read_text().strip()
                if text.isdigit() and _pid_alive_as(int(text), daemon):
                    self.started[daemon] = int(text)
                    return
            time.sleep(0.1)
        raise RuntimeError(
            f"{daemon} did not start (exit {proc.returncode}): {proc.stdout}{proc.stderr}\n{self.tail(daemon)}"
        )

    def start(self) -> "TestCluster":
        self.write_config()
        try:
            self._start("munged", [
                _which("munged"), f"--socket={self.munge_socket}", f"--key-file={self.root / 'munge' / 'munge.key'}",
                f"--pid-file={self.pid_file('munged')}", f"--log-file={self.log_file('munged')}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}", "--force",
            ])
            self._start("slurmctld", [_which("slurmctld"), "-f", str(self.conf), "-i"])
            self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), "slurmctld to answer")
            self._start("slurmd", [_which("slurmd"), "-f", str(self.conf), "-N", self.node])
            self._wait(lambda: self._node_state() in ("idle", "mixed", "allocated"), "the node to come up idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _ok(self, cmd: list[str], needle: str) -> bool:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        return proc.returncode == 0 and needle in proc.stdout

    def _node_state(self) -> str:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T", "-n", self.node], env=self.env,
                              capture_output=True, text=True, timeout=30)
        return proc.stdout.strip().rstrip("*~#!%$@^-")

    def _wait(self, check, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.25)
        raise RuntimeError(f"timed out waiting for {what}\n{self.tail('slurmctld')}\n{self.tail('slurmd')}")

    def _pids(self) -> dict[str, int]:
        """Daemon -> PID: the ones this object started, else (a cluster left by `up`) those in the pid files."""
        pids = {}
        for daemon in DAEMONS:
            pid = self.started.get(daemon)
            if pid is None:
                pid_file = self.pid_file(daemon)
                text = pid_file.read_text().strip() if pid_file.exists() else ""
                pid = int(text) if text.isdigit() else None
            if pid is not None:
                pids[daemon] = pid
        return pids

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end exactly the daemons started here, by PID (reverse order)."""
        pids = self._pids()
        if "slurmctld" in pids and _pid_alive_as(pids["slurmctld"], "slurmctld"):
            # Jobs first, so their processes end with them (slurmstepd outlives a stopped slurmd).
            subprocess.run(["scancel", "--full", "-u", getpass.getuser()], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                proc = subprocess.run(["squeue", "-h", "-t", "PD,R,CG,S", "-o", "%i"], env=self.env,
                                      capture_output=True, text=True, timeout=30)
                if proc.returncode != 0 or not proc.stdout.strip():
                    break
                time.sleep(0.25)
        for daemon in reversed(DAEMONS):
            pid = pids.get(daemon)
            self.started.pop(daemon, None)
            if pid is None or not _pid_alive_as(pid, daemon):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _pid_alive_as(pid, daemon):
                time.sleep(0.1)
            if _pid_alive_as(pid, daemon):
                os.kill(pid, signal.SIGKILL)
        # A job step that was starting while it was cancelled can outlive its job: end what is left of this
        # cluster's jobs (processes that have this cluster's SLURM_CONF and a SLURM_JOB_ID in their environment).
        for pid in self.job_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def job_processes(self) -> list[int]:
        """PIDs of processes run by this cluster's jobs."""
        conf = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if conf in env and any(v.startswith(b"SLURM_JOB_ID=") for v in env):
                pids.append(int(proc.name))
        return pids

    def running(self) -> dict[str, bool]:
        """Daemon name -> whether the process in its pid file is alive."""
        out = {}
        for daemon in DAEMONS:
            pid_file = self.pid_file(daemon)
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            out[daemon] = text.isdigit() and _pid_alive_as(int(text), daemon)
        return out

    def tail(self, daemon: str, n: int = 30) -> str:
        log = self.log_file(daemon)
        if not log.exists():
            return f"({log} not written)"
        return f"--- last lines of {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> "TestCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start a cluster in DIR and leave it running")
    up.add_argument("dir")
    down = sub.add_parser("down", help="stop the cluster in DIR")
    down.add_argument("dir")
    run = sub.add_parser("run", help="start a cluster, run a command against it, stop it")
    run.add_argument("--dir", default=None, help="cluster folder (default: a new one under /tmp, removed after)")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.action == "up":
        ensure_installed()
        cluster = TestCluster(args.dir).start()
        print(f"export SLURM_CONF={cluster.conf} PATH={cluster.bin}:$PATH")
        return 0
    if args.action == "down":
        TestCluster(args.dir).stop()
        return 0
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("run needs a command after --")
    ensure_installed()
    cluster = TestCluster(args.dir)
    try:
        with interrupt_on_sigterm(), cluster:
            return subprocess.run(cmd, env=cluster.env).returncode
    finally:
        if args.dir is None:
            shutil.rmtree(cluster.root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
