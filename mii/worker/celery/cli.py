"""`mii worker` (a Celery worker hosting one replica of a deployment) and `mii flower`."""

from __future__ import annotations

import argparse
import os
import re

from mii.broker_config.settings import DEFAULT_REDIS_URL, explicit_redis_url


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deployment", required=True)
    p.add_argument(
        "--model",
        default=None,
        help="record the deployment with this model first if it is not recorded",
    )
    p.add_argument("--tensor-parallel", type=int, default=1, help="with --model")
    p.add_argument("--devices", default=None, help="CUDA devices of this worker, e.g. 0,1")
    p.add_argument("--replica", type=int, default=0)
    p.add_argument("--engine-factory", default=None, help="module:function (default: the engine)")
    p.add_argument("--redis-url", default=None, help="default: $MII_REDIS_URL")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics")
    p.add_argument(
        "--metrics-address",
        default=None,
        help="interface of the metrics port (default 127.0.0.1; 0.0.0.0: every interface)",
    )
    p.add_argument("--loglevel", default="INFO")  # fmt: skip


def node_name(deployment: str, replica: int) -> str:
    return f"mii-{re.sub(r'[^A-Za-z0-9_-]', '_', deployment)}-{replica}@%h"


def run_worker(args) -> int:
    from mii.worker.celery.app import make_app
    from mii.worker.celery.bootstep import EXIT_CODE_ATTR

    url = explicit_redis_url(args.redis_url) or DEFAULT_REDIS_URL
    if args.devices:  # before anything initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = args.devices
    if args.model:
        _record_if_missing(url, args.deployment, args.model, args.tensor_parallel)
    argv = [
        "worker", f"--hostname={node_name(args.deployment, args.replica)}", "--pool=solo",
        "--concurrency=1", f"--loglevel={args.loglevel}", "--without-mingle",
        "--without-gossip", "--task-events", f"--queues=mii.{args.deployment}",
        f"--deployment={args.deployment}", f"--replica={args.replica}",
    ]  # fmt: skip
    if args.engine_factory:
        argv.append(f"--engine-factory={args.engine_factory}")
    if args.metrics_port:
        argv.append(f"--metrics-port={args.metrics_port}")
    if args.metrics_address:
        argv.append(f"--metrics-address={args.metrics_address}")
    app = make_app(url)
    app.worker_main(argv)
    # Celery drops its worker's exit code; the engine loop's bootstep leaves it on the app:
    # non-zero when the engine broke, so that supervisors restart the worker
    return getattr(app, EXIT_CODE_ATTR, 0)


def _record_if_missing(url: str, deployment: str, model: str, tensor_parallel: int) -> None:
    from mii.broker_config.connection import connect
    from mii.broker_config.deployment import DeploymentRecord, load_record, save_record
    from mii.broker_config.keys import DeploymentKeys
    from mii.config import MIIConfig

    redis, keys = connect(url), DeploymentKeys(deployment)
    try:
        load_record(redis, keys)
        return
    except Exception:  # noqa: BLE001 (no record yet: make one)
        pass
    config = MIIConfig(
        deployment_name=deployment,
        model_config={"model_name_or_path": model, "tensor_parallel": tensor_parallel},
    )
    mii_config = config.model_dump(mode="json", by_alias=True, exclude={"redis_url"})
    save_record(redis, keys, DeploymentRecord(mii_config=mii_config))


def add_flower_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument(
        "--basic-auth",
        default=os.environ.get("MII_FLOWER_AUTH"),
        help="user:password (default $MII_FLOWER_AUTH); required unless --no-auth",
    )
    p.add_argument("--no-auth", action="store_true", help="serve without a password")
    p.add_argument("--redis-url", default=None)  # fmt: skip


def run_flower(args) -> int:
    """Flower on the deployment's Redis (the Celery broker), with basic auth on; its
    Prometheus metrics are at /metrics (behind the same basic auth)."""
    from mii.worker.celery.app import make_app
    from mii.worker.celery.flower_auth import protect_metrics

    if not args.basic_auth and not args.no_auth:
        raise SystemExit("mii flower: give --basic-auth user:password (or --no-auth)")
    url = explicit_redis_url(args.redis_url) or DEFAULT_REDIS_URL
    argv = ["flower", f"--port={args.port}", f"--address={args.address}"]
    if args.basic_auth:
        argv.append(f"--basic-auth={args.basic_auth}")
    protect_metrics()
    make_app(url).start(argv=argv)
    return 0
