"""What `mii.serve` runs in the caller's process: a Redis if none is given, the deployment's
record, its worker processes and their supervision, and the client it returns."""
