"""`mii gateway DEPLOYMENT`: serve a deployment's HTTP API (OpenAI's, MII's, Batch API)."""

from __future__ import annotations

import argparse

from mii.gateway.settings import API_KEYS_ENV, GatewaySettings


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("deployment", help="deployment (or model) name")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--redis-url", default=None, help="default: $MII_REDIS_URL")
    p.add_argument("--api-key", action="append", default=[],
                   help=f"a key clients must send (repeatable; also ${API_KEYS_ENV})")  # fmt: skip
    p.add_argument("--max-body-mb", type=float, default=64.0, help="request body limit")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds per request (default: the deployment's)")  # fmt: skip
    p.add_argument("--cors-origin", action="append", default=[], help="allowed origin (or *)")
    p.add_argument("--files-dir", default=None, help="keep uploaded files here, not in Redis")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    p.add_argument("--log-level", default="info")


def settings_from_args(args) -> GatewaySettings:
    return GatewaySettings(
        deployment=args.deployment,
        redis_url=args.redis_url,
        host=args.host,
        port=args.port,
        api_keys=tuple(args.api_key),
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        request_timeout_s=args.request_timeout,
        cors_origins=tuple(args.cors_origin),
        files_dir=args.files_dir,
    )


def run_gateway(args) -> int:
    from mii.extras import require

    require("gateway", "mii gateway")
    from mii.gateway.server import serve

    serve(settings_from_args(args), log_level=args.log_level, workers=args.workers)
    return 0


def main(argv=None) -> int:
    """`python -m mii.gateway ...` (what `mii.serve(enable_restful_api=True)` starts)."""
    parser = argparse.ArgumentParser(prog="mii gateway", description=__doc__)
    add_gateway_args(parser)
    return run_gateway(parser.parse_args(argv))
