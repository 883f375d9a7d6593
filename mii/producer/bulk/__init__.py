"""Offline bulk jobs: input lines, the job's record in Redis, results and progress."""
