"""`splitserve bench`: workloads, metrics, the global timeout, and real runs against splitserve
(deployed here on the tiny checkpoint) and `transformers serve`, through the CLI."""

import http.server
import json
import math
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from deploy.bench import BenchConfig, WorkloadSpec, build_workload, run_bench
from deploy.bench.client import RequestResult
from deploy.bench.report import summarize
from deploy.startup import wait_healthy

APP = "bench-target"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


# --- workloads and metrics, no server ---------------------------------------------------------
def test_workload_is_seeded_and_repeats_only_earlier_images():
    spec = WorkloadSpec(num_requests=12, images_per_request=2, repeat_ratio=0.5, prompt_words=7, seed=3)
    one, two = build_workload(spec), build_workload(spec)
    assert [r.image_urls for r in one.requests] == [r.image_urls for r in two.requests]
    assert [r.prompt for r in one.requests] == [r.prompt for r in two.requests]
    assert all(len(r.prompt.split()) == 7 for r in one.requests)
    seen: set[str] = set()
    for request in one.requests:
        repeated = sum(url in seen for url in request.image_urls)
        assert repeated == request.num_repeated_images  # a "new" image is never a repeat
        seen.update(request.image_urls)
    assert len(seen) == one.num_unique_images
    assert 0.25 < one.summary()["repeated_image_fraction"] < 0.75
    assert build_workload(spec, salt=1).requests[0].image_urls[0] not in seen  # warm-up images differ
    fresh = build_workload(WorkloadSpec(num_requests=8, repeat_ratio=0.0))
    assert fresh.num_unique_images == 8 and not any(r.all_images_repeated for r in fresh.requests)
    cached = build_workload(WorkloadSpec(num_requests=8, repeat_ratio=1.0))
    assert cached.num_unique_images == 1 and all(r.all_images_repeated for r in cached.requests[1:])
    with pytest.raises(ValueError, match="repeat_ratio"):
        WorkloadSpec(repeat_ratio=1.5)


def test_image_pool_workload_repeats_exactly_n_images_with_new_questions():
    spec = WorkloadSpec(num_requests=40, image_pool_size=8, prompt_words=6, seed=5)
    workload = build_workload(spec)
    images = [r.image_urls[0] for r in workload.requests]
    assert len(set(images)) == 8 == workload.num_unique_images  # the same bytes each time
    assert all(images.count(url) == 5 for url in set(images))  # shuffled rounds: equal shares
    assert len({r.prompt for r in workload.requests}) == 40  # a new question every request
    first_sight = [i for i, url in enumerate(images) if url not in images[:i]]
    assert first_sight == list(range(8))  # the first round shows each image once
    assert [r.num_repeated_images for r in workload.requests] == [0] * 8 + [1] * 32
    assert workload.summary()["repeated_image_fraction"] == pytest.approx(32 / 40)
    warmup = build_workload(replace(spec, num_requests=8), salt=1)
    assert not {r.image_urls[0] for r in warmup.requests} & set(images)  # primes no cache
    with pytest.raises(ValueError, match="one way to repeat"):
        WorkloadSpec(image_pool_size=8, repeat_ratio=0.5)


def test_seen_image_pairs_share_image_bytes_and_differ_in_text():
    workload = build_workload(WorkloadSpec(num_requests=8, questions_per_image=2, prompt_words=4, seed=2))
    pairs = list(zip(workload.requests[::2], workload.requests[1::2]))
    assert len(pairs) == 4 and workload.num_unique_images == 4
    for first, second in pairs:
        assert first.image_urls == second.image_urls and first.prompt != second.prompt
        assert first.num_repeated_images == 0 and second.all_images_repeated
    assert len({first.image_urls for first, _ in pairs}) == 4  # each pair a new image


def test_compare_peers_runs_issue13_as_one_set_and_writes_its_section(tmp_path):
    from benchmarks import compare_peers, issue13_doc, peers_doc

    assert compare_peers.selected_workloads("issue13") == ["image-pool", "new-images-itl", "seen-image-ttft"]
    assert compare_peers.selected_workloads("seen-image-ttft,c1") == ["c1", "seen-image-ttft"]
    args = compare_peers.argparse.Namespace(prompt_words=8, output_tokens=32, cache_requests=16,
                                            long_output_tokens=128, smoke=False)
    concurrency, pool = compare_peers.workloads(args)["image-pool"]
    assert (concurrency, pool.image_pool_size, pool.num_requests, pool.output_tokens) == (16, 8, 64, 32)

    def stats(median):
        return {"mean": median, "median": median, "p99": 3 * median, "std": 0.0, "count": 8}

    def report(name, ttft_ms):
        concurrency, spec = compare_peers.workloads(args)[name]
        return {"config": {"max_concurrency": concurrency}, "errors": 0, "output_throughput": 1000 / ttft_ms,
                "workload": build_workload(replace(spec, num_requests=2)).summary(), "itl_ms": stats(40),
                "ttft_ms": stats(ttft_ms), "ttft_ms_new_images": stats(ttft_ms),
                "ttft_ms_repeated_images": stats(ttft_ms / 5), "cpu_busy_before": 0.0, "cpu_other_during": 0.0,
                "prefix_cache": {"queried_tokens": 100.0, "hit_tokens": 48.0, "hit_rate": 0.48}}

    servers = {name: {"argv": name, "startup_s": 1.0, "commands": {},
                      "runs": {run: report(run, ttft_ms) for run in compare_peers.GROUPS["issue13"]}}
               for name, ttft_ms in (("transformers", 500.0), ("vllm", 250.0), ("splitserve", 100.0))}
    results = {"machine": {"cpu": "cpu", "cores": 2, "memory_gb": 1.0, "os": "os", "python": "3",
                           "commit": "abc", "versions": {}},
               "size": "tiny", "checkpoint": "ckpt", "script": "compare_peers.py", "started_at": "now",
               "nice": 0, "servers": servers}
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    for _ in range(2):  # the second write replaces the first
        peers_doc.update_doc(doc, issue13_doc.render_section(results))
    text = doc.read_text()
    assert text.count(issue13_doc.SECTION) == 1 and "## Other\n\nkept" in text
    assert "| splitserve / vLLM (CPU backend) | 2.50x | 0.40x |" in text  # tok/s, TTFT p50
    assert "48% (48 / 100)" in text
    assert "ITL p99 <= 4x its ITL median: **3.00x, met**" in text
    assert "<= 0.3x first sight: **0.20x, met**" in text


def test_a_llava_next_peers_run_writes_its_own_section(tmp_path):
    from benchmarks import compare_peers, peers_doc

    with pytest.raises(SystemExit):  # issue 13's runs are LLaVA-1.5's
        compare_peers.main(["--family", "next", "--workloads", "issue13"])
    args = compare_peers.argparse.Namespace(prompt_words=8, output_tokens=32, cache_requests=16,
                                            long_output_tokens=128, smoke=False)

    def report(name):
        concurrency, spec = compare_peers.workloads(args)[name]
        ms = {"mean": 100.0, "median": 100.0, "p99": 300.0, "std": 0.0, "count": 8}
        return {"config": {"max_concurrency": concurrency}, "errors": 0, "output_throughput": 10.0,
                "request_throughput": 1.0, "workload": build_workload(replace(spec, num_requests=2)).summary(),
                "ttft_ms": ms, "ttft_ms_new_images": ms, "ttft_ms_repeated_images": ms,
                "cpu_busy_before": 0.0, "cpu_other_during": 0.0, "prefix_cache": None}

    servers = {name: {"argv": name, "startup_s": 1.0, "commands": {},
                      "runs": {run: report(run) for run in ("c1", "c4", "c16", "cache")}}
               for name in ("transformers", "vllm", "splitserve")}
    results = {"machine": {"cpu": "cpu", "cores": 2, "memory_gb": 1.0, "os": "os", "python": "3",
                           "commit": "abc", "versions": {}},
               "size": "tiny", "family": "next", "checkpoint": "ckpt", "script": "compare_peers.py",
               "started_at": "now", "nice": 0, "servers": servers}
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{peers_doc.SECTION}\n\nLLaVA-1.5's, kept\n")
    peers_doc.update_doc(doc, peers_doc.render_section(results, Path("next.png")))
    text = doc.read_text()
    assert f"{peers_doc.SECTION}\n\nLLaVA-1.5's, kept" in text and text.count(peers_doc.NEXT_SECTION) == 1
    section = text[text.index(peers_doc.NEXT_SECTION):]
    assert "the `next-tiny` demo checkpoint" in section and "### Targets" not in section


def test_summary_follows_vllm_definitions():
    a = RequestResult(0, 1, False, sent=True, start_s=0.0, ttft_s=0.5, latency_s=1.5,
                      chunk_times_s=[0.5, 1.0, 1.5], output_tokens=3, usage_reported=True)
    b = RequestResult(1, 1, True, sent=True, start_s=0.1, ttft_s=0.1, latency_s=0.3,
                      chunk_times_s=[0.1, 0.3], output_tokens=5, usage_reported=True)
    failed = RequestResult(2, 1, False, sent=True, error="HTTP 503: busy")
    report = summarize([a, b, failed], duration_s=2.0)
    assert (report["completed"], report["errors"], report["error_kinds"]) == (2, 1, {"HTTP 503": 1})
    assert report["output_throughput"] == 4.0 and report["request_throughput"] == 1.0
    assert report["tpot_ms"]["mean"] == pytest.approx((500 + 50) / 2)  # (1.0/2 + 0.2/4) s
    assert report["itl_ms"]["count"] == 3 and report["itl_ms"]["median"] == pytest.approx(500)
    assert report["ttft_ms_new_images"]["median"] == pytest.approx(500)
    assert report["ttft_ms_repeated_images"]["median"] == pytest.approx(100)


@pytest.fixture
def stalling_server():
    """An SSE endpoint that sends the role chunk, then nothing for a minute."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n')
            self.wfile.flush()
            time.sleep(60)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_the_run_stops_at_its_global_timeout(stalling_server):
    config = BenchConfig(base_url=stalling_server, model="m", max_concurrency=2, request_rate=4.0,
                         workload=WorkloadSpec(num_requests=40, prompt_words=4), timeout_s=2.0)
    t0 = time.monotonic()
    report, _ = run_bench(config)
    assert time.monotonic() - t0 < 10
    assert report["completed"] == 0 and report["errors"] == 40
    assert report["error_kinds"].keys() == {"cancelled", "not sent"}
    assert math.isclose(report["duration_s"], 2.0, abs_tol=0.5)


# --- real servers, through the CLI --------------------------------------------------------------
def _run_cli(*args: str) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).parent / "splitserve"
    return subprocess.run([str(cli), "bench", "--timeout-s", "120", *args], capture_output=True,
                          text=True, timeout=180)


def _bench_cli(out_stem: Path, *args: str) -> dict:
    done = _run_cli("--out", str(out_stem), *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Output token throughput (tok/s):" in done.stdout
    assert out_stem.with_name(out_stem.name + ".png").read_bytes()[:8] == PNG_MAGIC
    return json.loads(out_stem.with_name(out_stem.name + ".json").read_text())


def _check_plausible(report: dict, num_requests: int, output_tokens: int) -> None:
    assert report["completed"] == num_requests and report["errors"] == 0, report["error_examples"]
    assert report["usage_reported"]
    assert report["total_output_tokens"] == num_requests * output_tokens  # fixed output lengths
    assert report["total_prompt_tokens"] > num_requests * 16  # 16+ image tokens each
    assert report["output_throughput"] == pytest.approx(
        report["total_output_tokens"] / report["duration_s"])
    assert 0 < report["request_throughput"] < 1000
    for key in LATENCY_KEYS:
        stats = report[key]
        assert 0 < stats["median"] <= stats["p99"] < 120_000, (key, stats)
    assert report["ttft_ms"]["median"] < report["e2el_ms"]["median"]
    assert report["tpot_ms"]["count"] == num_requests
    assert num_requests <= report["itl_ms"]["count"] <= num_requests * (output_tokens - 1)
    assert all(r["ttft_s"] > 0 and r["output_tokens"] == output_tokens for r in report["requests"])


@pytest.fixture(scope="module")
def splitserve_url(ray_serve, serve_http_port, tiny_checkpoint):
    from deploy.app import build_app

    app = build_app({"model": str(tiny_checkpoint), "decoder": {"max_model_len": 256, "max_num_seqs": 4},
                     "encoder": {"max_batch_items": 4}})
    ray_serve.run(app, name=APP, route_prefix="/bench-target")
    url = f"http://127.0.0.1:{serve_http_port}/bench-target"
    wait_healthy(f"{url}/health", timeout_s=300)
    yield f"{url}/v1"
    ray_serve.delete(APP)


def _router_counters() -> dict:
    from ray import serve

    return serve.get_app_handle(APP).stats.remote().result()["router"]


def test_bench_against_splitserve(splitserve_url, tmp_path):
    before = _router_counters()
    report = _bench_cli(tmp_path / "splitserve", "--base-url", splitserve_url, "--num-requests", "8",
                        "--concurrency", "1", "--repeat-ratio", "0.5", "--output-tokens", "8",
                        "--ignore-eos", "--label", "splitserve tiny")
    after = _router_counters()
    _check_plausible(report, num_requests=8, output_tokens=8)
    assert report["model"] == "tiny"  # found through /v1/models
    # The workload's repeats are the server's cache hits: one at a time, each repeat is a hit.
    workload = report["workload"]
    repeated = round(workload["repeated_image_fraction"] * 8)
    assert repeated >= 1 and report["ttft_ms_repeated_images"]["count"] == repeated
    assert after["router_image_hits"] - before["router_image_hits"] == repeated
    assert after["images_encoded"] - before["images_encoded"] == workload["num_unique_images"]


def test_bench_against_transformers_serve(transformers_server, tiny_checkpoint, tmp_path):
    # transformers serve rejects `ignore_eos` (422); a generation config fixes the length instead.
    fixed = json.dumps({"generation_config": json.dumps(
        {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False})})
    report = _bench_cli(tmp_path / "peer", "--base-url", transformers_server, "--model",
                        str(tiny_checkpoint), "--num-requests", "6", "--concurrency", "2",
                        "--request-rate", "20", "--output-tokens", "6", "--extra-body", fixed)
    _check_plausible(report, num_requests=6, output_tokens=6)
    assert report["config"]["max_concurrency"] == 2 and report["config"]["request_rate"] == 20.0
    # Its /v1/models lists no checkpoint: without --model the CLI says so, and sends nothing.
    unnamed = _run_cli("--base-url", transformers_server, "--out", str(tmp_path / "unnamed"))
    assert unnamed.returncode == 2 and "pass the model name" in unnamed.stderr
    assert not (tmp_path / "unnamed.json").exists()
