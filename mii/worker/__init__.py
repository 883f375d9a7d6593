"""The worker: `WorkerLoop` pulls request entries from a deployment's streams into its
engine and publishes every step's tokens; `celery/` hosts it in a Celery worker.

    loop.py          the loop: poll, step, publish; lifecycle and control messages
    held.py          the requests a worker holds, and every way one of them ends
    intake.py        a request entry turned into engine work, or into a clear refusal
    parsing.py       decoding and tokenizing entries on a thread of their own
    streams.py       reads of the control and request streams; pending entries, takeovers
    claims.py        one entry serves a request id; copies are dropped
    upkeep.py        every heartbeat: leases, claims, abandoned clients, takeovers, status
    client_watch.py  clients that went away
    fault.py         surviving a failed engine step
    publisher.py     the thread that writes tokens, final chunks and acks to Redis
    outcomes.py      what is published, as records (batches, endings, dead letters)
    bulk_results.py  a bulk line's result, recorded with its final chunk
    hosting.py       building the engine and the loop from the deployment's record
    stats.py observer.py   counters; hooks for task events and metrics
"""
