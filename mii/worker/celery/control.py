"""`mii control pause|resume DEPLOYMENT`: Celery's remote control of a deployment's workers,
the same as `celery -A mii.worker.celery.app -b $MII_REDIS_URL control mii_pause` aimed at
that deployment's workers only (their node names are `mii-<deployment>-<replica>@<host>`).

pause: the workers stop reading new requests and finish those in flight (others, or the
same after `resume`, serve what stays queued). resume: they read again.
"""

from __future__ import annotations

import argparse
import re

from mii.broker_config.settings import DEFAULT_REDIS_URL, celery_broker_url, explicit_redis_url
from mii.errors import MIIError

ACTIONS = {"pause": "mii_pause", "resume": "mii_resume"}


def add_control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=sorted(ACTIONS), help="pause: finish what is in flight, "
                   "take nothing new; resume: take work again")  # fmt: skip
    p.add_argument("deployment")
    p.add_argument("--redis-url", default=None, help="default: $MII_REDIS_URL")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for replies")


def node_pattern(deployment: str) -> str:
    """A regular expression matching the node names of the deployment's workers."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", deployment)
    return rf"^mii-{re.escape(safe)}-\d+@.*$"


def run_control(args) -> int:
    from mii.extras import require

    require("flower", "mii control")
    replies = broadcast(
        explicit_redis_url(args.redis_url) or DEFAULT_REDIS_URL,
        ACTIONS[args.action],
        args.deployment,
        args.timeout,
    )
    if not replies:
        raise MIIError(
            f"no worker of {args.deployment!r} answered within {args.timeout:g}s (are they "
            "running, on this Redis?)"
        )
    for node, reply in sorted(replies.items()):
        print(f"{node}: {_describe(reply)}")
    return 0


def broadcast(url: str, command: str, deployment: str, timeout_s: float) -> dict[str, dict]:
    """Send `command` to the deployment's workers; node name -> reply."""
    from celery import Celery

    app = Celery("mii", broker=celery_broker_url(url), set_as_current=False)
    app.conf.update(accept_content=["json"], task_serializer="json", result_serializer="json")
    try:
        answers = app.control.broadcast(
            command,
            reply=True,
            timeout=timeout_s,
            pattern=node_pattern(deployment),
            matcher="pcre",
        )
    finally:
        app.close()
    return {node: reply for answer in answers for node, reply in answer.items()}


def _describe(reply: dict) -> str:
    if "error" in reply:
        return f"error: {reply['error']}"
    text = str(reply.get("ok", reply))
    if "in_flight" in reply:
        text += f" ({reply['in_flight']} request(s) in flight finish first)"
    return text
