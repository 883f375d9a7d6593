"""A worker process: `python -m mii.worker.main --deployment NAME [--replica I]`.

It reads the deployment's config from Redis (`MII_REDIS_URL` or `--redis-url`), builds
its engine, and serves until SIGTERM (drain: finish in-flight work, hand back the rest;
a second SIGTERM hands back at once) or the deployment's `terminate`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback

from mii.broker_config.keys import process_name
from mii.broker_config.settings import DEFAULT_REDIS_URL, explicit_redis_url
from mii.worker.engine_factory import DEFAULT_FACTORY
from mii.worker.hosting import build_worker
from mii.worker.loop import WorkerLoop

log = logging.getLogger("mii.worker")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mii-worker", description=__doc__)
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--redis-url", default=None, help="default: $MII_REDIS_URL")
    parser.add_argument("--replica", type=int, default=0, help="which replica's devices")
    parser.add_argument("--engine-factory", default=DEFAULT_FACTORY)
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def install_signal_handlers(loop: WorkerLoop) -> None:
    def on_signal(signum, _frame):
        if loop.draining:
            log.info("second signal %d: handing back in-flight requests", signum)
            loop.stop()
        else:
            log.info("signal %d: draining", signum)
            loop.drain()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s")
    url = explicit_redis_url(args.redis_url) or DEFAULT_REDIS_URL
    try:
        hosted = build_worker(args.deployment, url, args.replica, args.engine_factory)
    except Exception:
        traceback.print_exc()
        return 1
    install_signal_handlers(hosted.loop)
    try:
        hosted.loop.run()
    finally:
        hosted.close()
    log.info("worker %s stopped: %s", process_name(), hosted.loop.stats.as_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
