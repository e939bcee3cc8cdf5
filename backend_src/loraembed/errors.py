"""Typed errors. Each names the offending value and, where there is one, the allowed set.

`RequestError`s concern one request only: the Triton models turn them into an error response for
that request and go on serving the rest of the batch. `ConfigurationError`s stop a model at start;
a `WarmupError` does not (the model serves without its warm-up).
"""


class LoraEmbedError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigurationError(LoraEmbedError, ValueError):
    """A model cannot start: bad configuration or an unsupported checkpoint."""


class CheckpointError(ConfigurationError):
    """Checkpoint files are missing, unreadable, or do not match the architecture."""


class RequestError(LoraEmbedError, ValueError):
    """Bad input in one request; answered as an INVALID_ARG error for that request."""


class InvalidInputError(RequestError):
    """Malformed tensors or texts: wrong shape, dtype, values out of range, bad UTF-8."""


class InvalidParameterError(RequestError):
    """A request parameter (`normalize`, `truncate`, `dimensions`) has a bad value."""


class SequenceTooLongError(RequestError):
    """A text is longer than `max_seq_len` tokens and the request asked not to truncate."""


class AdapterError(RequestError):
    """An adapter id cannot be served: invalid, unknown, or its files fail validation."""


class WarmupError(LoraEmbedError, RuntimeError):
    """A warm-up batch failed while the device still works (`EmbeddingEngine.warm_up`)."""
