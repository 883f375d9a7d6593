"""Exceptions the public API raises."""


class MIIError(Exception):
    """Base class of every error mii raises on purpose."""


class UnknownArgument(MIIError, TypeError):
    """A keyword argument that is neither a `ModelConfig` nor an `MIIConfig` field (MII's
    name for it)."""


class InvalidRequestError(MIIError, ValueError):
    """A prompt or a generation option is not acceptable."""


class DeploymentNotFoundError(MIIError):
    """No deployment of that name is recorded in the Redis server."""


class QueueFullError(MIIError):
    """The deployment's request stream holds more pending work than its configured limit."""


class GenerationError(MIIError):
    """A worker reported that a request failed."""


class RequestLostError(GenerationError):
    """A request vanished from Redis (a Redis that came back empty, a flush, a failover to
    a replica without it): it is neither queued, nor held by a worker, nor answered."""


class BrokerUnavailableError(MIIError, ConnectionError):
    """The deployment's Redis cannot be reached (down, unreachable, or refusing the
    credentials) for longer than the client waits (`reconnect_timeout_s`)."""


class DeploymentFailedError(MIIError):
    """The deployment has no live worker and its launcher gave up restarting them."""


class RequestTimeoutError(MIIError, TimeoutError):
    """A request's deadline passed before it finished."""


class TensorParallelError(MIIError):
    """A rank of the engine's tensor-parallel group died or fell out of step; the engine
    cannot continue and its host should exit so that others take over its requests."""
