"""A whole Flower deployment of fl-sd on this machine, on loopback: one SuperLink, N SuperNodes, ``flwr run``.

Used by the tests (tests/test_flower_deployment.py) and the benchmark (benchmarks/flower_round_time.py); the same
commands, one per machine, are the walk-through in docs/flower.md. Every process is started with Flower's own
command-line tools on free ports chosen at run time, bound to 127.0.0.1, and :meth:`LocalFederation.stop` ends every
one of them and their children (by process id; also when a test fails)::

    with LocalFederation(workdir, secure=True) as fed:   # TLS + SuperNode authentication
        fed.start_superlink()
        for c in range(3):
            fed.start_supernode(c, data_path=f"shards/client_{c}.npz")
        out = fed.run({"config": "configs/smoke.yaml", "overrides": "--run_dir runs/x"})

``secure=False`` is Flower's insecure mode (no TLS, no authentication), for a laptop.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "deploy" / "flower"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr of this environment
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_credentials import make_supernode_key, make_tls  # noqa: E402

CONNECTION = "fl-sd-local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pids: set[int]) -> set[int]:
    """``pids`` and all their descendants (Linux /proc)."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent_of[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, grew = set(pids), True
    while grew:
        new = {pid for pid, ppid in parent_of.items() if ppid in found and pid not in found}
        found |= new
        grew = bool(new)
    return found


class LocalFederation:
    def __init__(self, workdir: str | Path, secure: bool = True, env: dict[str, str] | None = None):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.secure = secure
        self.creds = self.workdir / "credentials"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_HOME": str(self.workdir / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
        if secure:
            self.creds.mkdir(exist_ok=True)
            make_tls(self.creds, ["127.0.0.1", "localhost"])
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(exist_ok=True)
        link = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n'
        link += f'root-certificates = "{self.creds / "ca.crt"}"\n' if secure else "insecure = true\n"
        (home / "config.toml").write_text(link)

    # -- processes ---------------------------------------------------------------------------------------------------
    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(args, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.processes[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self, timeout: float = 120) -> None:
        args = [str(BIN / "flower-superlink"), "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if self.secure:
            args += ["--ssl-ca-certfile", str(self.creds / "ca.crt"), "--ssl-certfile", str(self.creds / "server.pem"),
                     "--ssl-keyfile", str(self.creds / "server.key"), "--enable-supernode-auth"]
        else:
            args += ["--insecure"]
        proc = self._start("superlink", args)
        deadline = time.monotonic() + timeout
        while "Application startup complete" not in self.log("superlink"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flower-superlink did not start:\n{self.log('superlink')[-3000:]}")
            time.sleep(0.2)

    def supernode_key(self, name: str, register: bool = True) -> Path:
        """A new SuperNode key pair in the credentials directory; registered with the SuperLink unless told not."""
        private, public = make_supernode_key(self.creds, name)
        if register:
            self.flwr("supernode", "register", str(public), CONNECTION)
        return private

    def start_supernode(self, client: int, data_path: str | Path, name: str | None = None,
                        key: Path | None = None, root_certificates: Path | None = None,
                        insecure: bool | None = None, extra_config: str = "",
                        max_retries: int | None = None, max_wait_time: float | None = None) -> subprocess.Popen:
        """Client ``client``'s SuperNode. Secure federations: a new registered key unless ``key`` is given, the
        federation's CA unless ``root_certificates`` is; ``insecure=True`` connects without TLS."""
        name = name or f"supernode_{client}"
        insecure = (not self.secure) if insecure is None else insecure
        args = [str(BIN / "flower-supernode"), "--superlink", self.address, "--port", str(free_port()),
                "--node-config", f'partition-id={client} data-path="{Path(data_path).resolve()}" {extra_config}']
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        if max_wait_time is not None:
            args += ["--max-wait-time", str(max_wait_time)]
        if insecure:
            args += ["--insecure"]
        else:
            args += ["--root-certificates", str(root_certificates or self.creds / "ca.crt")]
            if self.secure:
                args += ["--auth-supernode-private-key", str(key or self.supernode_key(name))]
        return self._start(name, args)

    def stop_process(self, name: str, sig: int = signal.SIGTERM, wait: float = 20) -> None:
        proc = self.processes.pop(name)
        self._end(_children({proc.pid}), sig, wait)
        proc.wait(timeout=5)

    @staticmethod
    def _end(pids: set[int], sig: int, wait: float) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in pids):
            time.sleep(0.1)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """End every process started here and all their children."""
        procs = list(self.processes.values())
        self._end(_children({p.pid for p in procs}), signal.SIGTERM, 20)
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the flwr command ----------------------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120) -> str:
        out = subprocess.run([str(BIN / "flwr"), *args], cwd=self.workdir, env=self.env, capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out.stdout + out.stderr

    def run(self, run_config: dict[str, str], timeout: float = 600) -> str:
        """``flwr run`` the fl-sd app with ``run_config`` and wait until the run ends; its streamed log."""
        pairs = " ".join(f'{k}="{v}"' for k, v in run_config.items())
        return self.flwr("run", str(APP), CONNECTION, "--stream", "--run-config", pairs, timeout=timeout)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
