"""The app builder: `import_path: deploy.app:build_app` in a Serve config.

One builder, two layouts:
- `disaggregated` (default): router -> encoder deployment + decoder deployment, each
  with its own replicas, resources and autoscaling;
- `colocated`: router -> one deployment whose replicas hold both halves.

Deployment names are fixed (`router`, `encoder`, `decoder`, `colocated`) so a Serve
config's `deployments:` section can set replicas, `ray_actor_options` (TPU chips)
and `autoscaling_config` per deployment. Cross-deployment settings are derived
here, once, from one `model`, `device` and `max_image_bytes`, so the halves cannot
disagree, and the deploy is checked against the model's geometry before anything
starts (`check_deploy`): a deploy that could never serve fails here, with the cause.

Routing (`routing`): "affinity" (default) gives the encoder and decoder deployments
the image-affinity request router (`deploy/affinity.py`), so an image's calls reach
the replica that caches it; "default" keeps Serve's power-of-two-choices router.
Embeddings are stored in the decoder's dtype (the encoder's `embedding_dtype` is
derived here), and the router's references count against `router_refs_bytes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from decoder_service.config import DecoderConfig
from decoder_service.text_config import check_text_config, position_limit
from deploy.affinity import ROUTER_CLASS
from deploy.colocated import ColocatedDeployment
from deploy.decoder import DRAIN_OPTIONS, DecoderDeployment
from deploy.encoder import EncoderDeployment
from deploy.router import RouterServer
from encoder_service.anyres import AnyresLayout
from encoder_service.config import EncoderConfig
from router.http_api import DEFAULT_MAX_REQUEST_BYTES
from router.images import FetchPolicy
from runtime.checkpoint import is_anyres, open_config
from runtime.geometry import ModelGeometry, geometry_of, warn_if_misstated
from runtime.limits import MAX_IMAGE_BYTES

# The router only waits on I/O: it asks for no CPU, so it always fits beside the services.
# It relays streams, so a router replica that is being replaced drains like a decoder replica.
# It never imports torch (RouterServer blocks it: runtime/no_torch.py).
RouterDeployment = serve.deployment(
    name="router", max_ongoing_requests=512, ray_actor_options={"num_cpus": 0},
    **DRAIN_OPTIONS)(RouterServer)


class AppArgs(BaseModel):
    """`args:` of the Serve config (or the CLI's flags)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # checkpoint dir or hub id; None: the cached tiny demo checkpoint
    served_model_name: str | None = None  # default: the checkpoint's directory name
    device: Literal["xla", "cpu", "cuda"] = "xla"
    layout: Literal["disaggregated", "colocated"] = "disaggregated"
    strict_compile: bool = False
    encoder: dict[str, Any] = Field(default_factory=dict)  # EncoderConfig fields
    decoder: dict[str, Any] = Field(default_factory=dict)  # DecoderConfig fields
    fetch: dict[str, Any] = Field(default_factory=dict)  # router.images.FetchPolicy fields
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, ge=1)  # larger bodies: 413
    max_image_bytes: int = Field(default=MAX_IMAGE_BYTES, ge=1)  # per image: router and encoder
    # How long a replica being replaced or scaled down may take to finish its requests.
    drain_timeout_s: float | None = Field(default=None, gt=0)  # None: the deployments' defaults
    encoder_replicas: int | None = Field(default=None, ge=1)
    decoder_replicas: int | None = Field(default=None, ge=1)
    router_replicas: int | None = Field(default=None, ge=1)
    routing: Literal["affinity", "default"] = "affinity"  # encoder and decoder request routers
    # Requests by which an image's owner may be busier than the least loaded replica before a
    # call goes to the least loaded one instead.
    imbalance_threshold: int = Field(default=4, ge=0)
    # Bytes of embeddings each router replica's references keep alive (docs/deploy.md budgets).
    router_refs_bytes: int = Field(default=64 * 2**20, ge=0)
    # torch_xla's persistent compilation cache root (None: $XDG_CACHE_HOME/splitserve/xla); used
    # only where a smoke check shows the backend reloads executables (runtime/compile_cache.py).
    compile_cache: str | None = None


def resolve_model(model: str | None) -> str:
    if model:
        return model
    from deploy.demo_checkpoint import cached_demo_checkpoint

    return str(cached_demo_checkpoint("tiny"))


def _options(replicas: int | None) -> dict:
    return {} if replicas is None else {"num_replicas": replicas}


def _routing(args: AppArgs) -> dict:
    if args.routing == "default":
        return {}
    from ray.serve.config import RequestRouterConfig

    return {"request_router_config": RequestRouterConfig(
        request_router_class=ROUTER_CLASS,
        request_router_kwargs={"imbalance_threshold": args.imbalance_threshold})}


def build_app(args: dict | AppArgs | None = None) -> serve.Application:
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    model = resolve_model(args.model)
    for name, section in (("encoder", args.encoder), ("decoder", args.decoder), ("fetch", args.fetch)):
        for key in {"model", "device", "max_image_bytes"} & section.keys():
            raise ValueError(f"{name}.{key}: set `{key}` once, at the top, for every deployment")
    if "embedding_dtype" in args.encoder:
        raise ValueError("encoder.embedding_dtype: embeddings are stored in the decoder's dtype; "
                         "set decoder.dtype")
    common = {"model": model, "device": args.device, "strict_compile": args.strict_compile}
    decoder_config = DecoderConfig(**{**args.decoder, **common})
    encoder_config = EncoderConfig(**{**args.encoder, **common, "max_image_bytes": args.max_image_bytes,
                                      "embedding_dtype": decoder_config.dtype})
    fetch = {**args.fetch, "max_image_bytes": args.max_image_bytes}
    if "allowed_hosts" in fetch:
        fetch["allowed_hosts"] = frozenset(fetch["allowed_hosts"])
    check_deploy(model, encoder_config, decoder_config, FetchPolicy(**fetch))
    settings = {"model": model,
                "served_model_name": args.served_model_name or Path(model.rstrip("/")).name or model,
                "fetch": fetch, "max_request_bytes": args.max_request_bytes,
                "known_refs_bytes": args.router_refs_bytes}
    drain = {} if args.drain_timeout_s is None else {"graceful_shutdown_timeout_s": args.drain_timeout_s}

    if args.layout == "disaggregated":
        routing = _routing(args)
        encoder = EncoderDeployment.options(**_options(args.encoder_replicas), **drain, **routing).bind(
            encoder_config, args.compile_cache)
        decoder = DecoderDeployment.options(**_options(args.decoder_replicas), **drain, **routing).bind(
            decoder_config, args.compile_cache)
    else:
        if args.encoder_replicas or args.decoder_replicas:
            raise ValueError("encoder_replicas/decoder_replicas: the colocated layout has one "
                             "deployment; set its replicas in the Serve config")
        encoder = decoder = ColocatedDeployment.options(**{**DRAIN_OPTIONS, **drain}).bind(
            encoder_config, decoder_config, args.compile_cache)
    return RouterDeployment.options(**_options(args.router_replicas), **drain).bind(
        encoder, decoder, settings)


def check_deploy(model: str, encoder: EncoderConfig, decoder: DecoderConfig,
                 fetch: FetchPolicy) -> ModelGeometry:
    """Cross-deployment invariants, checked before any replica starts; ValueError says which.

    Reads the checkpoint's config and processor only (a hub id fetches no weights)."""
    from transformers import AutoProcessor

    from router.prompt import PromptBuilder

    config = open_config(model)
    geometry = geometry_of(config)  # the one rule for tokens per image; refuses unknown towers
    warn_if_misstated(model, config, geometry)
    max_model_len = decoder.max_model_len or position_limit(config.text_config)[0]
    # The router expands <image> with the same count: refuses a processor that disagrees.
    # LLaVA-NeXT's count varies per image; the processor must be able to say it, and the
    # encoder must be able to pack its tiles (strategy, pinpoints).
    if is_anyres(config):
        AnyresLayout.of(config)
    PromptBuilder(AutoProcessor.from_pretrained(model),
                  None if is_anyres(config) else geometry.tokens_per_image)
    # A language model the decoder computes, within max_position_embeddings (or a shorter window).
    check_text_config(config.text_config, max_model_len)
    if max_model_len <= geometry.tokens_per_image + 1:
        raise ValueError(f"decoder.max_model_len: {max_model_len} tokens cannot hold one image "
                         f"({geometry.tokens_per_image} tokens) and a reply")
    if fetch.max_image_bytes != encoder.max_image_bytes:  # one value by construction; kept honest
        raise ValueError(f"max_image_bytes: the router fetches up to {fetch.max_image_bytes} bytes, "
                         f"the encoder accepts {encoder.max_image_bytes}")
    return geometry
