"""The worker: `WorkerLoop` (stream consumer + engine + token publisher), the process that
hosts it (`python -m mii.worker.main`), and `mii.serve`'s launcher."""
