"""The servers `compare_peers.py` measures: how each starts, stops, and reports its prefix cache;
and the CPU accounting that says how much other work shared the machine during a run.

Each server is started in its own process session (its own autogroup), so `stop` can end
everything it started, Ray's processes and vLLM's included, and `OtherWork` can tell its CPU
time from the rest of the machine's.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VLLM_PEER_DIR = ROOT.parent / "shared" / "peers" / "vllm-cpu"
VLLM_PEER_VENV = Path(os.environ.get("VLLM_PEER_VENV",
                                     Path.home() / ".cache" / "splitserve-peers" / "vllm-cpu"))
# Prefix-cache counters, in prompt tokens: (metric family queried, metric family hit).
VLLM_PREFIX_METRICS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")
SPLITSERVE_PREFIX_METRICS = ("ray_splitserve_decoder_prefix_cache_queried_tokens",
                             "ray_splitserve_decoder_prefix_cache_hit_tokens")


@dataclass(frozen=True)
class Server:
    name: str
    argv: tuple[str, ...]
    port: int
    model: str  # what requests name as `model`
    ignore_eos: bool  # else: fixed lengths through transformers' `generation_config`
    startup_timeout_s: float
    stop_signal: int
    env: tuple[tuple[str, str], ...] = ()
    prefix_metrics: tuple[str, str] | None = None  # Prometheus families: queried, hit tokens
    metrics_lag_s: float = 0.0  # how long its counters take to reach /metrics

    @property
    def command_line(self) -> str:
        argv = [Path(a).relative_to(ROOT).as_posix() if a.startswith(str(ROOT) + "/") else a
                for a in self.argv]
        return shlex.join([f"{k}={v}" for k, v in self.env] + argv)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def servers(checkpoint: Path, args) -> dict[str, Server]:
    """Every server, on the same checkpoint with the same limits where the server has them.
    `args`: max_model_len, max_num_seqs, splitserve_args, vllm_args (extra flags, one string)."""
    def transformers(port: int, *extra: str) -> tuple[str, ...]:
        return (str(BIN / "transformers"), "serve", str(checkpoint), "--device", "cpu",
                "--host", "127.0.0.1", "--port", str(port), *extra)

    limits = ("--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs))
    ports = [free_port() for _ in range(4)]
    splitserve = (str(BIN / "splitserve"), "serve", "--model", str(checkpoint), "--port", str(ports[2]),
                  *limits, *shlex.split(args.splitserve_args))
    vllm = ("bash", str(VLLM_PEER_DIR / "serve.sh"), str(vllm_checkpoint_path(checkpoint)), str(ports[3]),
            *limits, "--served-model-name", checkpoint.name, *shlex.split(args.vllm_args))
    return {"transformers": Server("transformers", transformers(ports[0]), ports[0], str(checkpoint),
                                   False, 600, signal.SIGTERM),
            "transformers-cb": Server("transformers-cb", transformers(ports[1], "--continuous-batching"),
                                      ports[1], str(checkpoint), False, 600, signal.SIGTERM),
            # A fresh local Ray even where another is running (ray.init would join that one), and
            # replicas at the niceness of the other servers (Ray's default puts workers at +15).
            # Its counters reach Ray's /metrics through a 2 s poll and Ray's report interval
            # (10 s by default; 2 s here, so that reading them around a run costs less waiting).
            "splitserve": Server("splitserve", splitserve, ports[2], checkpoint.name, True, 2400,
                                 signal.SIGINT, env=(("RAY_ADDRESS", "local"), ("RAY_worker_niceness", "0"),
                                                     ("RAY_metrics_report_interval_ms", "2000")),
                                 prefix_metrics=SPLITSERVE_PREFIX_METRICS, metrics_lag_s=8.0),
            "vllm": Server("vllm", vllm, ports[3], checkpoint.name, True, 1200, signal.SIGTERM,
                           prefix_metrics=VLLM_PREFIX_METRICS, metrics_lag_s=1.0)}


def vllm_checkpoint_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + "-llava-hf")


def prepare_vllm(checkpoint: Path) -> Path:
    """The checkpoint in the llava-hf layout vLLM loads (made once, next to the original), after
    checking that the peer's venv is installed (`shared/peers/vllm-cpu/install.sh`)."""
    if not (VLLM_PEER_VENV / ".installed").exists():
        raise RuntimeError(f"vLLM's CPU peer is not installed in {VLLM_PEER_VENV}; run "
                           f"{VLLM_PEER_DIR / 'install.sh'} (about 5 minutes), or leave vllm out "
                           "of --servers")
    converted = vllm_checkpoint_path(checkpoint)
    done = converted / ".legacy-layout"
    if not done.exists():
        subprocess.run([sys.executable, str(VLLM_PEER_DIR / "legacy_layout.py"), str(checkpoint),
                        str(converted)], check=True)
        done.touch()
    return converted


def vllm_versions() -> dict[str, str]:
    """vllm-cpu's and its torch's versions, read from the peer venv's package metadata."""
    from importlib.metadata import distributions

    site = [str(p) for p in VLLM_PEER_VENV.glob("lib/python3*/site-packages")]
    found = {d.metadata["Name"].lower(): d.version for d in distributions(path=site)}
    return {"vllm-cpu (peer venv)": found.get("vllm-cpu", "?"), "torch (peer venv)": found.get("torch", "?")}


def start(server: Server, log_path: Path, nice: int) -> tuple[subprocess.Popen, float]:
    from deploy.startup import wait_healthy

    hf_home = log_path.parent / "hf-home"
    (hf_home / "hub").mkdir(parents=True, exist_ok=True)  # `transformers serve` scans it
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PJRT_DEVICE": "CPU",
           **dict(server.env)}
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(server.argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=ROOT)
    if nice:
        prioritize(process.pid, nice)  # its own session: its own autogroup
    try:
        wait_healthy(f"{server.url}/health", server.startup_timeout_s, process=process, poll_s=2.0)
    except (TimeoutError, RuntimeError) as error:
        stop(process, server.stop_signal)
        raise RuntimeError(f"{server.name} did not turn healthy ({error}); see {log_path}") from error
    return process, time.monotonic() - t0


def healthy(server: Server, process: subprocess.Popen) -> bool:
    import httpx

    try:
        return process.poll() is None and httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def stop(process: subprocess.Popen, signum: int) -> None:
    """The server's own shutdown first (splitserve drains and stops Ray on SIGINT), then its
    process group, which only this script started."""
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def prioritize(pid: int, nice: int) -> None:
    """Niceness for `pid` and for its session's autogroup: with autogroups (Linux's default for
    desktops and most VMs) the scheduler first shares the CPU between sessions, so a process's
    own niceness only counts against processes of its session. Children inherit both."""
    os.setpriority(os.PRIO_PROCESS, pid, nice)
    autogroup = Path(f"/proc/{pid}/autogroup")
    if autogroup.exists():
        autogroup.write_text(str(nice))


# --- prefix-cache counters ------------------------------------------------------------------------
def metrics_url(server: Server, process: subprocess.Popen, wait_s: float = 120.0) -> str | None:
    """vLLM: its own /metrics. splitserve: the Prometheus port of the Ray node it started (Ray
    picks it at start-up), found among the ports its session's processes listen on as the one
    whose /metrics holds splitserve's series (they appear a few seconds after warm-up)."""
    import httpx

    if server.name == "vllm":
        return f"{server.url}/metrics"
    if server.name != "splitserve":
        return None
    deadline = time.monotonic() + wait_s
    while True:
        for port in _listening_ports(process.pid):
            try:
                if "ray_splitserve_" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text:
                    return f"http://127.0.0.1:{port}/metrics"
            except httpx.HTTPError:  # not an HTTP server
                continue
        if time.monotonic() > deadline:
            return None
        time.sleep(3)


def prefix_counters(url: str | None, families: tuple[str, str] | None) -> tuple[float, float] | None:
    """(queried, hit) prompt tokens, summed over label sets; None when not exported. A family
    missing from an answering endpoint counts 0 (Ray exports a counter once it first moves)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    if not url or not families:
        return None
    try:
        text = httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return None
    totals = dict.fromkeys(families, 0.0)
    for family in text_string_to_metric_families(text):
        name = family.name.removesuffix("_total")
        if name in totals:
            totals[name] += sum(s.value for s in family.samples if not s.name.endswith("_created"))
    return totals[families[0]], totals[families[1]]


def prefix_cache_delta(before: tuple[float, float] | None,
                       after: tuple[float, float] | None) -> dict | None:
    if before is None or after is None:
        return None
    queried, hit = after[0] - before[0], after[1] - before[1]
    return {"queried_tokens": queried, "hit_tokens": hit, "hit_rate": hit / queried if queried else None}


def _listening_ports(session_id: int) -> list[int]:
    """TCP ports that processes of the session listen on."""
    listening = {}  # socket inode -> port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                listening[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    ports = set()
    for pid, fields in processes():
        if int(fields[3]) != session_id:
            continue
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # it ended
            continue
        for fd in descriptors:
            try:
                inode = os.readlink(fd).removeprefix("socket:[").removesuffix("]")
            except OSError:  # closed since
                continue
            if inode in listening:
                ports.add(listening[inode])
    return sorted(ports)


def processes():
    """(pid, the fields of /proc/PID/stat after the command name) for every process."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended
            continue
        yield int(stat.parent.name), fields


# --- other work on the machine --------------------------------------------------------------------
def cpu_busy(sample_s: float = 5.0) -> float:
    """Fraction of all cores busy over `sample_s` (from /proc/stat). Between runs the server
    under test is idle, so this is other work on the machine."""
    def times():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = times()
    time.sleep(sample_s)
    total1, idle1 = times()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_quiet(max_wait_s: float, busy_below: float = 0.15) -> float:
    """Waits (up to max_wait_s) until other work leaves the CPU mostly idle, so it is not
    measured too. Returns the busy fraction seen last."""
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy()
    while busy >= busy_below and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


class OtherWork:
    """CPU time that neither the server (its session: every process it started, Ray's
    included) nor this script used, as a share of both cores over a run."""

    TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")

    def __init__(self, server_pid: int):
        self.sessions = {server_pid, os.getsid(0)}

    def _ours_s(self) -> float:
        total = sum(int(fields[11]) + int(fields[12])  # utime + stime
                    for _, fields in processes() if int(fields[3]) in self.sessions)  # session id
        return total * self.TICK_S

    @classmethod
    def _busy_s(cls) -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(fields) - fields[3] - fields[4]) * cls.TICK_S

    def __enter__(self):
        self.t0, self.busy0, self.ours0 = time.monotonic(), self._busy_s(), self._ours_s()
        return self

    def __exit__(self, *exc):
        busy, ours = self._busy_s() - self.busy0, self._ours_s() - self.ours0
        self.ours_s = ours
        self.share = max(0.0, busy - ours) / ((time.monotonic() - self.t0) * os.cpu_count())
        return False
