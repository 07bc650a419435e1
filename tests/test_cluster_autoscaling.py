"""The autoscaling signals: the policy both halves use (deploy/autoscaling.py) and the load each
deployment reports to it. tests/test_cluster_multinode.py watches them move real replicas."""

import asyncio
from types import SimpleNamespace

import pytest

from deploy.autoscaling import IMAGES_IN_FLIGHT, TOKENS_IN_FLIGHT, LoadPerReplica
from deploy.decoder import DecoderServer
from deploy.encoder import EncoderServer
from runtime.messages import GenerateRequest, SamplingParams


class _Context:
    """The fields of ray.serve.config.AutoscalingContext that LoadPerReplica reads."""

    def __init__(self, metrics, target_num_replicas=1):
        self.aggregated_metrics = metrics
        self.target_num_replicas = target_num_replicas


def test_load_per_replica_sizes_to_the_summed_metric():
    policy = LoadPerReplica(metric=TOKENS_IN_FLIGHT, target_per_replica=100)
    assert policy(_Context({TOKENS_IN_FLIGHT: {"a": 150.0, "b": 130.0}}))[0] == pytest.approx(2.8)
    assert policy(_Context({TOKENS_IN_FLIGHT: {"a": 0.0}}))[0] == 0
    # Another half's metric, or none yet (replicas warming up): keep the current target.
    assert policy(_Context({IMAGES_IN_FLIGHT: {"a": 99.0}}, target_num_replicas=3))[0] == 3
    assert policy(_Context(None, target_num_replicas=2))[0] == 2
    for bad in ({"metric": "", "target_per_replica": 1}, {"metric": "x", "target_per_replica": 0},
                {"metric": "x", "target_per_replica": True}):
        with pytest.raises(ValueError):
            LoadPerReplica(**bad)


class _GatedEncoder:
    def __init__(self):
        self.gate = asyncio.Event()

    def close(self):
        pass

    async def encode(self, images, request_id, *, refresh=False, route_key=None):
        await self.gate.wait()
        if request_id == "bad":
            raise RuntimeError("device step failed")
        return ["ref"] * len(images)


def _encoder_server(service) -> EncoderServer:
    server = object.__new__(EncoderServer)  # no checkpoint: only the accounting around `service`
    server.service, server._images_in_flight = service, 0
    return server


async def test_encoder_reports_the_images_it_is_working_on():
    service = _GatedEncoder()
    server = _encoder_server(service)
    calls = [asyncio.create_task(server.encode([b"a", b"b", b"c"], "r1")),
             asyncio.create_task(server.encode([b"d"], "bad"))]
    await asyncio.sleep(0.01)
    assert server.record_autoscaling_stats() == {IMAGES_IN_FLIGHT: 4}
    service.gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == ["ref"] * 3 and isinstance(results[1], RuntimeError)
    assert server.record_autoscaling_stats() == {IMAGES_IN_FLIGHT: 0}


class _ScriptedDecoder:
    """Yields one chunk per token; waits for `step` before each."""

    def __init__(self, num_tokens):
        self.num_tokens = num_tokens
        self.step = asyncio.Semaphore(0)

    def release(self, num_steps):
        for _ in range(num_steps):
            self.step.release()

    def shutdown(self):
        pass

    async def generate(self, request):
        for i in range(self.num_tokens):
            await self.step.acquire()
            yield SimpleNamespace(token_ids=(i,))


def _request(max_tokens: int) -> GenerateRequest:
    return GenerateRequest("r", (1, 2, 3), (), SamplingParams(max_tokens=max_tokens))


async def test_decoder_reports_the_tokens_it_still_owes():
    server = object.__new__(DecoderServer)
    server.service, server._tokens_in_flight = _ScriptedDecoder(num_tokens=3), 0
    stream = server.generate(_request(max_tokens=10))
    server.service.release(1)
    assert (await anext(stream)).token_ids == (0,)
    assert server.record_autoscaling_stats() == {TOKENS_IN_FLIGHT: 9}
    server.service.release(2)
    assert [c.token_ids async for c in stream] == [(1,), (2,)]  # stopped early: owes nothing
    assert server.record_autoscaling_stats() == {TOKENS_IN_FLIGHT: 0}


async def test_decoder_forgets_a_cancelled_request():
    server = object.__new__(DecoderServer)
    server.service, server._tokens_in_flight = _ScriptedDecoder(num_tokens=50), 0
    streams = [server.generate(_request(max_tokens=50)) for _ in range(2)]
    server.service.release(2)
    await asyncio.gather(*(anext(s) for s in streams))
    assert server.record_autoscaling_stats() == {TOKENS_IN_FLIGHT: 98}
    await streams[0].aclose()  # the router cancels: the replica aborts the sequence
    assert server.record_autoscaling_stats() == {TOKENS_IN_FLIGHT: 49}
    await streams[1].aclose()
    assert server.record_autoscaling_stats() == {TOKENS_IN_FLIGHT: 0}
