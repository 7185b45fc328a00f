"""A real single-node Slurm cluster for tests: munged + slurmctld + slurmd (+ MariaDB + slurmdbd).

    node = start_slurm(tmp_path / "slurm", cpus=2)     # ~0.2 s (3-7 s with accounting="slurmdbd")
    with node.activated():                              # SLURM_CONF (and PATH) for sbatch/sacct/srun
        ex = submitit.AutoExecutor(folder=tmp_path / "jobs")
        ...
    node.stop()

Everything (configs, state, spool, logs, munge key and socket, database) lives under ``workdir``;
the system's /etc/slurm, /etc/munge and /run/munge are neither read nor touched, and the ports are
free ones picked at start, so a system Slurm or a second test cluster does not get in the way.
Needs root and Debian's ``slurm-wlm munge`` (plus ``slurmdbd mariadb-server`` for real accounting);
``slurm_unavailable_reason()`` says in one line why not, for ``pytest.skip``.

``accounting`` picks what answers ``sacct``, which submitit's SlurmExecutor polls for job states:

* ``"none"``: no accounting, ``sacct`` fails ("Slurm accounting storage is disabled"), submitit logs
  "Bypassing sacct error" and sees state UNKNOWN. ``result()``/``done()`` still finish for every task
  that writes its result pickle, i.e. the function returned *or raised* (raising gives
  FailedJobError). A task Slurm ends without one (scancel, time limit, node failure, srun error)
  leaves ``done()`` False for ever and ``result()`` waits for ever.
* ``"squeue"``: as ``"none"``, plus a ``sacct`` stand-in first on PATH that answers submitit's
  ``sacct -o JobID,State,NodeList --parsable2 -j ID`` from slurmctld's own job table (MinJobAge is a
  day, so finished jobs stay in it): real states (COMPLETED, CANCELLED, TIMEOUT, FAILED) at no cost.
* ``"slurmdbd"``: real accounting: a private MariaDB and slurmdbd, the real ``sacct``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tests.support.ports import free_ports

ACCOUNTING_MODES = ("none", "squeue", "slurmdbd")
CORE_BINARIES = ("munged", "munge", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "sinfo",
                 "squeue", "scontrol", "scancel")
DBD_BINARIES = ("slurmdbd", "sacctmgr", "sacct", "mariadbd", "mariadb-install-db")
INSTALL = "apt-get install -y slurm-wlm munge"
DBD_INSTALL = "apt-get install -y slurmdbd mariadb-server"
_SBIN = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin"])
_MARKER = "CELLMORPH_SLURM_NODE"  # in every daemon's environment (and so slurmstepd's): finds leftovers


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message is ``slurm_unavailable_reason()``."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + _SBIN)


def slurm_unavailable_reason(accounting: str = "none") -> str | None:
    """None when ``start_slurm(..., accounting=accounting)`` can run here, else one line saying why not."""
    if not sys.platform.startswith("linux"):
        return f"slurm: test cluster needs Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "slurm: test cluster runs slurmctld/slurmd/munged as root; not root"
    missing = [b for b in CORE_BINARIES if _which(b) is None]
    if missing:
        return f"slurm not installed ({INSTALL}): no {', '.join(missing)}"
    if accounting == "slurmdbd":
        missing = [b for b in DBD_BINARIES if _which(b) is None]
        if missing:
            return f"slurm accounting not installed ({DBD_INSTALL}): no {', '.join(missing)}"
    return None


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _memory_mb() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def _die_with_parent() -> None:  # preexec_fn: the daemons go when the test process does, however it ends
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no {path})"


SACCT_STANDIN = '''#!{python}
"""sacct stand-in from tests/support/slurm_node.py (accounting="squeue"): answers
`sacct -o FIELDS [--parsable2] -j ID ...` from slurmctld's job table via squeue."""
import os, subprocess, sys
FMT = {{"jobid": "%i", "state": "%T", "nodelist": "%N", "jobname": "%j", "partition": "%P", "user": "%u"}}
args, fields, ids, header = sys.argv[1:], ["JobID", "JobName", "State"], [], True
while args:
    a = args.pop(0)
    if a in ("-o", "--format") and args:
        fields = args.pop(0).split(",")
    elif a.startswith("--format="):
        fields = a.split("=", 1)[1].split(",")
    elif a in ("-j", "--jobs") and args:
        ids += args.pop(0).split(",")
    elif a.startswith("--jobs="):
        ids += a.split("=", 1)[1].split(",")
    elif a in ("-n", "--noheader"):
        header = False
bad = [f for f in fields if f.lower() not in FMT]
if bad:
    sys.exit(f"sacct stand-in: cannot give {{bad}}")
fmt = "|".join(FMT[f.lower()] for f in fields)
lines = []
for jid in ids or [None]:  # one call per id: squeue fails whole for an id it no longer knows
    cmd = ["{squeue}", "-h", "-r", "-t", "all", "-o", fmt] + (["-j", jid] if jid else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines += [ln for ln in out.stdout.splitlines() if ln.strip()]
if header:
    print("|".join(fields))
print("\\n".join(lines))
'''


@dataclass
class SlurmNode:
    """A running single-node cluster. ``env`` holds what a Slurm client needs (SLURM_CONF, PATH)."""

    workdir: Path
    cpus: int
    partition: str
    accounting: str
    cluster_name: str
    nodename: str
    memory_mb: int
    # job ids differ between clusters: submitit's SlurmJob.watcher is one per process and caches
    # finished states by job id, so a second cluster's job "1_0" would be taken for the first's.
    first_job_id: int = field(default_factory=lambda: 1000 + secrets.randbelow(50_000_000))
    root: Path = field(init=False)  # workdir, or a short symlink to it (unix socket paths <= 107 bytes)
    conf: Path = field(init=False)
    env: dict[str, str] = field(default_factory=dict)
    startup_s: float = 0.0
    _daemons: list[tuple[str, subprocess.Popen, Path]] = field(default_factory=list, repr=False)
    _link_dir: Path | None = field(default=None, repr=False)
    _marker: str = field(default_factory=lambda: secrets.token_hex(8), repr=False)
    _stopped: bool = field(default=False, repr=False)

    # ---- use -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def activated(self) -> Iterator["SlurmNode"]:
        """``os.environ`` gets ``env`` inside the block (submitit runs sbatch/sacct with it)."""
        old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield self
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command (``node.run("squeue")``) against this cluster, output captured."""
        return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=60,
                              env={**os.environ, **self.env})

    def logs(self, n: int = 15) -> str:
        """Last ``n`` lines of every daemon's log, for an assertion message."""
        return "\n".join(f"--- {p.name}\n{_tail(p, n)}" for p in sorted((self.root / "log").glob("*")))

    def __enter__(self) -> "SlurmNode":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- start ---------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.root / "log" / f"{name}.out"
        env = {**os.environ, **self.env, _MARKER: self._marker}
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=self.root, start_new_session=True, preexec_fn=_die_with_parent)
        self._daemons.append((name, proc, log))
        return proc

    def _wait(self, what: str, ready: Callable[[], bool], deadline: float) -> None:
        while True:
            for name, proc, log in self._daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"slurm test cluster: {name} exited ({proc.returncode}) while waiting for "
                                       f"{what}\n{self.logs()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"slurm test cluster: {what} not ready in time\n{self.logs()}")
            time.sleep(0.05)

    def _client_ok(self, *cmd: str) -> bool:
        return subprocess.run(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, **self.env}, timeout=30).returncode == 0

    def _start(self, timeout_s: float) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        self.root = self.workdir
        if len(str(self.workdir)) + len(self.nodename) > 60:  # slurmstepd's spool/<node>_<job>.<step> socket
            self._link_dir = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp" if Path("/tmp").is_dir() else None))
            self.root = self._link_dir / "w"
            self.root.symlink_to(self.workdir)
        for d in ("munge", "state", "spool", "log", "bin"):
            (self.root / d).mkdir(exist_ok=True)
        self.conf = self.root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        if self.accounting == "squeue":
            sacct = self.root / "bin" / "sacct"
            sacct.write_text(SACCT_STANDIN.format(python=sys.executable, squeue=_which("squeue")))
            sacct.chmod(0o755)
            self.env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"

        # munge: own key and socket; --force because pytest's tmp dirs are 0700 and munged wants o+x
        # on every directory above its socket.
        munge_dir = self.root / "munge"
        munge_dir.chmod(0o755)
        key, sock = munge_dir / "munge.key", munge_dir / "munge.socket"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'munged.seed'}"])
        self._wait("munged", lambda: self._client_ok(_which("munge"), "-n", "-S", str(sock)), deadline)

        ctld_port, slurmd_port, dbd_port, db_port = free_ports(4)
        conf = self._slurm_conf(sock, ctld_port, slurmd_port, dbd_port)
        (self.root / "plugstack.conf").write_text("")
        self.conf.write_text(conf)

        if self.accounting == "slurmdbd":
            self._start_accounting(sock, dbd_port, db_port, deadline)

        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
        self._wait("slurmctld", lambda: _port_open(ctld_port), deadline)  # else slurmd retries after 1 s
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.nodename])
        sinfo = [_which("sinfo"), "-h", "-N", "-n", self.nodename, "-o", "%T"]

        def idle() -> bool:
            out = subprocess.run(sinfo, capture_output=True, text=True, env={**os.environ, **self.env}, timeout=30)
            return out.returncode == 0 and out.stdout.strip() == "idle"
        self._wait("node idle in sinfo", idle, deadline)
        self.startup_s = time.monotonic() - t0

    def _slurm_conf(self, sock: Path, ctld_port: int, slurmd_port: int, dbd_port: int) -> str:
        r, n = self.root, self.nodename
        if self.accounting == "slurmdbd":
            acct = (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
                    f"AccountingStoragePort={dbd_port}\n"
                    f"AccountingStoragePass={sock}\n")  # = munge socket for client<->slurmdbd (AuthInfo is not used)
        else:
            acct = "AccountingStorageType=accounting_storage/none\n"
        return f"""\
# written by tests/support/slurm_node.py
ClusterName={self.cluster_name}
SlurmctldHost={n}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={r}/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
{acct}JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_interval=1
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MaxArraySize=100001
MaxJobCount=250000
FirstJobId={self.first_job_id}
MinJobAge={86400 if self.accounting == "squeue" else 3600}
KillWait=5
InactiveLimit=0
NodeName={n} NodeAddr=127.0.0.1 NodeHostname={n} CPUs={self.cpus} Boards=1 SocketsPerBoard=1 \
CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory={self.memory_mb} State=UNKNOWN
PartitionName={self.partition} Nodes={n} Default=YES MaxTime=INFINITE State=UP
"""

    def _start_accounting(self, sock: Path, dbd_port: int, db_port: int, deadline: float) -> None:
        data = self.root / "mysql"
        if not (data / "mysql").is_dir():
            out = subprocess.run([_which("mariadb-install-db"), "--no-defaults", "--user=root", f"--datadir={data}",
                                  "--auth-root-authentication-method=normal", "--skip-test-db"],
                                 capture_output=True, text=True, timeout=max(5.0, deadline - time.monotonic()))
            (self.root / "log" / "mariadb-install-db.out").write_text(out.stdout + out.stderr)
            if out.returncode:
                raise RuntimeError(f"slurm test cluster: mariadb-install-db failed\n{out.stdout}{out.stderr}")
        self._spawn("mariadbd", [_which("mariadbd"), "--no-defaults", "--user=root", f"--datadir={data}",
                                 f"--socket={self.root / 'mysqld.sock'}", f"--port={db_port}",
                                 "--bind-address=127.0.0.1", f"--pid-file={self.root / 'mysqld.pid'}",
                                 "--skip-name-resolve", "--innodb-buffer-pool-size=64M",
                                 "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0",
                                 "--innodb-lock-wait-timeout=900"])
        self._wait("mariadbd", lambda: _port_open(db_port), deadline)
        dbd_conf = self.root / "slurmdbd.conf"  # slurmdbd looks for it beside $SLURM_CONF; must be 0600
        dbd_conf.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={sock}
DbdHost={self.nodename}
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser=root
LogFile={self.root}/log/slurmdbd.log
PidFile={self.root}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=root
StorageLoc=slurm_acct_db
DebugLevel=info
""")
        dbd_conf.chmod(0o600)
        self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        self._wait("slurmdbd", lambda: _port_open(dbd_port), deadline)
        out = self.run(_which("sacctmgr"), "-i", "add", "cluster", self.cluster_name, check=False)
        if out.returncode and "already exists" not in out.stdout + out.stderr:
            raise RuntimeError(f"slurm test cluster: sacctmgr add cluster failed\n{out.stdout}{out.stderr}")

    # ---- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel all jobs, end every daemon and leftover slurmstepd, remove state/spool/db/munge.

        ``workdir`` keeps ``log/`` and the configs. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        alive = {name for name, proc, _ in self._daemons if proc.poll() is None}
        if "slurmctld" in alive:
            with contextlib.suppress(Exception):
                ids = self.run(_which("squeue"), "-h", "-o", "%A", check=False).stdout.split()
                if ids:
                    self.run(_which("scancel"), *sorted(set(ids)), check=False)
                    end = time.monotonic() + 10
                    while time.monotonic() < end and self.run(
                            _which("squeue"), "-h", "-t", "PD,R,CG,S", "-o", "%A", check=False).stdout.strip():
                        time.sleep(0.2)
        for group in (("slurmd", "slurmctld"), ("slurmdbd",), ("mariadbd",), ("munged",)):
            procs = [p for name, p, _ in self._daemons if name in group and p.poll() is None]
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self._kill_leftovers()
        for d in ("spool", "state", "mysql", "munge", "bin"):
            shutil.rmtree(self.workdir / d, ignore_errors=True)
        if self._link_dir is not None:
            shutil.rmtree(self._link_dir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """slurmstepd (and what it runs) has our marker from slurmd's environment and outlives slurmd."""
        needle = f"{_MARKER}={self._marker}".encode()
        for proc_dir in Path("/proc").glob("[0-9]*"):
            pid = int(proc_dir.name)
            if pid == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if needle in (proc_dir / "environ").read_bytes().split(b"\0"):
                    os.kill(pid, signal.SIGKILL)


def start_slurm(workdir: Path, cpus: int = 2, *, accounting: str = "none", partition: str = "debug",
                memory_mb: int | None = None, cluster_name: str = "cellmorph",
                timeout_s: float = 60.0) -> SlurmNode:
    """Start a single-node cluster in ``workdir`` and return once its node is idle in ``sinfo``.

    ``cpus`` may exceed the machine's (SlurmdParameters=config_overrides): it is how many 1-CPU tasks
    run at once. Raises SlurmUnavailable (see ``slurm_unavailable_reason``) or, with the daemons'
    logs, RuntimeError/TimeoutError; whatever was started is stopped again then."""
    if accounting not in ACCOUNTING_MODES:
        raise ValueError(f"accounting must be one of {ACCOUNTING_MODES}, not {accounting!r}")
    reason = slurm_unavailable_reason(accounting)
    if reason:
        raise SlurmUnavailable(reason)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    node = SlurmNode(workdir=workdir, cpus=cpus, partition=partition, accounting=accounting,
                     cluster_name=cluster_name, nodename=socket.gethostname().split(".")[0],
                     memory_mb=memory_mb or _memory_mb())
    atexit.register(node.stop)
    try:
        node._start(timeout_s)
    except BaseException:
        node.stop()
        raise
    return node
