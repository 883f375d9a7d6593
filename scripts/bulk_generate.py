"""Run a bulk job start to finish: queue a JSONL input on a running deployment, follow it
with a progress bar on stderr, write the output JSONL in input order.

    python scripts/bulk_generate.py DEPLOYMENT input.jsonl --output out.jsonl
        [--job ID] [--max-new-tokens 128] [--sample] [--ttl SECONDS] [--redis-url URL]

The same as `mii bulk submit DEPLOYMENT input.jsonl --output out.jsonl`. The job lives in
Redis: if this script dies, run it again (same input, same options) and it picks the job
up where it was, without running a finished line again; `mii bulk status|wait|results`
work from anywhere meanwhile. Input lines: `{"prompt": ..., "id": ..., "params": {...}}`,
`{"messages": [...]}`, or OpenAI batch lines (`/v1/completions`, `/v1/chat/completions`).
"""

from __future__ import annotations

import argparse
import sys

from mii.errors import MIIError
from mii.producer.bulk.cli import add_submit_args, run_submit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_submit_args(parser)
    args = parser.parse_args(argv)
    if not args.output:
        parser.error("--output is required (use - for stdout)")
    try:
        return run_submit(args)
    except MIIError as exc:
        print(f"bulk_generate: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
