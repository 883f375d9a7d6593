"""`mii worker` (a Celery worker hosting one replica of a deployment) and `mii flower`."""

from __future__ import annotations

import argparse
import logging
import os
import re

from mii.broker_config.settings import DEFAULT_REDIS_URL, explicit_redis_url

log = logging.getLogger("mii.worker")
WORKER_OWN = frozenset({"deployment_name", "redis_url"})
"""Config fields the worker takes as its own options (--deployment, --redis-url)."""


def add_worker_args(p: argparse.ArgumentParser) -> None:
    from mii.config_options import add_config_options

    p.add_argument("--deployment", required=True)
    p.add_argument(
        "--model",
        default=None,
        help="record the deployment with this model first if it is not recorded (with the "
        "model, deployment and broker options below; otherwise the recorded config applies)",
    )
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
    p.add_argument(
        "--task-prompt-chars",
        default=os.environ.get("MII_TASK_PROMPT_CHARS", "80"),
        type=_prompt_chars,
        help="how much of each prompt Flower shows in the task's args: its first N characters "
        "(0: none, only its length; 'none': all of it) [MII_TASK_PROMPT_CHARS; default 80]",
    )
    add_config_options(p, skip=WORKER_OWN)


def _prompt_chars(text: str) -> str:
    if text.lower() != "none" and (not text.isdigit()):
        raise argparse.ArgumentTypeError(f"a count of characters or 'none', not {text!r}")
    return text.lower()


def node_name(deployment: str, replica: int) -> str:
    return f"mii-{re.sub(r'[^A-Za-z0-9_-]', '_', deployment)}-{replica}@%h"


def run_worker(args) -> int:
    from mii.extras import require

    require("worker", "mii worker")
    from mii.worker.celery.app import make_app
    from mii.worker.celery.bootstep import EXIT_CODE_ATTR

    url = explicit_redis_url(args.redis_url) or DEFAULT_REDIS_URL
    if args.devices:  # before anything initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = args.devices
    if args.model:
        _record_if_missing(url, _mii_config(args))
    else:
        _refuse_config_options(args)
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
    argv.append(f"--task-prompt-chars={args.task_prompt_chars}")
    app = make_app(url)
    if app.conf.broker_url.startswith("memory"):
        log.warning("a Redis Cluster serves this deployment and no plain Redis is named for "
                    "Celery (MII_CELERY_BROKER_URL): Celery runs on memory://, so Flower, task "
                    "events and remote control do not reach this worker")  # fmt: skip
    code = _celery_main(app, argv)
    # The engine loop's bootstep leaves its own code on the app (Celery's worker exits 0
    # after a warm shutdown): non-zero when the engine broke, so supervisors restart it
    return code or getattr(app, EXIT_CODE_ATTR, 0)


def _celery_main(app, argv: list[str]) -> int:
    """`celery worker` with `app`, returning its exit code (`app.worker_main` drops it:
    a worker whose consumer hit an unrecoverable error exits 1 here, not 0)."""
    from celery.bin.celery import celery

    celery.params[0].default = app
    try:
        code = celery.main(args=argv, standalone_mode=False)
    finally:
        celery.params[0].default = None
    return code if isinstance(code, int) else 0


def _mii_config(args):
    """The deployment `--model` and the config options (and MII_* variables) describe."""
    from mii.config_forms import mii_config_of
    from mii.config_options import serve_kwargs

    kwargs = serve_kwargs(args) | {"deployment_name": args.deployment}
    kwargs.pop("redis_url", None)  # each process names its own
    return mii_config_of(args.model, None, None, kwargs)


def _refuse_config_options(args) -> None:
    from mii.config_options import SECTIONS

    given = [n for s in SECTIONS for n in s.config.model_fields
             if n in vars(args) and n not in WORKER_OWN]  # fmt: skip
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ValueError(f"{flags}: config options apply only with --model (a recorded "
                         "deployment's config applies to every worker)")  # fmt: skip


def _record_if_missing(url: str, config) -> None:
    from mii.broker_config.connection import connect
    from mii.broker_config.deployment import DeploymentRecord, load_record, save_record
    from mii.broker_config.keys import DeploymentKeys

    redis, keys = connect(url), DeploymentKeys(config.deployment_name)
    try:
        load_record(redis, keys)
        return
    except Exception:  # noqa: BLE001 (no record yet: make one)
        pass
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
    from mii.extras import require

    require("flower", "mii flower")
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
