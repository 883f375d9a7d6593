"""Hosting the worker loop in a Celery worker: the app and its remote control, the `mii
worker` command, the bootstep that runs the loop, task events for Flower, Prometheus."""
