"""The same FastAPI app on Ray Serve: one deployment, N replicas, one model copy per replica.

Nothing here serves a request: the deployment class only builds the engine in its replica
(`__init__`) and hands Ray the app from api_server.build_app through `@serve.ingress`'s late-bound
hook (`__serve_build_asgi_app__`, Ray >= 2.5x), so the single-machine server and the Ray
deployment share every line but this wrapper. Scaling is configuration: `num_replicas`, or an
autoscaling range that Ray Serve drives from each replica's ongoing requests.

    tokenskip serve --onnx out/export --ray --replicas 2
    tokenskip serve --onnx out/export --ray --replicas 1 --max-replicas 4   # autoscaling 1..4
    serve run tokenskip.deploy.serve.ray_app:app_builder spec=serve-spec.json   # `serve run` / KubeRay
"""

from __future__ import annotations

import json
from pathlib import Path

from ray import serve

from .launch import ServeSpec, build_async_engine


@serve.ingress()
class TokenskipServer:
    """One replica: its own backend, scheduler thread and metrics."""

    def __init__(self, spec: dict) -> None:
        self.engine, self.name = build_async_engine(ServeSpec(**spec))

    def check_health(self) -> None:
        """Ray Serve calls this periodically: a failed or stopped engine marks the replica unhealthy,
        and Ray replaces it (a draining one is healthy: it finishes its requests)."""
        check_engine(self.engine)

    def __serve_build_asgi_app__(self):
        from .api_server import build_app

        return build_app(self.engine, self.name)


def check_engine(engine) -> None:
    if engine.state in ("failed", "stopped"):
        raise RuntimeError(f"tokenskip engine {engine.state}: {engine.scheduler.last_fault or 'its thread ended'}")


def deployment_options(replicas: int, max_replicas: int | None, cpus_per_replica: float, gpus_per_replica: float,
                       settings: dict) -> dict:
    """Ray Serve options. A replica takes one batch of requests (`max_ongoing_requests` = --max-batch),
    so Ray's router sends each request to a replica with a free row; the others wait in Ray's
    queue, bounded by --max-queue per replica (`max_queued_requests`), past which Ray answers 503.
    (With batch + queue as max_ongoing_requests, a replica's own queue took the overflow and
    Ray's queue never filled, so the promised 503 never came.)"""
    from .runner import DRAIN_TIMEOUT_S

    batch = int(settings.get("max_batch", 32))
    opts = {"name": "tokenskip", "max_ongoing_requests": batch,
            "max_queued_requests": int(settings.get("max_waiting", 256)),
            "health_check_period_s": 10, "health_check_timeout_s": 30,
            # a replica being stopped (SIGTERM to `serve --ray`, a scale-down) finishes its requests first
            "graceful_shutdown_timeout_s": float(settings.get("request_timeout_s") or DRAIN_TIMEOUT_S),
            "graceful_shutdown_wait_loop_s": 1.0,
            "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}}
    if max_replicas is not None and max_replicas > replicas:
        opts["autoscaling_config"] = {
            "min_replicas": replicas, "initial_replicas": replicas, "max_replicas": max_replicas,
            # scale up when replicas run more than 3/4 full (queued requests count as ongoing)
            "target_ongoing_requests": max(1, batch * 3 // 4),
            "upscale_delay_s": 10, "downscale_delay_s": 120}
    else:
        opts["num_replicas"] = replicas
    return opts


def bind(spec: ServeSpec, replicas: int = 1, max_replicas: int | None = None, cpus_per_replica: float = 1.0,
         gpus_per_replica: float = 0.0):
    opts = deployment_options(replicas, max_replicas, cpus_per_replica, gpus_per_replica, spec.settings)
    return serve.deployment(TokenskipServer).options(**opts).bind(spec.to_json())


def app_builder(args: dict):
    """`serve run tokenskip.deploy.serve.ray_app:app_builder spec=FILE [replicas=N max_replicas=M
    cpus_per_replica=C gpus_per_replica=G]`: FILE is the JSON `tokenskip serve --write-spec FILE`
    writes (the same flags, resolved)."""
    spec = ServeSpec(**json.loads(Path(args["spec"]).read_text(encoding="utf-8")))
    max_replicas = args.get("max_replicas")
    return bind(spec, int(args.get("replicas", 1)), int(max_replicas) if max_replicas else None,
                float(args.get("cpus_per_replica", 1.0)), float(args.get("gpus_per_replica", 0.0)))


def run(spec: ServeSpec, *, host: str, port: int, replicas: int, max_replicas: int | None, cpus_per_replica: float,
        gpus_per_replica: float, address: str | None, blocking: bool = True):
    """Start (or join) a Ray cluster, start Serve's HTTP proxy on host:port and deploy."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(2, int(replicas * cpus_per_replica + 0.999))}))
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(bind(spec, replicas, max_replicas, cpus_per_replica, gpus_per_replica), name="tokenskip",
                       route_prefix="/", blocking=False)
    if blocking:
        wait_for_signal()
        drain()
    return handle


def drain(app: str = "tokenskip") -> None:
    """SIGTERM/SIGINT: the requests in flight finish, then Ray stops. Deleting the application first
    keeps the HTTP proxy up while Serve stops routing to the replicas and waits for their ongoing
    requests (graceful_shutdown_timeout_s); new requests meanwhile get an error. (`serve.shutdown()`
    alone killed the proxy with the streams still open: clients got an empty reply.) A second
    signal exits at once (wait_for_signal has put the previous handlers back)."""
    import ray

    serve.delete(app, _blocking=True)
    serve.shutdown()
    ray.shutdown()


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT, handled in Python: Ray's own handling of a signal to the
    driver printed a native stack dump instead of a shutdown."""
    import signal
    import threading

    got = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: got.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not got.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
