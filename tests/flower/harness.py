"""Real Flower 1.42 processes on localhost for the tests and for examples/flower/measure.py:
a SuperLink (simulation or deployment), SuperNodes behind a counting proxy, and ``flwr run``
of the example app. Every process is started in its own session with a tag in its
environment; ``close()`` kills the sessions and then every process that still carries the tag
(Ray's and Flower's children included), by pid."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from proxy import CountingProxy, free_port  # noqa: E402

ROOT = HERE.parent.parent
APP = ROOT / "examples" / "flower"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr live beside python


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def config_string(cfg: Dict[str, Any]) -> str:
    """``--run-config`` / ``--node-config`` syntax: space-separated key=value in TOML."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in cfg.items())


class Flower:
    """One test's Flower processes, under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex
        self.procs: Dict[str, subprocess.Popen] = {}
        self.home = self.dir / "flwr_home"  # the CLI's FLWR_HOME (connections)
        self.home.mkdir(exist_ok=True)
        self.proxy: Optional[CountingProxy] = None
        self.superlink_port: Optional[int] = None
        self.node_ports: Dict[str, int] = {}
        self.env = dict(os.environ)
        self.env.update({
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "IOTC_FLOWER_TEST_TAG": self.tag,
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1",
        })

    # -- processes -----------------------------------------------------------------------
    def start(self, name: str, argv: List[str], home: Optional[Path] = None) -> subprocess.Popen:
        env = dict(self.env)
        env["FLWR_HOME"] = str(home or self.home)
        with open(self.dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.dir)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything in its session (its flwr-clientapp included)."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for name in list(self.procs):
            try:
                self.kill(name)
            except BaseException:  # noqa: BLE001 - an interrupt here must not leave the others
                pass
        for _ in range(3):  # children that left the sessions (Ray daemons), by pid
            pids = _our_pids(self.tag, self.dir)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None

    # -- SuperLink and SuperNodes ---------------------------------------------------------
    def superlink(self, simulation: bool = False) -> int:
        port = free_port()
        argv = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                "--disable-runtime-dependency-installation"]  # state in memory: a file
        # database under ten concurrent SuperNodes on two cores answers "database is locked"
        if simulation:
            argv += ["--simulation", "--isolation", "subprocess"]
        self.start("superlink", argv)
        self.superlink_port = port
        _wait_port(port, 60, lambda: self._check("superlink"))
        self.proxy = CountingProxy("127.0.0.1", port)
        return port

    def supernode(self, label: str, node_config: Dict[str, Any], through_proxy: bool = True) -> None:
        assert self.superlink_port is not None and self.proxy is not None
        if label not in self.node_ports:  # a restarted node keeps its proxy listener
            self.node_ports[label] = self.proxy.listen(label) if through_proxy else self.superlink_port
        home = self.dir / f"home_{label}"
        home.mkdir(exist_ok=True)
        argv = [str(BIN / "flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{self.node_ports[label]}",
                "--port", str(free_port()), "--node-config", config_string(node_config)]
        self.start(label, argv, home=home)

    def _check(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")

    def write_connections(self, simulation_nodes: Optional[int] = None) -> str:
        """The CLI's connection to our SuperLink, in $FLWR_HOME/config.toml; returns its name."""
        name = "sim" if simulation_nodes else "deployment"
        text = f'[superlink.{name}]\naddress = "127.0.0.1:{self.superlink_port}"\ninsecure = true\n'
        if simulation_nodes:
            text += f"\n[superlink.{name}.options]\nnum-supernodes = {simulation_nodes}\n"
        (self.home / "config.toml").write_text(text)
        return name

    # -- runs ---------------------------------------------------------------------------
    def run(self, connection: str, run_config: Dict[str, Any], name: str = "flwr-run",
            timeout: float = 120) -> None:
        """``flwr run examples/flower <connection>`` (submits and returns; the run goes on)."""
        argv = [str(BIN / "flwr"), "run", str(APP), connection, "--run-config", config_string(run_config)]
        proc = self.start(name, argv)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"flwr run did not return in {timeout} s:\n{self.log(name)[-3000:]}")
        self.procs.pop(name)
        if rc != 0:
            raise RuntimeError(f"flwr run exited with {rc}:\n{self.log(name)[-3000:]}")

    def wait_report(self, path: Path, timeout: float, rounds: Optional[int] = None,
                    watch: Optional[List[str]] = None) -> Dict[str, Any]:
        """The ServerApp's report once it is done (or has ``rounds`` rounds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in watch or ["superlink"]:
                self._check(name)
            if path.exists():
                report = json.loads(path.read_text())
                if report["done"] or (rounds is not None and len(report.get("rounds", [])) >= rounds):
                    return report
            time.sleep(0.5)
        tail = "\n".join(f"--- {n}\n{self.log(n)[-2000:]}" for n in ["superlink", *self.procs])
        raise TimeoutError(f"no report at {path} after {timeout} s\n{tail}")


def _our_pids(tag: str, workdir: Path) -> List[int]:
    """Processes that carry our tag in their environment or run in our work directory (Ray's
    agents get a fresh environment but keep the working directory)."""
    pids = []
    needle = f"IOTC_FLOWER_TEST_TAG={tag}".encode()
    root = str(workdir.resolve())
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/environ", "rb") as f:
                tagged = needle in f.read().split(b"\0")
        except OSError:
            continue
        if tagged or cwd == root or cwd.startswith(root + os.sep):
            pids.append(int(entry))
    return pids


def _wait_port(port: int, timeout: float, check) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def flower_available() -> Optional[str]:
    """None when flwr 1.42 and its CLI are installed beside this python, else the reason
    (without importing flwr here: the processes under test do)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("flwr")
    except PackageNotFoundError:
        return "flwr is not installed; pip install 'iotcompress[flower]' (flwr[simulation]==1.42.0)"
    if not found.startswith("1.42."):
        return f"flwr {found} is installed; these tests are for flwr 1.42"
    for tool in ("flwr", "flower-superlink", "flower-supernode"):
        if not (BIN / tool).exists() and shutil.which(tool) is None:
            return f"{tool} is not on PATH beside {sys.executable}"
    return None
