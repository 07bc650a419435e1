"""Side by side in one run: splitserve vs `transformers serve` (default and --continuous-batching).

    .venv/bin/python benchmarks/compare_peers.py [--size small] [--servers transformers,transformers-cb,splitserve]

Each server runs alone (started, measured, stopped before the next starts), so none shares
the CPU with another. All get the same workloads from `splitserve bench`: concurrency 1, 4
and 16 with 8, 16 and 32 requests, one new photo crop per request, fixed output lengths
(splitserve: `ignore_eos`; transformers serve rejects that field, so it gets a
`generation_config` with `min_new_tokens` = `max_new_tokens`), then a cache run at
concurrency 1 where half the images repeat earlier ones, for cached-vs-uncached TTFT.

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
    fixed = {} if server.ignore_eos else {"generation_config": json.dumps(
        {"max_new_tokens": args.output_tokens, "min_new_tokens": args.output_tokens, "do_sample": False})}
    base = BenchConfig(base_url=f"{server.url}/v1", model=server.model, ignore_eos=server.ignore_eos,
                       extra_body=fixed, warmup_requests=1, timeout_s=args.run_timeout_s,
                       request_timeout_s=args.run_timeout_s)
    workload = WorkloadSpec(prompt_words=args.prompt_words, output_tokens=args.output_tokens)
    runs = {f"c{c}": replace(base, max_concurrency=c, label=f"{server.name} c{c}",
                             workload=replace(workload, num_requests=n, seed=100 + c))
            for c, n in LEVELS if c in args.concurrency}
    runs["cache"] = replace(base, max_concurrency=1, label=f"{server.name} cache",
                            workload=replace(workload, num_requests=args.cache_requests,
                                             repeat_ratio=0.5, seed=7))
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
            busy_before = wait_quiet(args.wait_quiet_s)
            report, _ = run_bench(config)
            report["cpu_busy_before"] = busy_before
            stem = out_dir / f"{server.name}-{name}"
            write_json(report, stem.with_suffix(".json"))
            plot_png(report, stem.with_suffix(".png"))
            result["runs"][name] = {k: v for k, v in report.items() if k != "requests"}
            result["commands"][name] = bench_command(config)
            print(f"[{time.strftime('%H:%M:%S')}] {server.name} {name}: "
                  f"{report['output_throughput']:.1f} output tok/s, TTFT median "
                  f"{(report['ttft_ms'] or {}).get('median', float('nan')):.0f} ms, "
                  f"{report['errors']} errors (CPU {busy_before:.0%} busy before)", flush=True)
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
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--run-timeout-s", type=float, default=900.0, help="bound on each bench run")
    parser.add_argument("--wait-quiet-s", type=float, default=120.0,
                        help="wait up to this long for other work to leave the CPU before each run")
    parser.add_argument("--nice", type=int, default=-5,
                        help="niceness of this script, hence of the servers and the client (a "
                        "negative value needs root): on a shared machine, other work then takes "
                        "less of the CPU from what is measured")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other servers' results from OUT_DIR/summary.json (re-run one "
                        "server, e.g. after other work disturbed it)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench-results" / "peers")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    args.concurrency = {int(c) for c in args.concurrency.split(",")}
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
        results["started_at"] = f"{previous['started_at']} (re-run of {args.servers}: {results['started_at']})"
    for name in args.servers.split(","):
        results["servers"][name] = run_server(known[name], args, args.out_dir)
        write_json(results, summary)  # what finished, if a later one fails
    plot = plot_peers(results, args.doc.parent / "benchmarks-peers.png")
    update_doc(args.doc, render_section(results, plot.relative_to(args.doc.parent)))
    print(f"wrote {summary}, {plot} and the {SECTION!r} section of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
