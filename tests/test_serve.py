"""``lslo serve`` against a real server process on a tiny model (no download).

One server process serves the whole module (started once: loading a model in a spawned LitServe
worker takes seconds on the shared 2-core machine); a second one, started through the CLI with two
replicas, is stopped with SIGTERM while requests are in flight. Every wait is bounded in count and
time, and both servers listen on 127.0.0.1 on a free port.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

pytest.importorskip("litserve")
httpx = pytest.importorskip("httpx")
libretranslatepy = pytest.importorskip("libretranslatepy")


import lslo
from lslo.serve import MixedDirections
from tests.hf_fixtures import make_sentences, make_tokenizer, one_thread, randomize_adapters, tiny_model

LANGS = ["en", "fr", "oc", "wo"]
BEAMS, MAX_NEW = 3, 10
FAIL_MARKER, SLOW_MARKER = "FAILME", "SLOWME"
REPO = Path(__file__).resolve().parents[1]


class FailOnMarker(MixedDirections):
    """The server's batching, except that a batch holding FAIL_MARKER raises (one bad sentence) and one
    holding SLOW_MARKER first sleeps (a worker kept busy for as long as a test needs)."""

    def __call__(self, model, tokenizer, sentences, src_langs, tgt_langs, **options):
        if any(FAIL_MARKER in s for s in sentences):
            raise RuntimeError("a sentence this model cannot take")
        if any(SLOW_MARKER in s for s in sentences):
            time.sleep(2.0)
        return super().__call__(model, tokenizer, sentences, src_langs, tgt_langs, **options)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A saved fp64 tiny model, its adapters (random, so that routing matters), and the same model in-process."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer = make_tokenizer(root / "spm")
    model = tiny_model(tokenizer, seed=1)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    lslo.apply_lslo(model, lslo.LSLoConfig(languages=LANGS, ranks=2))
    randomize_adapters(model, seed=3)
    run = root / "run"
    lslo.save_adapters(model, run / "final")
    (run / "run_config.json").write_text(json.dumps({"model": str(root / "model")}))  # as lslo train writes it
    return {"root": root, "model": str(root / "model"), "adapters": str(run / "final"), "lslo": model,
            "tokenizer": tokenizer}


def expected(built, sentences, src, tgt):
    with one_thread():
        return lslo.translate(built["lslo"], built["tokenizer"], sentences, src, tgt, num_beams=BEAMS,
                              max_new_tokens=MAX_NEW, progress=False)


def _kill(process) -> None:
    """SIGKILL the server's process group (its workers and HTTP servers too)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def _wait_ready(process, url: str, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.2)):
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    _kill(process)
    raise AssertionError(f"the server was not ready within {seconds} s")


def _start(command: list[str], port: int):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # Its own process group: a failing test kills the server with its workers and HTTP processes.
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(process, url)
    return process, url


def _stop(process, seconds: float = 60.0, signum: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(signum)
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        _kill(process)
        raise AssertionError(f"the server did not stop within {seconds} s of SIGTERM") from None


@pytest.fixture(scope="module")
def server(built):
    port = _free_port()
    code = ("import sys; from lslo.serve import ServeConfig, serve; from tests.test_serve import FailOnMarker; "
            f"serve(ServeConfig(model={built['model']!r}, adapters={built['adapters']!r}, port={port}, "
            f"num_beams={BEAMS}, max_new_tokens={MAX_NEW}, max_batch_size=16, batch_timeout_ms=150, max_queue=12, "
            "max_chars=2000, drain_timeout_s=30, device='cpu'), batching=FailOnMarker())")
    process, url = _start([sys.executable, "-c", code], port)
    try:
        yield url
        assert _stop(process, signum=signal.SIGINT) == 0  # Ctrl-C drains as SIGTERM does (the CLI test)
    finally:
        _kill(process)


def post(url, payload, **kwargs):
    return httpx.post(url + "/translate", json=payload, timeout=60, **kwargs)


def metric(url, name: str) -> float:
    """The value of one sample line of /metrics (0 when absent)."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# ------------------------------------------------------------------ the API
def test_libretranslatepy_client(server, built):
    client = libretranslatepy.LibreTranslateAPI(server + "/")
    sentence = make_sentences(1, seed=5)[0]
    assert client.translate(sentence, "en", "wo") == expected(built, [sentence], "en", "wo")[0]
    assert [entry["code"] for entry in client.languages()] == LANGS


def test_raw_http_json_and_form_strings_and_lists(server, built):
    sentences = make_sentences(3, seed=6)
    want = expected(built, sentences, "fr", "oc")
    one = post(server, {"q": sentences[0], "source": "fr", "target": "oc", "format": "text"})
    assert one.status_code == 200 and one.json() == {"translatedText": want[0]}
    many = post(server, {"q": sentences, "source": "fr", "target": "oc"})
    assert many.json() == {"translatedText": want}
    form = httpx.post(server + "/translate", data={"q": sentences[1], "source": "fr", "target": "oc"}, timeout=60)
    assert form.status_code == 200 and form.json() == {"translatedText": want[1]}
    body = urllib.parse.urlencode([("q", s) for s in sentences] + [("source", "fr"), ("target", "oc")])
    repeated = httpx.post(server + "/translate", content=body, timeout=60,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert repeated.json() == {"translatedText": want}
    blank = post(server, {"q": [sentences[0], "", sentences[2]], "source": "fr", "target": "oc"})
    assert blank.json() == {"translatedText": [want[0], "", want[2]]}


def test_list_spanning_generate_batches_keeps_order(server, built):
    sentences = make_sentences(37, seed=7, max_words=4)  # 3 generate calls of at most 16 sentences
    answer = post(server, {"q": sentences, "source": "oc", "target": "en"})
    assert answer.json()["translatedText"] == expected(built, sentences, "oc", "en")


def test_languages(server):
    listing = httpx.get(server + "/languages", timeout=10).json()
    assert [entry["code"] for entry in listing] == LANGS
    assert {entry["code"]: sorted(entry["targets"]) for entry in listing}["oc"] == ["en", "fr", "wo"]


def test_health_and_metrics(server):
    health = httpx.get(server + "/health", timeout=10)
    assert health.status_code == 200
    metrics = httpx.get(server + "/metrics", timeout=10)
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("lslo_requests_total", "lslo_queue_depth", "lslo_request_latency_seconds_bucket",
                 "lslo_batch_size_bucket", "lslo_batch_directions_bucket", "lslo_generated_tokens_total",
                 "lslo_generated_tokens_per_second", "lslo_replicas_ready"):
        assert name in metrics.text, name
    assert metric(server, "lslo_replicas_ready") == 1


def test_concurrent_directions_match_translate_and_share_batches(server, built):
    directions = [(s, t) for s in LANGS for t in LANGS if s != t][:8]
    sentences = make_sentences(16, seed=8)
    jobs = [(sentences[2 * k: 2 * k + 2], s, t) for k, (s, t) in enumerate(directions)]
    mixed_before = metric(server, "lslo_batch_directions_count") - metric(server, 'lslo_batch_directions_bucket{le="1.0"}')
    barrier = threading.Barrier(len(jobs))
    answers = [None] * len(jobs)

    def client(k):
        q, s, t = jobs[k]
        barrier.wait(timeout=30)
        answers[k] = post(server, {"q": q if k % 2 else q[0], "source": s, "target": t})

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for k, (q, s, t) in enumerate(jobs):
        want = expected(built, q, s, t)
        assert answers[k].status_code == 200, answers[k].text
        assert answers[k].json()["translatedText"] == (want if k % 2 else want[0])
    mixed_after = metric(server, "lslo_batch_directions_count") - metric(server, 'lslo_batch_directions_bucket{le="1.0"}')
    assert mixed_after > mixed_before  # at least one predict call held several directions


# ------------------------------------------------------------------ refusals
BAD = [
    ({"source": "en", "target": "fr"}, 400, "missing q"),
    ({"q": "", "source": "en", "target": "fr"}, 400, "empty"),
    ({"q": [], "source": "en", "target": "fr"}, 400, "empty"),
    ({"q": ["ok", 3], "source": "en", "target": "fr"}, 400, "q[1]"),
    ({"q": {"a": 1}, "source": "en", "target": "fr"}, 400, "list of strings"),
    ({"q": "hi", "source": "auto", "target": "fr"}, 400, "detection is not offered"),
    ({"q": "hi", "source": "xx", "target": "fr"}, 400, "'xx' is not served"),
    ({"q": "hi", "source": "en", "target": "de"}, 400, "'de' is not served"),  # a tokenizer language, no adapter
    ({"q": "hi", "target": "fr"}, 400, "missing source"),
    ({"q": "hi", "source": "en", "target": 7}, 400, "language code"),
    ({"q": "hi", "source": "en", "target": "fr", "format": "html"}, 400, "only 'text'"),
    ({"q": "x" * 2001, "source": "en", "target": "fr"}, 413, "at most 2000"),
    ({"q": ["x" * 1000, "y" * 1001], "source": "en", "target": "fr"}, 413, "at most 2000"),
]


@pytest.mark.parametrize(("payload", "status", "words"), BAD, ids=[w for _, _, w in BAD])
def test_bad_json_input(server, payload, status, words):
    answer = post(server, payload)
    assert answer.status_code == status
    assert words in answer.json()["error"]


@pytest.mark.parametrize(("content", "content_type", "status", "words"), [
    (b'{"q": "hi"', "application/json", 400, "not valid JSON"),
    (b'["q"]', "application/json", 400, "must be an object"),
    (b"q=hi&source=en&target=fr", "text/plain", 400, "unsupported Content-Type"),
    (b"\xff\xfe", "application/json", 400, "not UTF-8"),
    (b"q=hi&source=auto&target=fr", "application/x-www-form-urlencoded", 400, "detection"),
    (b"x" * 100_000, "application/json", 413, "larger than"),
])
def test_bad_bodies(server, content, content_type, status, words):
    answer = httpx.post(server + "/translate", content=content, headers={"Content-Type": content_type}, timeout=30)
    assert answer.status_code == status
    assert words in answer.json()["error"]


def test_other_errors_are_json(server):
    for answer in (httpx.get(server + "/translate", timeout=10), httpx.get(server + "/nothing", timeout=10)):
        assert answer.status_code in (404, 405)
        assert set(answer.json()) == {"error"}


def test_failing_sentence_fails_only_its_request(server, built):
    good = make_sentences(2, seed=9)
    results = {}

    def client(name, payload):
        results[name] = post(server, payload)

    threads = [threading.Thread(target=client, args=("bad", {"q": ["fine", FAIL_MARKER], "source": "en", "target": "fr"})),
               threading.Thread(target=client, args=("good", {"q": good, "source": "wo", "target": "oc"})),
               threading.Thread(target=client, args=("other", {"q": good[0], "source": "fr", "target": "en"}))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results["bad"].status_code == 500
    assert "Traceback" not in results["bad"].text and "failed" in results["bad"].json()["error"]
    assert results["good"].json() == {"translatedText": expected(built, good, "wo", "oc")}
    assert results["other"].json() == {"translatedText": expected(built, good[:1], "fr", "en")[0]}


def test_full_queue_gives_503_then_recovers(server, built):
    sentences = make_sentences(4, seed=10)

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[
                client.post(server + "/translate", json={"q": sentences, "source": "en", "target": "oc"})
                for _ in range(40)])

    answers = asyncio.run(burst())
    statuses = sorted({a.status_code for a in answers})
    assert statuses == [200, 503], statuses
    refused = [a for a in answers if a.status_code == 503]
    assert all(a.headers.get("retry-after") == "1" and "queue is full" in a.json()["error"] for a in refused)
    want = expected(built, sentences, "en", "oc")
    assert all(a.json()["translatedText"] == want for a in answers if a.status_code == 200)
    assert post(server, {"q": sentences, "source": "en", "target": "oc"}).json()["translatedText"] == want


def test_disconnected_client_is_dropped_and_others_unaffected(server, built):
    port = int(server.rsplit(":", 1)[1])
    body = json.dumps({"q": make_sentences(8, seed=11), "source": "en", "target": "wo"}).encode()
    dropped_before = metric(server, "lslo_dropped_requests_total")
    busy = [SLOW_MARKER + " ka lo."]  # keeps the worker busy while the raw request waits behind it
    good = make_sentences(2, seed=12)
    result = {}
    threads = [threading.Thread(target=lambda: result.update(busy=post(server, {"q": busy, "source": "en",
                                                                               "target": "fr"}))),
               threading.Thread(target=lambda: result.update(good=post(server, {"q": good, "source": "oc",
                                                                               "target": "fr"})))]
    threads[0].start()
    for _ in range(100):  # the busy request admitted, then its batch window over: it is decoding
        if metric(server, "lslo_queue_depth") >= 1:
            break
        time.sleep(0.01)
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        for _ in range(100):  # closed only once admitted (an unread body is refused, never queued)
            if metric(server, "lslo_queue_depth") >= 2:
                break
            time.sleep(0.01)
    threads[1].start()
    for thread in threads:
        thread.join(timeout=120)
    assert result["good"].json() == {"translatedText": expected(built, good, "oc", "fr")}
    assert result["busy"].json() == {"translatedText": expected(built, busy, "en", "fr")}
    for _ in range(50):  # the drop is counted when the worker reaches the request
        if metric(server, "lslo_dropped_requests_total") > dropped_before:
            break
        time.sleep(0.1)
    assert metric(server, "lslo_dropped_requests_total") == dropped_before + 1


# ------------------------------------------------------------------ the CLI, two replicas, SIGTERM
def test_config_names_the_batching_policies():
    from lslo.serve import BATCHING
    from lslo.serve_config import BATCHING_NAMES, ServeConfig

    assert tuple(BATCHING) == BATCHING_NAMES  # ServeConfig checks names without importing lslo.serve
    with pytest.raises(ValueError, match="max_queue must be a positive int, got 0"):
        ServeConfig(model="m", max_queue=0)


def test_cli_errors(built, capsys):
    from lslo.cli import main

    assert main(["serve", "--port", "80", "--model", built["model"]]) == 2
    assert "port must be in 1024..65535" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["serve", "--model", built["model"], "--batching", "nope"]) == 2
    assert "batching must be one of" in capsys.readouterr().err


def test_cli_two_replicas_and_sigterm_drain(built):
    """``lslo serve`` with the model taken from the run folder, two replicas; SIGTERM mid-load answers everyone."""
    port = _free_port()
    process, url = _start([sys.executable, "-m", "lslo", "serve", "--adapters", built["adapters"], "--port", str(port),
                           "--num-beams", str(BEAMS), "--max-new-tokens", str(MAX_NEW), "--workers", "2",
                           "--batch-timeout-ms", "50", "--device", "cpu"], port)
    try:
        assert metric(url, "lslo_replicas_ready") == 2
        sentences = make_sentences(12, seed=13)
        jobs = [(sentences[k: k + 3], LANGS[k % 4], LANGS[(k + 1) % 4]) for k in range(0, 12, 3)] * 2
        answers = [None] * len(jobs)
        sending = threading.Semaphore(0)

        def client(k):
            q, s, t = jobs[k]
            sending.release()
            answers[k] = post(url, {"q": q, "source": s, "target": t})

        threads = [threading.Thread(target=client, args=(k,)) for k in range(len(jobs))]
        for thread in threads:
            thread.start()
        for _ in jobs:  # every client on its way (a later one may still be refused with 503)
            assert sending.acquire(timeout=30)
        in_flight = 0
        for _ in range(100):  # SIGTERM once requests are in flight
            in_flight = metric(url, "lslo_queue_depth")
            if in_flight > 0:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=120)
        assert in_flight > 0 and all(answer is not None for answer in answers)  # every request answered
        served = [k for k, answer in enumerate(answers) if answer.status_code == 200]
        late = [answer for answer in answers if answer.status_code != 200]  # arrived after SIGTERM
        assert len(served) >= in_flight
        assert all(a.status_code == 503 and "shutting down" in a.json()["error"] for a in late), late
        for k in served:
            q, s, t = jobs[k]
            assert answers[k].json()["translatedText"] == expected(built, q, s, t)
        assert process.wait(timeout=60) == 0
    finally:
        _kill(process)


def test_bench_serve_summaries():
    """bench_serve's batch means (from two /metrics snapshots) and its table's ratio to ``mixed``."""
    from benchmarks import bench_serve

    before = {"lslo_batch_size_sum": 10, "lslo_batch_size_count": 2, "lslo_batch_directions_sum": 2,
              "lslo_batch_seconds_sum": 1.0}
    after = {"lslo_batch_size_sum": 40, "lslo_batch_size_count": 5, "lslo_batch_directions_sum": 14,
             "lslo_batch_seconds_sum": 2.5}
    means = bench_serve._batch_means(before, after)
    assert means == {"batches": 3, "mean_batch_sentences": 10.0, "mean_batch_directions": 4.0, "mean_batch_s": 0.5}
    row = {"p50_s": 0.1, "p99_s": 0.2, "refused_503": 0, "other_errors": 0, **means}
    text = bench_serve.table([{**row, "setup": "mixed", "load": "4/s", "sentences_per_s": 8.0},
                              {**row, "setup": "direction", "load": "4/s", "sentences_per_s": 2.0}])
    assert "| direction | 4/s | 2.00 | 0.25 |" in text
