"""Start-up: `splitserve serve` from launch to ready, then a burst sent right at readiness.

    .venv/bin/python benchmarks/startup_bench.py [--size small] [--runs 3] [--concurrency 12]
        [--source DIR,DIR...]

Each run launches `splitserve serve` on the demo checkpoint (a new local Ray every time) and
times, on the launch clock, the CLI's own lines: Ray started ("Started a local Ray instance"),
Serve started, and "ready at" (the CLI polls `/health` at 2 Hz). Right at readiness it sends a
burst of mixed requests (1-3 new photo crops each, short and long prompts, all at once up to
`--concurrency`), then reads `/health`: every request must succeed and neither service may have
compiled inside a step (`compilations_after_warmup`), while the remaining graphs still compile
in the background. Then the server is stopped (SIGINT: it drains and stops its Ray) and the
next run waits for the machine to go quiet. `--source` runs splitserve from other source trees
(e.g. `git worktree add /tmp/old <commit>`), alternating between them run by run, so that an
A/B comparison meets the same machine: this VM's CPU speed drifts by tens of percent over an
hour.

The machine is a VM whose host can take CPU from it: each run records the CPU the host took
(`steal` in /proc/stat) and the CPU seconds the server's processes used until ready, so runs
on a disturbed machine read as such. Results: a Markdown table on stdout and JSON under
`bench-results/startup/`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, machine_line  # noqa: E402
from benchmarks.peer_servers import OtherWork, free_port, processes, stop, wait_quiet  # noqa: E402
from benchmarks.soak import image_pool  # noqa: E402
from deploy.demo_checkpoint import cached_demo_checkpoint  # noqa: E402

MARKS = {"ray_started": "Started a local Ray instance", "serve_started": "Started Serve",
         "ready": "splitserve: ready at"}
LONG_TEXT = ("Describe the picture in detail: the objects, their colours, the light, what is "
             "in the background and what might have happened just before it was taken. ") * 8


def steal_s() -> float:
    """CPU seconds the VM's host has taken from this machine since boot (all cores)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


class LaunchClock:
    """Timestamps the first line of the server's output that contains each mark."""

    def __init__(self, process: subprocess.Popen, log_path: Path, t0: float) -> None:
        self.seen: dict[str, float] = {}
        self.changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(process, log_path, t0), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen, log_path: Path, t0: float) -> None:
        with open(log_path, "w") as log:
            for line in process.stdout:
                log.write(line)
                with self.changed:
                    for name, mark in MARKS.items():
                        if mark in line and name not in self.seen:
                            self.seen[name] = round(time.monotonic() - t0, 1)
                    self.changed.notify_all()
        with self.changed:
            self.seen.setdefault("exited", round(time.monotonic() - t0, 1))
            self.changed.notify_all()

    def wait_for(self, name: str, timeout_s: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: name in self.seen or "exited" in self.seen,
                                         timeout_s) and name in self.seen


def burst(url: str, model: str, n: int, concurrency: int, seed: int) -> dict:
    """`n` requests at once: request i shows 1 + i % 3 new images and a short or a long prompt."""
    import httpx

    images = image_pool(3 * n, seed)  # every image new to the server

    def one(i: int) -> tuple[int, int, str]:
        parts = [{"type": "image_url", "image_url": {"url": images[3 * i + k]}} for k in range(1 + i % 3)]
        text = LONG_TEXT if i % 2 else "What is in this picture?"
        body = {"model": model, "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        tokens = reply.json()["usage"]["completion_tokens"] if reply.status_code == 200 else 0
        return reply.status_code, tokens, "" if reply.status_code == 200 else reply.text[:200]

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, range(n)))
    seconds = time.monotonic() - t0
    health = httpx.get(f"{url}/health", timeout=30).json()
    return {"requests": n, "ok": sum(status == 200 and tokens >= 1 for status, tokens, _ in answers),
            "errors": [error for _, _, error in answers if error], "seconds": round(seconds, 1),
            **{f"{half}_compilations_in_steps": health[half]["compilations_after_warmup"]
               for half in ("encoder", "decoder")},
            **{f"{half}_graphs": f"{health[half]['graphs_compiled']}/{health[half]['graphs_planned']}"
               for half in ("encoder", "decoder")}}


def one_run(args, checkpoint: Path, run: int, source: Path, out_dir: Path) -> dict:
    import httpx

    port = free_port()
    argv = [str(Path(sys.executable).parent / "splitserve"), "serve", "--model", str(checkpoint),
            "--port", str(port), "--max-model-len", str(args.max_model_len),
            "--max-num-seqs", str(args.max_num_seqs), *args.serve_args.split()]
    busy_before = wait_quiet(args.wait_quiet_s)
    stolen0, t0 = steal_s(), time.monotonic()
    env = {**os.environ, "RAY_ADDRESS": "local"}
    if source != ROOT:  # its modules first, in the CLI and (through the environment) in Ray's workers
        env["PYTHONPATH"] = os.pathsep.join([str(source), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, cwd=source, env=env)
    result = {"run": run, "commit": _commit(source), "busy_before": round(busy_before, 2),
              "command": " ".join(argv[1:])}
    try:
        with OtherWork(process.pid) as work:
            clock = LaunchClock(process, out_dir / f"serve-{run}.log", t0)
            ready = clock.wait_for("ready", args.startup_timeout_s)
        result.update(clock.seen, stolen_cpu_s=round(steal_s() - stolen0, 1),
                      server_cpu_s=round(work.ours_s, 1))
        if not ready:
            result["error"] = f"not ready after {args.startup_timeout_s:.0f} s; see serve-{run}.log"
            return result
        url = f"http://127.0.0.1:{port}"
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        result["burst"] = burst(url, model, args.requests, args.concurrency, seed=run)
        return result
    finally:
        stop(process, 2)  # SIGINT: the CLI drains and stops its own Ray
        _wait_session_gone(process.pid, timeout_s=60)


def _commit(source: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source, capture_output=True,
                          text=True).stdout.strip() or "?"


def _wait_session_gone(session: int, timeout_s: float) -> None:
    """Until every process the server started (Ray's included, same session) has exited."""
    deadline = time.monotonic() + timeout_s
    while any(int(fields[3]) == session for _, fields in processes()) and time.monotonic() < deadline:
        time.sleep(0.5)


def table(runs: list[dict]) -> str:
    lines = ["| run | commit | Ray started (s) | Serve started (s) | ready (s) | stolen by the host (CPU s) "
             "| server CPU s until ready | burst ok | burst s | compilations in steps (enc / dec) "
             "| graphs compiled after the burst (enc / dec) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        b = r.get("burst", {})
        lines.append(f"| {r['run']} | `{r['commit']}` | {r.get('ray_started', '-')} | {r.get('serve_started', '-')} "
                     f"| {r.get('ready', r.get('error', '-'))} | {r['stolen_cpu_s']} | {r['server_cpu_s']} "
                     f"| {b.get('ok', 0)}/{b.get('requests', '-')} | {b.get('seconds', '-')} "
                     f"| {b.get('encoder_compilations_in_steps', '-')} / {b.get('decoder_compilations_in_steps', '-')} "
                     f"| {b.get('encoder_graphs', '-')} / {b.get('decoder_graphs', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--serve-args", default="", help="more `splitserve serve` flags, one string")
    parser.add_argument("--startup-timeout-s", type=float, default=600.0)
    parser.add_argument("--wait-quiet-s", type=float, default=120.0,
                        help="before each run, wait up to this long for the CPU to go quiet")
    parser.add_argument("--source", type=lambda text: [Path(p).resolve() for p in text.split(",")],
                        default=[ROOT], help="source trees to run splitserve from, comma-separated; "
                        "with several, each run takes the next (A, B, A, B, ...)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench-results" / "startup")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = cached_demo_checkpoint(args.size)
    report = {"machine": machine(), "checkpoint": str(checkpoint),
              "started_at": time.strftime("%Y-%m-%d %H:%M %Z"), "runs": []}
    for run in range(1, args.runs + 1):
        source = args.source[(run - 1) % len(args.source)]
        report["runs"].append(one_run(args, checkpoint, run, source, args.out_dir))
        print(json.dumps(report["runs"][-1]), flush=True)
    (args.out_dir / "startup.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{report['started_at']}, {machine_line(report['machine'])}\n\n{table(report['runs'])}")
    failed = [r for r in report["runs"] if "error" in r or r["burst"]["ok"] < r["burst"]["requests"]
              or r["burst"]["encoder_compilations_in_steps"] or r["burst"]["decoder_compilations_in_steps"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
