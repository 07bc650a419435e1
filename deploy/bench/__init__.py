"""`splitserve bench`: a load generator for any OpenAI-compatible chat endpoint.

    workload.py  seeded requests with images from a pool of real photos (repeat ratio = cache hits)
    client.py    one streamed request, timed per chunk (TTFT, ITL, TPOT), errors
    runner.py    fixed concurrency or Poisson arrivals, bounded by a global timeout
    report.py    the metrics `vllm bench serve` reports, as JSON, a text table and a PNG
"""

from deploy.bench.report import format_table, plot_png, write_json
from deploy.bench.runner import BenchConfig, arun_bench, run_bench
from deploy.bench.workload import WorkloadSpec, build_workload

__all__ = ["BenchConfig", "WorkloadSpec", "arun_bench", "build_workload", "format_table",
           "plot_png", "run_bench", "write_json"]
