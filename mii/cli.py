"""The `mii` command: a small argparse dispatcher.

    mii serve smollm2 --prompt "What is the capital of France?"   # serve, stream, stop
    mii serve smollm2                                            # serve until Ctrl-C
    mii generate smollm2-mii-deployment "Hello" --max-new-tokens 32
    mii terminate smollm2-mii-deployment
    mii bulk submit smollm2-mii-deployment prompts.jsonl --output out.jsonl   # offline job
    mii gateway smollm2-mii-deployment --port 8000                      # OpenAI HTTP API
    mii control pause smollm2-mii-deployment        # workers finish what they hold, take nothing

To add a subcommand, write `_add_NAME(parser)` and `_run_NAME(args) -> int` and list it in
`COMMANDS`.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from importlib import import_module

from mii.errors import MIIError


def user_errors() -> tuple[type[BaseException], ...]:
    """What `main` reports in one line: bad arguments and options (pydantic's errors are
    ValueErrors), missing files, unreachable or refusing Redis servers."""
    from redis import RedisError

    return (MIIError, ValueError, OSError, RedisError)


def _add_serve(p: argparse.ArgumentParser) -> None:
    from mii.config_options import add_config_options

    p.add_argument("model", help="local HF folder, Hub name, or a short name such as smollm2")
    p.add_argument("--prompt", default=None, help="stream one completion, then stop serving")
    _add_generation_options(p)
    add_config_options(p)


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("deployment", help="deployment (or model) name")
    p.add_argument("prompt")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--no-stream", action="store_true", help="print the whole text at the end")
    _add_generation_options(p)


def _add_terminate(p: argparse.ArgumentParser) -> None:
    p.add_argument("deployment")
    p.add_argument("--redis-url", default=None)


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message: the worker applies the model's chat template",
    )


def _generation_kwargs(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}


def _prompt(args):
    """The prompt as given, or with --chat one user message (`Chat`): the worker applies
    its model's chat template, so this host needs no model files."""
    if not args.chat:
        return args.prompt
    from mii.producer.submit import Chat

    return Chat([{"role": "user", "content": args.prompt}])


def _stream_to_stdout(client, prompt: str, kwargs: dict) -> None:
    for delta in client.stream(prompt, **kwargs):
        print(delta.generated_text, end="", flush=True)
    print()


def _run_serve(args) -> int:
    import mii
    from mii.broker_config.settings import redact_url
    from mii.config_options import serve_kwargs

    try:
        client = mii.serve(args.model, **serve_kwargs(args))
    except KeyboardInterrupt:  # what the start made is already stopped and forgotten
        print("mii serve: interrupted while starting", file=sys.stderr)
        return 130
    try:
        if args.prompt is not None:
            prompt = _prompt(args)
            print(f"> {args.prompt}")
            _stream_to_stdout(client, prompt, _generation_kwargs(args))
            return 0
        where = redact_url(client.redis_url)
        print(f"serving {client.deployment_name} at {where}; Ctrl-C stops it", flush=True)
        _wait_for_interrupt(client)
        return 0
    finally:
        client.terminate_server()


def _wait_for_interrupt(client) -> None:
    """Until Ctrl-C, SIGTERM, or the deployment ended: `mii terminate` from elsewhere, or
    its workers failed for good (`DeploymentFailedError`: one line, exit code 1)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        client.wait_for_workers(stop)


def _run_generate(args) -> int:
    import mii

    client = mii.client(args.deployment, redis_url=args.redis_url)
    prompt = _prompt(args)
    _warn_without_workers(client)
    if args.no_stream:
        print(client.generate(prompt, **_generation_kwargs(args))[0].generated_text)
    else:
        _stream_to_stdout(client, prompt, _generation_kwargs(args))
    return 0


def _warn_without_workers(client) -> None:
    """Say so when no worker is alive: the request then waits up to its timeout (a failed
    deployment refuses it instead)."""
    from mii.broker_config.deployment import FAILED, live_workers

    state = client.redis.hget(client.keys.state, "state")
    if state in (FAILED, FAILED.encode()):
        return
    if not live_workers(client.redis, client.keys, client.settings.dead_after_s):
        timeout = client.settings.request_timeout_s
        waits = f"up to {timeout:g}s (broker.request_timeout_s)" if timeout else "until one comes"
        print(
            f"mii generate: no live worker serves {client.deployment_name}; the request "
            f"waits {waits}",
            file=sys.stderr,
        )


def _run_terminate(args) -> int:
    import mii

    mii.client(args.deployment, redis_url=args.redis_url).terminate_server()
    return 0


COMMANDS = {
    "serve": (_add_serve, _run_serve, "start a deployment (workers behind Redis streams)"),
    "generate": (_add_generate, _run_generate, "send a prompt to a running deployment"),
    "terminate": (_add_terminate, _run_terminate, "stop a deployment's workers"),
    "worker": (
        "mii.worker.celery.cli:add_worker_args",
        "mii.worker.celery.cli:run_worker",
        "run a Celery worker serving one replica",
    ),
    "control": (
        "mii.worker.celery.control:add_control_args",
        "mii.worker.celery.control:run_control",
        "pause or resume a deployment's workers (Celery remote control)",
    ),
    "flower": (
        "mii.worker.celery.cli:add_flower_args",
        "mii.worker.celery.cli:run_flower",
        "start Flower (basic auth) on the deployment's Redis",
    ),
    "bulk": (
        "mii.producer.bulk.cli:add_bulk_args",
        "mii.producer.bulk.cli:run_bulk",
        "offline bulk jobs: submit, status, wait, results, cancel",
    ),
    "gateway": (
        "mii.gateway.cli:add_gateway_args",
        "mii.gateway.cli:run_gateway",
        "serve a deployment over HTTP (OpenAI API)",
    ),
}
"""name -> (adds its options, runs it, help); functions, or "module:function" of commands
whose modules are imported only when that command is parsed or run."""


def _function(ref):
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(import_module(module), name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand; with `only`, the options of that one alone ("": none), so that
    `mii --help` and each command's parsing build no other command's options."""
    parser = argparse.ArgumentParser(prog="mii", description="Fast LLM generation over Redis")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, run, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            _function(add)(command)
        command.set_defaults(run=run)
    return parser


def main(argv=None) -> int:
    """Run a subcommand; a user's mistake (a bad argument, an unknown deployment, a Redis
    that is down) is one line on stderr and exit code 1, never a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    undecodable = _undecodable(argv)
    if undecodable is not None:
        print(f"mii: argument {undecodable} is not valid UTF-8", file=sys.stderr)
        return 2
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    args = build_parser(command).parse_args(argv)
    try:
        return _function(args.run)(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not isinstance(exc, user_errors()):
            raise
        print(f"mii {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 1


def _undecodable(argv: list[str]) -> str | None:
    """The first argument that was not UTF-8 (Python keeps its bytes as lone surrogates),
    shown as bytes."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return repr(arg.encode("utf-8", "surrogateescape"))
    return None


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    from mii.params import describe_errors

    if isinstance(exc, ValidationError):
        return f"invalid {exc.title}: {describe_errors(exc)}"
    return str(exc) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
