"""The settings of ``lslo serve`` (:class:`ServeConfig`), apart from the server itself.

Only the standard library here: ``lslo``'s command line builds the ``serve`` flags from these
fields without importing the serving stack (LitServe, FastAPI), which :mod:`lslo.serve` needs.
"""

from __future__ import annotations

import dataclasses

__all__ = ["BATCHING_NAMES", "ServeConfig"]

_DTYPES = ("float32", "bfloat16", "float16", "float64")
BATCHING_NAMES = ("mixed", "direction")  # the policies of lslo.serve.BATCHING


@dataclasses.dataclass
class ServeConfig:
    """Everything ``lslo serve`` needs; each field is also a CLI flag (``--max-batch-size`` ...)."""

    model: str = dataclasses.field(metadata={"help": "base model: local folder or hub id"})
    adapters: str | None = dataclasses.field(default=None, metadata={"help": "folder written by lslo.save_adapters"})
    tokenizer: str | None = dataclasses.field(default=None, metadata={"help": "tokenizer (default: --model)"})
    host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "127.0.0.1, 0.0.0.0 or ::"})
    port: int = dataclasses.field(default=5000, metadata={"help": "TCP port (1024-65535)"})
    device: str | None = dataclasses.field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    dtype: str | None = dataclasses.field(default=None, metadata={"help": "weights dtype (default: as stored)"})
    num_beams: int = dataclasses.field(default=5, metadata={"help": "beam size"})
    max_new_tokens: int = dataclasses.field(default=256, metadata={"help": "generated tokens per sentence at most"})
    max_batch_size: int = dataclasses.field(default=32, metadata={
        "help": "requests gathered into one predict call, and sentences per generate call"})
    batch_timeout_ms: float = dataclasses.field(default=10.0, metadata={
        "help": "how long a worker waits to fill a batch"})
    max_queue: int = dataclasses.field(default=256, metadata={
        "help": "requests admitted at once (queued or decoding); more get 503 with Retry-After"})
    max_chars: int = dataclasses.field(default=5000, metadata={"help": "characters of q per request; more get 413"})
    workers: int = dataclasses.field(default=1, metadata={
        "help": "model replicas per device (LitServe workers_per_device), each its own process"})
    api_servers: int = dataclasses.field(default=1, metadata={"help": "HTTP server processes (LitServe num_api_servers)"})
    drain_timeout_s: float = dataclasses.field(default=30.0, metadata={
        "help": "on SIGTERM/SIGINT, how long in-flight requests may take before the server stops anyway"})
    batching: str = dataclasses.field(default="mixed", metadata={
        "help": "mixed: one generate call for all directions; direction: one per direction (a baseline)"})
    log_level: str = dataclasses.field(default="warning", metadata={"help": "uvicorn log level"})

    def __post_init__(self):
        positive = ("port", "num_beams", "max_new_tokens", "max_batch_size", "max_queue", "max_chars", "workers",
                    "api_servers")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeConfig.{name} must be a positive int, got {value!r}")
        for name in ("batch_timeout_ms", "drain_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"ServeConfig.{name} must be a number >= 0, got {value!r}")
        if not 1024 <= self.port <= 65535:
            raise ValueError(f"ServeConfig.port must be in 1024..65535 (LitServe refuses lower ports), got {self.port}")
        if self.host not in ("127.0.0.1", "0.0.0.0", "::"):
            raise ValueError(f"ServeConfig.host must be 127.0.0.1, 0.0.0.0 or :: (LitServe binds no other), "
                             f"got {self.host!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"ServeConfig.dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"ServeConfig.device must be cpu or cuda, got {self.device!r}")
        if self.batching not in BATCHING_NAMES:
            raise ValueError(f"ServeConfig.batching must be one of {', '.join(BATCHING_NAMES)}, got {self.batching!r}")
