"""Enumerations shared by the public API, the engine and the wire."""

from enum import Enum


class TaskType(str, Enum):
    TEXT_GENERATION = "text-generation"


class DeploymentType(str, Enum):
    LOCAL = "local"
    AML = "aml"


class ModelProvider(str, Enum):
    HUGGING_FACE = "hugging-face"


class GenerationFinishReason(str, Enum):
    """Why a request stopped producing tokens (MII's values, plus the queue's outcomes)."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens or max_length reached
    NONE = "none"  # not finished
    CANCELLED = "cancelled"  # the client cancelled it
    TIMEOUT = "timeout"  # its deadline passed
    ERROR = "error"  # it could not be served; the response carries the message
