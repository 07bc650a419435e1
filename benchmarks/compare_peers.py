"""Side by side in one run: splitserve vs `transformers serve` (default and --continuous-batching).

    .venv/bin/python benchmarks/compare_peers.py [--size small] [--servers transformers,transformers-cb,splitserve]

Each server runs alone (started, measured, stopped before the next starts), so none shares
the CPU with another. All get the same workloads from `splitserve bench`: concurrency 1, 4
and 16 with 8, 16 and 32 requests, one new photo crop per request, fixed output lengths
(splitserve: `ignore_eos`; transformers serve rejects that field, so it gets a
`generation_config` with `min_new_tokens` = `max_new_tokens`); a cache run at concurrency
1 where half the images repeat earlier ones, for cached-vs-uncached TTFT; and concurrency 16
with longer answers (`--long-output-tokens`), where decoding rather than prefill dominates.

On a shared machine: before each run the script waits (bounded) for other work to leave the
CPU and records how busy it was; it runs itself and every server at `--nice` (process and
session autogroup, which needs root for negative values). `--merge` re-runs some servers and
keeps the others' results. About 45 minutes on 2 cores for the `small` checkpoint.

Raw reports (JSON + PNG per run, server logs) go to `bench-results/peers/`; the tables,
machine, versions and command lines go into `docs/benchmarks.md` under SECTION (other
sections of that file are left as they are; an `### Analysis` subsection is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers_doc import SECTION, plot_peers, render_section, update_doc  # noqa: E402
from deploy.bench import BenchConfig, WorkloadSpec, plot_png, run_bench, write_json  # noqa: E402
from deploy.demo_checkpoint import cached_demo_checkpoint  # noqa: E402

BIN = Path(sys.executable).parent
LEVELS = ((1, 8), (4, 16), (16, 32))  # (concurrency, requests)


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

    @property
    def command_line(self) -> str:
        argv = [Path(a).relative_to(ROOT).as_posix() if a.startswith(str(ROOT) + "/") else a
                for a in self.argv]
        return shlex.join([f"{k}={v}" for k, v in self.env] + argv)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def servers(checkpoint: Path, args) -> dict[str, Server]:
    def transformers(port: int, *extra: str) -> tuple[str, ...]:
        return (str(BIN / "transformers"), "serve", str(checkpoint), "--device", "cpu",
                "--host", "127.0.0.1", "--port", str(port), *extra)

    ports = [free_port() for _ in range(3)]
    splitserve = (str(BIN / "splitserve"), "serve", "--model", str(checkpoint), "--port", str(ports[2]),
                  "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs))
    return {"transformers": Server("transformers", transformers(ports[0]), ports[0], str(checkpoint),
                                   False, 600, signal.SIGTERM),
            "transformers-cb": Server("transformers-cb", transformers(ports[1], "--continuous-batching"),
                                      ports[1], str(checkpoint), False, 600, signal.SIGTERM),
            # A fresh local Ray even where another is running (ray.init would join that one), and
            # replicas at the niceness of the other servers (Ray's default puts workers at +15).
            "splitserve": Server("splitserve", splitserve, ports[2], checkpoint.name, True, 2400,
                                 signal.SIGINT, env=(("RAY_ADDRESS", "local"), ("RAY_worker_niceness", "0")))}


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


class OtherWork:
    """CPU time that neither the server (its session: every process it started, Ray's
    included) nor this script used, as a share of both cores over a run."""

    TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")

    def __init__(self, server_pid: int):
        self.sessions = {server_pid, os.getsid(0)}

    def _ours_s(self) -> float:
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended
                continue
            if int(fields[3]) in self.sessions:  # session id
                total += int(fields[11]) + int(fields[12])  # utime + stime
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
        self.share = max(0.0, busy - ours) / ((time.monotonic() - self.t0) * os.cpu_count())
        return False


def wait_quiet(max_wait_s: float, busy_below: float = 0.15) -> float:
    """Waits (up to max_wait_s) until other work leaves the CPU mostly idle, so it is not
    measured too. Returns the busy fraction seen last."""
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy()
    while busy >= busy_below and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


def prioritize(pid: int, nice: int) -> None:
    """Niceness for `pid` and for its session's autogroup: with autogroups (Linux's default for
    desktops and most VMs) the scheduler first shares the CPU between sessions, so a process's
    own niceness only counts against processes of its session. Children inherit both."""
    os.setpriority(os.PRIO_PROCESS, pid, nice)
    autogroup = Path(f"/proc/{pid}/autogroup")
    if autogroup.exists():
        autogroup.write_text(str(nice))


def start(server: Server, log_path: Path, nice: int) -> tuple[subprocess.Popen, float]:
    import httpx

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
    while time.monotonic() - t0 < server.startup_timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                return process, time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stop(process, server.stop_signal)
    raise TimeoutError(f"{server.name} was not healthy within {server.startup_timeout_s} s")


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


def configs(server: Server, args) -> dict[str, BenchConfig]:
    def fixed_length(tokens: int) -> dict:
        if server.ignore_eos:
            return {}
        return {"generation_config": json.dumps(
            {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False})}

    def run(label: str, concurrency: int, **workload) -> BenchConfig:
        spec = replace(base_workload, **workload)
        return BenchConfig(base_url=f"{server.url}/v1", model=server.model, workload=spec,
                           max_concurrency=concurrency, ignore_eos=server.ignore_eos,
                           extra_body=fixed_length(spec.output_tokens), warmup_requests=1,
                           timeout_s=args.run_timeout_s, request_timeout_s=args.run_timeout_s,
                           label=f"{server.name} {label}")

    base_workload = WorkloadSpec(prompt_words=args.prompt_words, output_tokens=args.output_tokens)
    runs = {f"c{c}": run(f"c{c}", c, num_requests=n, seed=100 + c)
            for c, n in LEVELS if c in args.concurrency}
    runs["cache"] = run("cache", 1, num_requests=args.cache_requests, repeat_ratio=0.5, seed=7)
    if args.long_output_tokens:  # where decoding, not prefill, dominates the work
        runs["c16-long"] = run("c16-long", 16, num_requests=32, output_tokens=args.long_output_tokens,
                               seed=216)
    return runs


def bench_command(config: BenchConfig) -> str:
    """The `splitserve bench` command line that reproduces one run."""
    w = config.workload
    argv = ["splitserve", "bench", "--base-url", config.base_url, "--model", config.model,
            "--num-requests", w.num_requests, "--concurrency", config.max_concurrency,
            "--images-per-request", w.images_per_request, "--repeat-ratio", w.repeat_ratio,
            "--prompt-words", w.prompt_words, "--output-tokens", w.output_tokens, "--seed", w.seed,
            "--warmup-requests", config.warmup_requests]
    argv += ["--ignore-eos"] if config.ignore_eos else []
    argv += ["--extra-body", json.dumps(config.extra_body)] if config.extra_body else []
    return shlex.join(str(a) for a in argv)


def run_server(server: Server, args, out_dir: Path) -> dict:
    print(f"[{time.strftime('%H:%M:%S')}] {server.name}: starting", flush=True)
    process, startup_s = start(server, out_dir / f"{server.name}.log", args.nice)
    print(f"[{time.strftime('%H:%M:%S')}] {server.name}: healthy after {startup_s:.0f} s", flush=True)
    result = {"argv": server.command_line, "startup_s": startup_s, "runs": {}, "commands": {},
              "started_at": time.strftime("%H:%M")}
    try:
        for name, config in configs(server, args).items():
            if args.runs and name not in args.runs:
                continue
            busy_before = wait_quiet(args.wait_quiet_s)
            with OtherWork(process.pid) as other:
                report, _ = run_bench(config)
            report["cpu_busy_before"], report["cpu_other_during"] = busy_before, other.share
            stem = out_dir / f"{server.name}-{name}"
            write_json(report, stem.with_suffix(".json"))
            plot_png(report, stem.with_suffix(".png"))
            result["runs"][name] = {k: v for k, v in report.items() if k != "requests"}
            result["commands"][name] = bench_command(config)
            print(f"[{time.strftime('%H:%M:%S')}] {server.name} {name}: "
                  f"{report['output_throughput']:.1f} output tok/s, TTFT median "
                  f"{(report['ttft_ms'] or {}).get('median', float('nan')):.0f} ms, "
                  f"{report['errors']} errors (CPU {busy_before:.0%} busy before, other work "
                  f"{other.share:.0%} during)", flush=True)
    finally:
        stop(process, server.stop_signal)
    return result


def machine() -> dict:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory_gb, 1),
            "os": platform.platform(), "python": platform.python_version(), "commit": commit,
            "versions": {p: version(p) for p in ("torch", "torch_xla", "transformers", "ray", "httpx")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--servers", default="transformers,transformers-cb,splitserve")
    parser.add_argument("--concurrency", default="1,4,16", help="a subset of 1,4,16")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--cache-requests", type=int, default=16)
    parser.add_argument("--long-output-tokens", type=int, default=128,
                        help="also run concurrency 16 with this many output tokens (0: skip)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--run-timeout-s", type=float, default=900.0, help="bound on each bench run")
    parser.add_argument("--wait-quiet-s", type=float, default=120.0,
                        help="wait up to this long for other work to leave the CPU before each run")
    parser.add_argument("--nice", type=int, default=-5,
                        help="niceness of this script, hence of the servers and the client (a "
                        "negative value needs root): on a shared machine, other work then takes "
                        "less of the CPU from what is measured")
    parser.add_argument("--runs", help="only these runs (of c1,c4,c16,cache,c16-long)")
    parser.add_argument("--merge", action="store_true",
                        help="keep earlier results from OUT_DIR/summary.json, replacing only the "
                        "runs made now (e.g. one that other work on the machine disturbed)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench-results" / "peers")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    args.concurrency = {int(c) for c in args.concurrency.split(",")}
    args.runs = set(args.runs.split(",")) if args.runs else None
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.nice:
        prioritize(os.getpid(), args.nice)

    checkpoint = cached_demo_checkpoint(args.size)
    known = servers(checkpoint, args)
    results = {"machine": machine(), "size": args.size, "checkpoint": str(checkpoint),
               "script": shlex.join([Path(sys.executable).relative_to(ROOT).as_posix()
                                     if Path(sys.executable).is_relative_to(ROOT) else sys.executable,
                                     "benchmarks/compare_peers.py", *(argv or sys.argv[1:])]),
               "started_at": time.strftime("%Y-%m-%d %H:%M %Z"),
               "nice": os.getpriority(os.PRIO_PROCESS, 0), "servers": {}}
    summary = args.out_dir / "summary.json"
    if args.merge and summary.exists():
        previous = json.loads(summary.read_text())
        results["servers"] = previous["servers"]
        results["script"] = f"{previous['script']}; then {results['script']}"
        rerun = ",".join(sorted(args.runs or ["all runs"]))
        results["started_at"] = (f"{previous['started_at']}; re-run of {rerun} on {args.servers}: "
                                 f"{results['started_at']}")
    for name in args.servers.split(","):
        result = run_server(known[name], args, args.out_dir)
        if name in results["servers"]:  # --merge: the runs made now replace their earlier ones
            earlier = results["servers"][name]
            result["runs"] = {**earlier["runs"], **result["runs"]}
            result["commands"] = {**earlier["commands"], **result["commands"]}
            result["started_at"] = f"{earlier.get('started_at', '')}, {result['started_at']}"
        results["servers"][name] = result
        write_json(results, summary)  # what finished, if a later one fails
    plot = plot_peers(results, args.doc.parent / "benchmarks-peers.png")
    update_doc(args.doc, render_section(results, plot.relative_to(args.doc.parent)))
    print(f"wrote {summary}, {plot} and the {SECTION!r} section of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
