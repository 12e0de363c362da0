"""``lslo serve``: one model serving every direction over a LibreTranslate-compatible HTTP API.

Dynamic batching and replicas come from LitServe (``LitAPI(max_batch_size=, batch_timeout=)``,
``LitServer(workers_per_device=)``); this module adds the translation API around it:

- :class:`TranslateFront`, an ASGI middleware in each API-server process, speaks LibreTranslate:
  it parses JSON or form bodies, refuses bad input with JSON ``{"error": ...}`` (400, 413, 503 with
  ``Retry-After``), admits at most ``max_queue`` requests at a time, answers ``GET /languages`` and
  ``GET /metrics``, and hands LitServe's ``/translate`` route one canonical JSON body.
- :class:`LSLoTranslateAPI`, the ``LitAPI`` in each inference worker, receives the requests LitServe
  gathered (any directions), flattens their sentences and decodes them in ONE :func:`lslo.translate`
  call, which routes every sentence to its own source/target adapters and cuts the list into
  ``generate`` calls of ``max_batch_size`` sentences. A request whose client went away is dropped
  before decoding; when the call fails, each request is retried alone so that one bad sentence
  fails only its own request.
- :func:`serve` drains on SIGTERM/SIGINT: new requests get 503, in-flight ones finish (bounded by
  ``drain_timeout_s``), then LitServe shuts its processes down and the call returns.

State shared by the processes (in-flight count, request ids, the drain flag, the ids of requests
whose client disconnected) lives in :class:`SharedState`, small ``multiprocessing`` values that the
forked API servers inherit and the spawned workers receive with their ``LitAPI``. Metrics use
``prometheus_client``'s multiprocess mode (one directory of value files per server).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import litserve

from .inference import translate
from .model import load_adapters, load_base_model, read_adapter_config
from .serve_config import ServeConfig
from .tokenization import all_language_token_ids, decode_ids

__all__ = [
    "BATCHING", "LSLoTranslateAPI", "MixedDirections", "PerDirection", "RequestError", "ServeConfig", "SharedState",
    "TranslateFront", "TranslateRequest", "build_server", "default_model", "parse_translate_request", "serve",
    "served_languages",
]

_DRAIN_QUIET_S = 0.5  # on SIGTERM, how long nothing must be in flight before the processes stop
_JSON = "application/json"
_FORM = "application/x-www-form-urlencoded"


# ------------------------------------------------------------------ configuration
def default_model(adapters: str) -> str | None:
    """The base model recorded with an adapter folder, or None when nothing records it.

    Looked up in the adapter config's base-model record (``name_or_path``) and then in the
    ``run_config.json`` that ``lslo train`` writes one folder up (its ``model`` field).
    """
    _, base = read_adapter_config(adapters)
    for key in ("name_or_path", "_name_or_path", "model"):
        if isinstance(base.get(key), str) and base[key]:
            return base[key]
    run_config = os.path.join(os.path.dirname(os.path.abspath(adapters)), "run_config.json")
    try:
        with open(run_config, encoding="utf-8") as f:
            recorded = json.load(f).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) and recorded else None


def served_languages(tokenizer, adapters: str | None) -> list[str]:
    """Language codes the server accepts: the adapters' languages, or all of the tokenizer's without adapters."""
    known = set(getattr(tokenizer, "lang_code_to_id", {}) or {})
    if adapters is None:
        if not known:
            raise ValueError(f"{type(tokenizer).__name__} has no language table (lang_code_to_id); "
                             "serve needs a multilingual translation tokenizer")
        return sorted(known)
    config, _ = read_adapter_config(adapters)
    languages = list(config.languages)
    missing = [code for code in languages if known and code not in known]
    if missing:
        raise ValueError(f"the tokenizer has no language token for {missing} (adapter languages {languages})")
    return languages


# ------------------------------------------------------------------ batching policies
class MixedDirections:
    """Every sentence of a batch, whatever its direction, in one :func:`lslo.translate` call."""

    def __call__(self, model, tokenizer, sentences: list[str], src_langs: list[str], tgt_langs: list[str],
                 **options) -> list[list[int]]:
        """Generated ids per sentence (language token first), in input order."""
        return translate(model, tokenizer, sentences, src_langs, tgt_langs, progress=False, return_token_ids=True,
                         **options)


class PerDirection(MixedDirections):
    """One :func:`lslo.translate` call per direction of the batch: the same-direction baseline."""

    def __call__(self, model, tokenizer, sentences, src_langs, tgt_langs, **options) -> list[list[int]]:
        out: list = [None] * len(sentences)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, direction in enumerate(zip(src_langs, tgt_langs)):
            groups.setdefault(direction, []).append(i)
        for (src, tgt), rows in groups.items():
            ids = super().__call__(model, tokenizer, [sentences[i] for i in rows], src, tgt, **options)
            for i, row in zip(rows, ids):
                out[i] = row
        return out


BATCHING: dict[str, type[MixedDirections]] = {"mixed": MixedDirections, "direction": PerDirection}  # = BATCHING_NAMES


# ------------------------------------------------------------------ shared state
class SharedState:
    """Counters the API servers, the inference workers and the main process share.

    ``inflight`` counts admitted requests not yet answered; ``draining`` is set on SIGTERM/SIGINT;
    ``cancelled`` is a ring of the last ``ring_size`` request ids whose client disconnected.
    """

    def __init__(self, ring_size: int = 4096):
        context = multiprocessing.get_context("spawn")
        self.inflight = context.Value("q", 0)
        self.next_id = context.Value("q", 0)
        self.draining = context.Value("b", 0, lock=False)
        self.cancelled = context.Array("q", [-1] * ring_size)
        self.ring_position = context.Value("q", 0)

    def admit(self, limit: int) -> int | None:
        """A fresh request id, or None when ``limit`` requests are already in flight."""
        with self.inflight.get_lock():
            if self.inflight.value >= limit:
                return None
            self.inflight.value += 1
        with self.next_id.get_lock():
            self.next_id.value += 1
            return self.next_id.value

    def release(self) -> None:
        with self.inflight.get_lock():
            self.inflight.value -= 1

    def cancel(self, request_id: int) -> None:
        with self.ring_position.get_lock():
            self.cancelled[self.ring_position.value % len(self.cancelled)] = request_id
            self.ring_position.value += 1

    def is_cancelled(self, request_id: int) -> bool:
        with self.cancelled.get_lock():
            return request_id in self.cancelled[:]


# ------------------------------------------------------------------ metrics
_METRICS: dict[str, Any] = {}


def _metrics() -> dict[str, Any]:
    """The server's Prometheus metrics, created on first use in each process.

    prometheus_client is imported here, not at module import: its multiprocess mode reads
    PROMETHEUS_MULTIPROC_DIR when it is first imported, which :func:`serve` sets beforehand.
    """
    if not _METRICS:
        from prometheus_client import Counter, Gauge, Histogram

        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        _METRICS.update(
            requests=Counter("lslo_requests", "HTTP requests to /translate by status", ["status"]),
            errors=Counter("lslo_errors", "HTTP error answers (status >= 400) by status and path", ["status", "path"]),
            queue=Gauge("lslo_queue_depth", "requests admitted and not yet answered", multiprocess_mode="mostrecent"),
            latency=Histogram("lslo_request_latency_seconds", "time from a /translate request to its answer",
                              buckets=latency),
            batch_seconds=Histogram("lslo_batch_seconds", "time of one predict call (all its generate calls)",
                                    buckets=latency),
            batch_size=Histogram("lslo_batch_size", "sentences in one predict call", buckets=sizes),
            batch_requests=Histogram("lslo_batch_requests", "requests in one predict call", buckets=sizes),
            batch_directions=Histogram("lslo_batch_directions", "distinct directions in one predict call",
                                       buckets=sizes),
            tokens=Counter("lslo_generated_tokens", "tokens generated (language token excluded)"),
            tokens_per_second=Gauge("lslo_generated_tokens_per_second", "generated tokens/s of the latest batch",
                                    multiprocess_mode="mostrecent"),
            dropped=Counter("lslo_dropped_requests", "requests dropped because their client disconnected"),
            failed=Counter("lslo_failed_requests", "requests whose translation failed (others in the batch kept)"),
            replicas=Gauge("lslo_replicas_ready", "inference workers loaded and warmed up", multiprocess_mode="livesum"),
        )
    return _METRICS


# ------------------------------------------------------------------ request parsing (API process)
class RequestError(Exception):
    """A request refused before it reaches a worker: HTTP ``status`` and a one-line message."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class TranslateRequest:
    """A valid ``POST /translate``: ``sentences`` (1 or more), one direction, ``single`` when q was a string."""

    sentences: tuple[str, ...]
    source: str
    target: str
    single: bool


def _parse_body(body: bytes, content_type: str) -> dict[str, Any]:
    media = content_type.split(";")[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not UTF-8") from None
    if media == _JSON:
        try:
            fields = json.loads(text)
        except ValueError as exc:
            raise RequestError(400, f"the body is not valid JSON ({exc})") from None
        if not isinstance(fields, dict):
            raise RequestError(400, f"the JSON body must be an object, got a {type(fields).__name__}")
        return fields
    if media == _FORM:
        parsed = urllib.parse.parse_qs(text, keep_blank_values=True)
        fields = {key: values[0] for key, values in parsed.items()}
        if len(parsed.get("q", [])) > 1:  # q given several times: a list, as in JSON
            fields["q"] = parsed["q"]
        return fields
    raise RequestError(400, f"unsupported Content-Type {content_type!r}: send {_JSON} or {_FORM}")


def parse_translate_request(body: bytes, content_type: str, languages: Sequence[str],
                            max_chars: int) -> TranslateRequest:
    """Validate a LibreTranslate ``/translate`` body (JSON or form-encoded).

    Args:
        body: the raw request body.
        content_type: its ``Content-Type`` header.
        languages: the codes the server serves (as source and as target).
        max_chars: characters of ``q`` allowed in all.

    Returns:
        the :class:`TranslateRequest`. Raises :class:`RequestError` 400 for bad input (missing or
        empty q, a non-string entry, unknown language, ``source: "auto"``, a format other than text,
        a wrong content type) and 413 past ``max_chars``.
    """
    fields = _parse_body(body, content_type)
    q = fields.get("q")
    if q is None:
        raise RequestError(400, "missing q (the text to translate: a string or a list of strings)")
    single = isinstance(q, str)
    sentences = [q] if single else q
    if not isinstance(sentences, list):
        raise RequestError(400, f"q must be a string or a list of strings, got {type(q).__name__}")
    if not sentences or (single and not q.strip()):
        raise RequestError(400, "q is empty")
    for i, entry in enumerate(sentences):
        if not isinstance(entry, str):
            raise RequestError(400, f"q[{i}] must be a string, got {type(entry).__name__} {json.dumps(entry)[:60]}")
    chars = sum(len(s) for s in sentences)
    if chars > max_chars:
        raise RequestError(413, f"q has {chars} characters; this server takes at most {max_chars} per request")
    fmt = fields.get("format", "text")
    if fmt not in ("text", None, ""):
        raise RequestError(400, f"format {fmt!r} is not supported; only 'text'")
    served = set(languages)
    for name in ("source", "target"):
        code = fields.get(name)
        if code is None or code == "":
            raise RequestError(400, f"missing {name} (a language code)")
        if not isinstance(code, str):
            raise RequestError(400, f"{name} must be a language code string, got {json.dumps(code)[:60]}")
        if code == "auto":
            raise RequestError(400, f"{name} 'auto': language detection is not offered; give the language code")
        if code not in served:
            listed = ", ".join(sorted(served)[:40]) + (" ..." if len(served) > 40 else "")
            raise RequestError(400, f"{name} language {code!r} is not served; served: {listed}")
    return TranslateRequest(tuple(sentences), fields["source"], fields["target"], single)


# ------------------------------------------------------------------ the HTTP front (ASGI middleware)
async def _send_json(send, status: int, payload: Any, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client disconnected while sending")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class TranslateFront:
    """ASGI middleware: LibreTranslate's API in front of LitServe's ``/translate`` route.

    Args:
        app: the LitServe FastAPI app (its ``/translate`` takes the canonical JSON built here).
        state: the :class:`SharedState` of this server.
        languages: served language codes.
        max_chars: ``ServeConfig.max_chars``.
        max_queue: ``ServeConfig.max_queue``.
    """

    def __init__(self, app, state: SharedState, languages: Sequence[str], max_chars: int, max_queue: int):
        self.app = app
        self.state = state
        self.languages = list(languages)
        self.max_chars = max_chars
        self.max_queue = max_queue
        # UTF-8 takes at most 4 bytes a character; JSON escapes and the other fields fit in the slack.
        self.body_limit = 6 * max_chars + 65536

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path == "/translate" and method == "POST":
            return await self._translate(scope, receive, send)
        if path == "/languages" and method == "GET":
            listing = [{"code": c, "name": c, "targets": [t for t in self.languages if t != c]} for c in self.languages]
            return await _send_json(send, 200, listing)
        if path == "/metrics" and method == "GET":
            return await self._metrics(send)
        if path == "/health" and self.state.draining.value:
            return await _send_json(send, 503, {"status": "draining"}, [(b"retry-after", b"1")])
        return await self.app(scope, receive, _errors_as_json(send, path))

    async def _metrics(self, send) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        _metrics()["queue"].set(self.state.inflight.value)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _refuse(self, send, exc: RequestError) -> None:
        headers = [] if exc.retry_after is None else [(b"retry-after", str(exc.retry_after).encode())]
        _metrics()["requests"].labels(str(exc.status)).inc()
        _metrics()["errors"].labels(str(exc.status), "/translate").inc()
        await _send_json(send, exc.status, {"error": exc.message}, headers)

    async def _translate(self, scope, receive, send) -> None:
        started = time.monotonic()
        try:
            if self.state.draining.value:
                raise RequestError(503, "the server is shutting down", retry_after=1)
            headers = dict(scope["headers"])
            request = parse_translate_request(await _read_body(receive, self.body_limit),
                                              headers.get(b"content-type", b"").decode("latin-1"),
                                              self.languages, self.max_chars)
            request_id = self.state.admit(self.max_queue)
            if request_id is None:
                raise RequestError(503, f"the queue is full ({self.max_queue} requests in flight); retry later",
                                   retry_after=1)
        except RequestError as exc:
            return await self._refuse(send, exc)
        except ConnectionResetError:
            return None
        try:
            status, payload = await self._forward(scope, receive, request, request_id)
        except Exception:
            logging.getLogger(__name__).exception("request %d failed", request_id)
            status, payload = 500, {"error": "internal error"}
        finally:
            self.state.release()
        if status == 200:
            text = payload["translatedText"]
            payload = {"translatedText": text[0] if request.single else text}
        _metrics()["requests"].labels(str(status)).inc()
        _metrics()["latency"].observe(time.monotonic() - started)
        if status >= 400:
            _metrics()["errors"].labels(str(status), "/translate").inc()
        await _send_json(send, status, payload)

    async def _forward(self, scope, receive, request: TranslateRequest, request_id: int) -> tuple[int, dict]:
        """Run LitServe's /translate on the canonical body; watch the client meanwhile."""
        body = json.dumps({"id": request_id, "q": list(request.sentences), "source": request.source,
                           "target": request.target}).encode("utf-8")
        inner_scope = dict(scope, headers=[(b"content-type", _JSON.encode()),
                                           (b"content-length", str(len(body)).encode())])
        disconnected = asyncio.Event()
        answered = False

        async def watch() -> None:  # uvicorn's receive returns http.disconnect when the client leaves
            while (await receive())["type"] != "http.disconnect":
                pass
            if not answered:
                self.state.cancel(request_id)
                disconnected.set()

        watcher = asyncio.ensure_future(watch())
        delivered = False

        async def inner_receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        response: dict[str, Any] = {"status": 500, "body": b""}

        async def inner_send(message):
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
            elif message["type"] == "http.response.body":
                response["body"] += message.get("body", b"")

        try:
            await self.app(inner_scope, inner_receive, inner_send)
        finally:
            answered = True
            watcher.cancel()
        return _answer(response["status"], response["body"])


def _answer(status: int, body: bytes) -> tuple[int, dict]:
    """(status, JSON payload) of LitServe's answer: a worker's ``{"error", "status"}`` or FastAPI's ``{"detail"}``."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return (500 if status < 400 else status), {"error": "the inference worker gave no readable answer"}
    if status == 200 and isinstance(payload, dict) and "translatedText" in payload:
        return 200, payload
    if isinstance(payload, dict) and "error" in payload:
        return int(payload.get("status", 500)), {"error": str(payload["error"])}
    detail = payload.get("detail") if isinstance(payload, dict) else None
    return (status if status >= 400 else 500), {"error": str(detail or "internal error")}


def _errors_as_json(send, path: str):
    """A ``send`` that rewrites FastAPI's error answers (``{"detail": ...}``, 404, 405, 500) as ``{"error": ...}``."""
    pending: dict[str, Any] = {}

    async def wrapped(message):
        if message["type"] == "http.response.start" and message["status"] >= 400:
            pending["status"] = message["status"]
            pending["headers"] = [(k, v) for k, v in message.get("headers", [])
                                  if k.lower() not in (b"content-length", b"content-type", b"content-encoding")]
            pending["body"] = b""
            return None
        if pending and message["type"] == "http.response.body":
            pending["body"] += message.get("body", b"")
            if message.get("more_body", False):
                return None
            _, payload = _answer(pending["status"], pending["body"])
            if pending["status"] == 503 and path == "/health":
                payload = {"status": "not ready"}
            _metrics()["errors"].labels(str(pending["status"]), path if path in ("/health", "/translate") else "other").inc()
            return await _send_json(send, pending["status"], payload, pending["headers"])
        return await send(message)

    return wrapped


# ------------------------------------------------------------------ the inference worker (LitAPI)
def _exit_with_parent() -> None:
    """On Linux, get SIGTERM when the parent dies: a server killed with SIGKILL leaves no worker
    behind polling its queue (LitServe's batching loop polls every millisecond)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's own shutdown stops the workers
        pass


class LSLoTranslateAPI(litserve.LitAPI):
    """LitServe API of one replica: loads the model, then translates the batches LitServe gathers.

    Args:
        config: the :class:`ServeConfig`.
        state: the :class:`SharedState` (read for cancelled requests).
        batching: a policy called as ``batching(model, tokenizer, sentences, src_langs, tgt_langs,
            num_beams=, batch_size=, max_new_tokens=)`` returning id lists (:class:`MixedDirections`).
    """

    def __init__(self, config: ServeConfig, state: SharedState, batching: Callable):
        super().__init__(max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout_ms / 1000.0,
                         api_path="/translate")
        self.config = config
        self.state = state
        self.batching = batching

    def setup(self, device) -> None:
        """Load the model (and adapters) on ``device`` and warm it up with one mixed-direction batch."""
        import torch
        from transformers import AutoTokenizer

        # A terminal's Ctrl-C reaches every process of the group: the main process drains, and
        # this worker must go on answering until it is told to stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _exit_with_parent()
        dtype = None if self.config.dtype is None else getattr(torch, self.config.dtype)
        self.model = load_base_model(self.config.model, dtype=dtype, device=device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer or self.config.model)
        self.language_ids = all_language_token_ids(self.tokenizer)
        if self.config.adapters:
            load_adapters(self.model, self.config.adapters)
        languages = served_languages(self.tokenizer, self.config.adapters)
        pairs = [(languages[0], languages[-1]), (languages[-1], languages[0])]
        self.batching(self.model, self.tokenizer, ["Hello.", "Hello."], [p[0] for p in pairs], [p[1] for p in pairs],
                      **self._options(max_new_tokens=4))
        _metrics()["replicas"].inc()

    def _options(self, **overrides) -> dict[str, int]:
        options = {"num_beams": self.config.num_beams, "batch_size": self.config.max_batch_size,
                   "max_new_tokens": self.config.max_new_tokens}
        return {**options, **overrides}

    def decode_request(self, request):
        return request

    def batch(self, inputs):
        return list(inputs)

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output

    def predict(self, requests):
        """Translate a list of canonical requests (``{"id", "q", "source", "target"}``), any directions.

        Returns one answer per request: ``{"translatedText": [...]}`` (one per entry of q) or
        ``{"error": ..., "status": ...}`` for a request that failed or whose client left.
        """
        if self.max_batch_size == 1:  # LitServe's unbatched loop hands over one request, not a list
            return self._predict_many([requests])[0]
        return self._predict_many(requests)

    def _predict_many(self, requests: list[dict]) -> list[dict]:
        metrics = _metrics()
        answers: list[dict | None] = [None] * len(requests)
        live = []
        for index, request in enumerate(requests):
            if self.state.is_cancelled(request["id"]):
                answers[index] = {"error": "the client disconnected", "status": 499}
                metrics["dropped"].inc()
            else:
                live.append(index)
        started = time.monotonic()
        translations, tokens = self._translate([requests[i] for i in live])
        elapsed = time.monotonic() - started
        for index, answer in zip(live, translations):
            answers[index] = answer
        if live:
            metrics["batch_seconds"].observe(elapsed)
            metrics["batch_requests"].observe(len(live))
            metrics["batch_size"].observe(sum(len(requests[i]["q"]) for i in live))
            metrics["batch_directions"].observe(len({(requests[i]["source"], requests[i]["target"]) for i in live}))
            metrics["tokens"].inc(tokens)
            metrics["tokens_per_second"].set(tokens / elapsed if elapsed > 0 else 0.0)
        return answers

    def _translate(self, requests: list[dict]) -> tuple[list[dict], int]:
        """Answers for ``requests`` and the tokens generated: one call for all; alone each if that fails."""
        if not requests:
            return [], 0
        try:
            return self._translate_together(requests)
        except Exception:  # noqa: BLE001 (any failure: find the request that caused it, spare the others)
            if len(requests) == 1:
                _metrics()["failed"].inc()
                return [{"error": "the translation failed on this input", "status": 500}], 0
        answers, total = [], 0
        for request in requests:
            answer, tokens = self._translate([request])
            answers.extend(answer)
            total += tokens
        return answers, total

    def _translate_together(self, requests: list[dict]) -> tuple[list[dict], int]:
        sentences, sources, targets, owners = [], [], [], []
        for index, request in enumerate(requests):
            for position, text in enumerate(request["q"]):
                if text.strip():  # an empty entry of a list q answers "" without decoding
                    sentences.append(text)
                    sources.append(request["source"])
                    targets.append(request["target"])
                    owners.append((index, position))
        ids = self.batching(self.model, self.tokenizer, sentences, sources, targets, **self._options()) if sentences else []
        texts = [[""] * len(request["q"]) for request in requests]
        tokens = 0
        for (index, position), row in zip(owners, ids):
            # As lslo.translate: row[0] is the forced language token, and every language token is
            # dropped (a vocabulary-only __xx__ token is not special to skip_special_tokens).
            texts[index][position] = decode_ids(self.tokenizer, row[1:], self.language_ids)
            tokens += max(len(row) - 1, 0)
        return [{"translatedText": text} for text in texts], tokens


# ------------------------------------------------------------------ building and running
def _accelerator(device: str | None) -> tuple[str, int | str]:
    if device is None:
        return "auto", "auto"
    kind, _, index = device.partition(":")
    return kind, (1 if not index else [int(index)])


def build_server(config: ServeConfig, state: SharedState, languages: Sequence[str],
                 batching: Callable | None = None) -> litserve.LitServer:
    """The LitServer of ``config``: one :class:`LSLoTranslateAPI` per replica behind :class:`TranslateFront`.

    Args:
        config: the :class:`ServeConfig`.
        state: the :class:`SharedState`.
        languages: served codes (:func:`served_languages`).
        batching: the batching policy (default: ``BATCHING[config.batching]()``).
    """
    policy = batching if batching is not None else BATCHING[config.batching]()
    api = LSLoTranslateAPI(config, state, policy)
    accelerator, devices = _accelerator(config.device)
    front = (TranslateFront, {"state": state, "languages": languages, "max_chars": config.max_chars,
                              "max_queue": config.max_queue})
    # timeout=False: admission (max_queue) bounds the wait; LitServe's queue timeout would answer 504.
    return litserve.LitServer(api, accelerator=accelerator, devices=devices, workers_per_device=config.workers,
                              timeout=False, middlewares=[front], model_metadata={"model": config.model})


def _install_drain(server: litserve.LitServer, state: SharedState, drain_timeout_s: float) -> dict:
    """SIGTERM/SIGINT: refuse new requests, wait for the admitted ones, then stop LitServe.

    Returns the handlers it replaced (signal number -> handler), to put back afterwards.
    """

    def drain() -> None:
        deadline = time.monotonic() + drain_timeout_s
        quiet_since = None
        # Stop once nothing has been in flight for a moment: a request already on its way when the
        # signal came is read and answered (503) rather than cut off by the HTTP servers' exit.
        while time.monotonic() < deadline:
            if state.inflight.value > 0:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= _DRAIN_QUIET_S:
                break
            time.sleep(0.02)
        # The event LitServe's run() waits on (its own /shutdown endpoint sets the same one).
        while getattr(server, "_shutdown_event", None) is None:
            time.sleep(0.02)
        server._shutdown_event.set()

    def on_signal(signum, frame) -> None:
        if not state.draining.value:
            state.draining.value = 1
            # LitServe's worker monitor polls a manager that its own shutdown closes; that race logs a
            # traceback ("Monitoring worker crashed") after a clean stop. Not an error of this server.
            logging.getLogger("litserve.server").addFilter(
                lambda record: "Monitoring worker crashed" not in record.getMessage())
            threading.Thread(target=drain, name="lslo-drain", daemon=True).start()

    return {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}


def serve(config: ServeConfig, batching: Callable | None = None) -> None:
    """Run the server until SIGTERM/SIGINT, then drain and return.

    Args:
        config: the :class:`ServeConfig` (bad values raise ValueError before anything starts).
        batching: a batching policy object instead of ``config.batching`` (it must pickle: each
            replica is a spawned process).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)  # fails fast on a bad --model
    languages = served_languages(tokenizer, config.adapters)
    own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    if own_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="lslo-serve-metrics-")
    try:
        state = SharedState()
        server = build_server(config, state, languages, batching)
        previous = _install_drain(server, state, config.drain_timeout_s)
        try:
            server.run(host=config.host, port=config.port, num_api_servers=config.api_servers,
                       log_level=config.log_level, generate_client_file=False)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    finally:
        if own_dir:
            shutil.rmtree(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"), ignore_errors=True)

