"""`mii bulk ...`: offline bulk jobs from the command line.

    mii bulk submit DEPLOYMENT prompts.jsonl [--job ID] [--max-new-tokens N] [--wait]
                                             [--output out.jsonl]
    mii bulk status DEPLOYMENT JOB [--json]
    mii bulk wait DEPLOYMENT JOB [--output out.jsonl] [--timeout S]
    mii bulk results DEPLOYMENT JOB [--output out.jsonl] [--partial]
    mii bulk cancel DEPLOYMENT JOB

`submit` prints the job id first; submitting the same file again resumes the same job
(its id comes from the input and the options unless `--job` names one). Progress goes to
stderr, results to `--output` (`-`: stdout). Heavy imports wait until a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys


def add_bulk_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bulk_command", required=True)
    add_submit_args(sub.add_parser("submit", help="queue a JSONL input as a job"))
    for name, help_text in [
        ("status", "a job's progress"),
        ("wait", "wait until every line of a job finished"),
        ("results", "write a job's output JSONL in input order"),
        ("cancel", "stop a job: drop its queued lines, cancel running ones"),
    ]:
        q = sub.add_parser(name, help=help_text)
        q.add_argument("deployment", help="deployment (or model) name")
        q.add_argument("job", help="the job id `submit` printed")
        q.add_argument("--redis-url", default=None, help="default: $MII_REDIS_URL")
    sub.choices["status"].add_argument("--json", action="store_true")
    for name in ("wait", "results"):
        sub.choices[name].add_argument("--output", default=None, help="path, or - for stdout")
    sub.choices["results"].add_argument("--partial", action="store_true")
    sub.choices["wait"].add_argument("--timeout", type=float, default=None)
    sub.choices["wait"].add_argument("--quiet", action="store_true", help="no progress bar")


def add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("deployment", help="deployment (or model) name")
    p.add_argument("input", help="JSONL: mii's form or OpenAI's batch form")
    p.add_argument("--job", default=None, help="job id (default: from input and options)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="default of the lines")
    p.add_argument("--sample", action="store_true", help="sample by default (else greedy)")
    p.add_argument("--ttl", type=int, default=None, help="seconds results are kept")
    p.add_argument("--submit-batch", type=int, default=256, help="lines per Redis call")
    p.add_argument("--wait", action="store_true", help="wait until the job is done")
    p.add_argument("--output", default=None, help="write results here (implies --wait)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--redis-url", default=None, help="default: $MII_REDIS_URL")


def run_bulk(args) -> int:
    return _RUN[args.bulk_command](args)


def _jobs(args):
    import mii
    from mii.producer.bulk.jobs import BulkJobs

    return BulkJobs(mii.client(args.deployment, redis_url=args.redis_url))


def _progress(args, label: str):
    from mii.producer.bulk.progress import ProgressBar

    return None if args.quiet else ProgressBar(label)


def run_submit(args) -> int:
    from mii.producer.bulk.jobs import read_input

    jobs = _jobs(args)
    params = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
    job_input = read_input(args.input)
    progress = _progress(args, args.job or "submit")
    out = sys.stderr if args.output == "-" else sys.stdout

    def created(job_id: str) -> None:  # before queuing, which may wait for room a long time
        print(job_id, file=out, flush=True)
        if progress is not None:
            progress.label = job_id

    status = jobs.submit(
        job_input, args.job, params, args.ttl, args.submit_batch, progress, on_created=created
    )
    if args.wait or args.output:
        jobs.wait(status.job_id, progress=progress)
    if args.output:
        _write(jobs, status.job_id, args.output, partial=False)
    return 0


def run_status(args) -> int:
    status = _jobs(args).status(args.job)
    if args.json:
        print(json.dumps(status.as_dict()))
    else:
        print(
            f"{status.job_id}: {status.state.value}; {status.done}/{status.total} lines done "
            f"({status.errors} errors), {status.submitted} queued, {status.tokens} tokens"
        )
    return 0


def run_wait(args) -> int:
    jobs = _jobs(args)
    status = jobs.wait(args.job, timeout_s=args.timeout, progress=_progress(args, args.job))
    if args.output:
        _write(jobs, args.job, args.output, partial=False)
    return 0 if status.complete else 1


def run_results(args) -> int:
    _write(_jobs(args), args.job, args.output or "-", partial=args.partial)
    return 0


def run_cancel(args) -> int:
    status = _jobs(args).cancel(args.job)
    print(f"{status.job_id}: {status.state.value}; {status.done}/{status.total} lines have results")
    return 0


def _write(jobs, job_id: str, path: str, partial: bool) -> None:
    """Results to a file (written whole, then renamed: never half a file) or stdout."""
    if path == "-":
        jobs.write_results(job_id, sys.stdout, partial)
        return
    tmp = f"{path}.partial"
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            jobs.write_results(job_id, out, partial)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


_RUN = {
    "submit": run_submit,
    "status": run_status,
    "wait": run_wait,
    "results": run_results,
    "cancel": run_cancel,
}
