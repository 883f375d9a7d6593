"""What `mii.serve` runs in the caller's process: a Redis if none is given (an embedded
one), the deployment's record, its worker processes and their supervision, its gateway,
and the client it returns. (Not named `serve`: a subpackage would shadow `mii.serve()`.)

    serve.py           serve_deployment: the whole start, and a start that fails cleanly
    processes.py       the worker processes of this host and their logs
    supervisor.py      restarts of workers that die; a deployment that keeps failing
    embedded_redis.py  a private redis-server with a generated password
"""
