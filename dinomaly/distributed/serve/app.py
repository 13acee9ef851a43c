"""Ray Serve scoring service: a FastAPI ingress around `ScoringService`, with dynamic batching.

    model URI --resolve_model--> local checkpoint dir --ScoringService--> Predictor (the core's scoring)
    HTTP image --create_api (routes.py: validation, limits, auth)--> @serve.batch --> one forward per batch

`build_app(model_uri, config)` is what `pipelines/serve.py`, `serve run pipelines.serve:app` and
`serve deploy cluster/serve_config.yaml` all deploy. Routes: POST /v1/predict, POST /v1/predict/batch
(both take ?class=), GET /v1/model, PUT /v1/thresholds, GET /healthz, GET /readyz, the page at /, OpenAPI
at /docs.

Thresholds change at run time without reloading weights: user_config {"thresholds": {"global": t,
"classes": {name: t}}} reaches every replica's `reconfigure`. PUT /v1/thresholds redeploys the app with that
user_config; the deployment's version is pinned to the model and config, so Serve only calls `reconfigure`
on the running replicas (and gives new replicas the same user_config) instead of restarting them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from ray import serve
from ray.serve import Application

from dinomaly.config import Config, to_dict
from dinomaly.distributed.cluster import ensure_ray
from dinomaly.distributed.models import resolve_model
from dinomaly.distributed.resources import ResourcesUnavailable, check_resources, serve_request
from dinomaly.distributed.serve.routes import create_api, direct_url
from dinomaly.serving_api import (
    ModelInfo,
    ScoringService,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the Serve deployment


@serve.deployment(logging_config={"enable_access_log": False})
@serve.ingress()
class DinomalyScorer:
    """One replica: resolves and loads the model once, then scores batches of requests.

    user_config (serve deploy / reconfigure / PUT /v1/thresholds) may set max_batch_size,
    batch_wait_timeout_s and thresholds live, without reloading the weights.
    """

    def __init__(self, model_uri: str, config: Config, version: str = ""):
        torch.set_num_threads(max(1, math.ceil(config.serve.num_cpus)))
        self.model_uri, self.config, self.version = model_uri, config, version
        resolved = resolve_model(model_uri, config)
        try:  # the weights are in memory once loaded: a downloaded copy is not kept for the replica's lifetime
            self.service = ScoringService.from_checkpoint(
                resolved.directory, config.serve, name=resolved.name, version=resolved.version,
                source=resolved.source, tags=resolved.tags, metrics=resolved.metrics,
                fast_decode=config.data.fast_decode)
        finally:
            resolved.cleanup()
        self.user_config: dict[str, Any] = {}
        self._scoring = 0  # requests between decode and answer
        self.reconfigure({"max_batch_size": config.serve.max_batch_size,
                          "batch_wait_timeout_s": config.serve.batch_wait_timeout_s})
        info = self.service.info
        # no `.classes` attribute access in this class: cloudpickle would try to ship torch.classes with it
        logger.info("serving %s version %s from %s, global threshold %.6g (%s), thresholds %s", info.name,
                    info.version, info.source, info.threshold, info.threshold_source, self.service.thresholds_view())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        if "thresholds" in user_config:  # checked first: a bad table changes nothing
            self.service.set_threshold_update(user_config["thresholds"])
        if "max_batch_size" in user_config:
            self._score_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._score_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        self.user_config = {**self.user_config, **user_config}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _score_batch(self, inputs: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        # in a thread, so the replica keeps decoding the next requests while the model runs
        return await asyncio.to_thread(self.service.score, inputs)

    async def _score(self, model_input: np.ndarray) -> tuple[float, np.ndarray]:
        """A request alone in the replica is scored at once; with others it joins their dynamic batch. So a
        lone request never waits batch_wait_timeout_s for a batch that will not fill."""
        self._scoring += 1
        try:
            if self._scoring == 1:
                [result] = await asyncio.to_thread(self.service.score, [model_input])
                return result
            return await self._score_batch(model_input)
        finally:
            self._scoring -= 1

    async def _publish(self, update: dict[str, Any], request: Request) -> None:
        """Redeploy this app with the update in its user_config: Serve calls reconfigure on every replica."""
        app_name = serve.get_replica_context().app_name
        route_prefix = request.scope.get("root_path") or "/"
        user_config = {**self.user_config, "thresholds": update}
        app = build_app(self.model_uri, self.config, user_config, self.version)
        await asyncio.to_thread(serve.run, app, name=app_name, route_prefix=route_prefix)

    async def direct_url(self) -> str | None:
        """This replica's own URL under serve.direct_ingress (None when off)."""
        s = self.config.serve
        return direct_url(s.host, s.route_prefix) if s.direct_ingress else None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.service, self._score, self._publish)


# serve.direct_ingress: Ray 2.60's switch; a short drain on shutdown (Ray's default, 30 s, is for a load
# balancer to deregister the replica; in-flight requests are drained either way); and the handlers on the
# replica's own event loop: without the proxy hop, the hop to a separate user-code loop is the largest cost
# left (tiny model: efficiency 0.50 -> 0.60). The handlers keep decoding and the model in threads.
DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
                      "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def deployment_options(config: Config) -> dict[str, Any]:
    """Replicas (fixed or autoscaled), resources and concurrency from `config.serve`."""
    s = config.serve
    options: dict[str, Any] = {"max_ongoing_requests": s.max_ongoing_requests,
                               "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}}
    if s.direct_ingress:  # read by the replica process only: the proxy and other apps are unchanged
        options["ray_actor_options"]["runtime_env"] = {"env_vars": DIRECT_INGRESS_ENV}
    if s.max_replicas > s.num_replicas:
        options["autoscaling_config"] = {"min_replicas": s.num_replicas, "initial_replicas": s.num_replicas,
                                         "max_replicas": s.max_replicas, "target_ongoing_requests": s.max_batch_size}
    else:
        options["num_replicas"] = s.num_replicas
    return options


@functools.cache
def _code_digest() -> str:
    """A digest of dinomaly's source: new code is a new deployment version, so replicas restart on it."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def deployment_version(model_uri: str, config: Config) -> str:
    """Serve's code version of the deployment: the same model, config and code give the same version, so a
    redeploy that changes only user_config reconfigures the running replicas instead of replacing them."""
    key = json.dumps([model_uri, to_dict(config), _code_digest()], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def build_app(model_uri: str, config: Config, user_config: dict[str, Any] | None = None,
              version: str = "") -> Application:
    """The Serve application scoring with `model_uri` (checkpoint dir, s3:// dir or models:/...).

    user_config defaults to no run-time threshold changes, so a plain redeploy puts the model's own back.
    version: the deployment version to keep (a replica redeploying itself passes its own); '' = computed."""
    # a pinned version is what makes a user_config-only redeploy a reconfigure instead of a restart. Ray 2.60
    # has no public way to pin it from Python: serve.run gives a deployment without a version a random one (so
    # every redeploy replaces the replicas) and the public options() refuses `version`; only `serve deploy`
    # configs keep replicas, and they need an import path and the dashboard
    version = version or deployment_version(model_uri, config)
    deployment = DinomalyScorer.options(**deployment_options(config), user_config=user_config or {"thresholds": {}},
                                        version=version, _internal=True)
    return deployment.bind(model_uri, config, version)


def check_model(model_uri: str, config: Config) -> ModelInfo:
    """Load the model as a replica would, on the driver, so a bad model fails before any Serve start-up.

    Raises ValueError / FileNotFoundError naming the problem (missing files, no threshold, bad token setup).
    """
    resolved = resolve_model(model_uri, config)
    try:
        return ScoringService.from_checkpoint(resolved.directory, config.serve, name=resolved.name,
                                              version=resolved.version, source=resolved.source,
                                              tags=resolved.tags, metrics=resolved.metrics).info
    finally:
        resolved.cleanup()


APP_NAME = "dinomaly"
STOP_WAIT_S = 20.0  # a graceful stop takes about 8 s on 2 cores


def start(model_uri: str, config: Config) -> str:
    """Deploy on the running (or a new local) Ray cluster; returns the app URL once it serves.

    HTTP binds config.serve.host:port (127.0.0.1 unless configured). serve.run blocks until every replica
    has loaded the model; a replica that cannot load fails the call instead of restarting forever. Before
    that, the replicas' CPUs/GPUs must be free within cluster.start_timeout_s, else ResourcesUnavailable
    names what holds them (Serve itself would wait for them without end).
    """
    ensure_ray(log_to_driver=False)  # RAY_ADDRESS, when set, attaches to that cluster instead
    if APP_NAME not in serve.status().applications:  # a redeploy replaces the app's own replicas: no check
        check_resources(serve_request(config, APP_NAME), config.cluster.start_timeout_s)
    s = config.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_app(model_uri, config), name=APP_NAME, route_prefix=s.route_prefix)
    return f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}/"


def direct_urls(config: Config, timeout_s: float = 30.0) -> list[str]:
    """The replicas' own URLs under serve.direct_ingress, as far as one call per replica finds them."""
    if not config.serve.direct_ingress:
        return []
    handle = serve.get_app_handle(APP_NAME)
    deadline, urls = time.monotonic() + timeout_s, set()
    while time.monotonic() < deadline and len(urls) < config.serve.num_replicas:
        url = handle.direct_url.remote().result(timeout_s=timeout_s)
        if url:
            urls.add(url)
        else:
            time.sleep(0.2)  # its server is still starting
    return sorted(urls)


def stop() -> None:
    """Remove the app and shut Serve down (the Ray cluster itself is left to whoever started it)."""
    serve.delete(APP_NAME)
    serve.shutdown()


def serve_until_stopped(model_uri: str, config: Config, info: ModelInfo) -> int:
    """The serve job as the entry point runs it: deploy, print the URL, serve until Ctrl-C or SIGTERM."""
    import signal
    import sys

    try:
        url = start(model_uri, config)
    except RuntimeError as err:  # a replica failed to start (e.g. out of memory); Serve gave up
        if isinstance(err, ResourcesUnavailable):
            raise
        print(f"error: the deployment failed: {err}", file=sys.stderr)
        return 1
    print(f"ready: {url}  model {info.name} version {info.version}, threshold {info.threshold:.6g} "
          f"({info.threshold_source}); API docs at {url}docs; Ctrl-C stops", flush=True)
    for direct in direct_urls(config):
        print(f"direct (one replica, no proxy hop): {direct}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        # a SIGTERM to the whole process group (timeout, systemd, a container stop) stops Ray's own processes
        # too, and Serve's shutdown then waits a minute for the dead GCS: give it STOP_WAIT_S, then leave
        stopper = threading.Thread(target=stop, daemon=True)
        stopper.start()
        stopper.join(STOP_WAIT_S)
        if stopper.is_alive():
            print(f"Serve did not stop within {STOP_WAIT_S:.0f} s (Ray's processes got the signal too); exiting",
                  file=sys.stderr, flush=True)
            os._exit(0)
    return 0
