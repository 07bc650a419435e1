"""Serve autoscaling on the load each half actually carries.

Serve's default policy counts ongoing requests per replica. That is the wrong unit
for both halves: one encoder call may carry one image or eight, and one decoder
request may owe 4 output tokens or 4,000. So each replica reports its own load
through Serve's custom-metrics hook (`record_autoscaling_stats` on the deployment
class), and `LoadPerReplica` sizes the deployment to it:

- encoder: `images_in_flight`, the images of the calls the replica is working on;
- decoder: `tokens_in_flight`, the output tokens the replica still owes its requests
  (each request's `max_tokens` minus what it has generated).

A Serve config selects it per deployment:

    autoscaling_config:
      policy:
        policy_function: deploy.autoscaling:LoadPerReplica
        policy_kwargs: {metric: tokens_in_flight, target_per_replica: 4096}

Serve wraps the policy with the rest of `autoscaling_config` (min/max replicas,
upscale/downscale delays, scaling factors), so this only answers "how many replicas
would carry this load at the target". Serve pickles this module by value into its
controller: it must import nothing beyond the standard library.
"""

from __future__ import annotations

from typing import Any

IMAGES_IN_FLIGHT = "images_in_flight"
TOKENS_IN_FLIGHT = "tokens_in_flight"


class LoadPerReplica:
    """Desired replicas = (metric summed over running replicas) / target_per_replica."""

    def __init__(self, metric: str, target_per_replica: float) -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric: must be a metric name, got {metric!r}")
        if isinstance(target_per_replica, bool) or not isinstance(target_per_replica, (int, float)) \
                or target_per_replica <= 0:
            raise ValueError(f"target_per_replica: must be a positive number, got {target_per_replica!r}")
        self.metric = metric
        self.target_per_replica = float(target_per_replica)

    def __call__(self, ctx: Any) -> tuple[float, dict]:
        # ctx: ray.serve.config.AutoscalingContext. aggregated_metrics: {metric: {replica: value
        # averaged over look_back_period_s}}, running replicas only.
        per_replica = (ctx.aggregated_metrics or {}).get(self.metric)
        if not per_replica:  # no report yet (replicas still warming up): hold
            return ctx.target_num_replicas, {}
        return sum(per_replica.values()) / self.target_per_replica, {}
