"""``lslo serve`` under load: Poisson arrivals over 30 directions, four server set-ups in one run.

Question: how many sentences per second, at what p50/p99 latency, does one server get when
requests of 30 directions are batched together, against

``mixed``        the server as shipped: LitServe gathers requests of any direction, one
                 ``lslo.translate`` (one generate call per ``--max-batch-size`` sentences);
``direction``    (a) the same server decoding each direction of a gathered batch separately
                 (``ServeConfig(batching="direction")``): same-direction batching only;
``no_batching``  (b) ``max_batch_size=1``: one request per generate call;
``base``         (c) the base model without adapters in the same server (mixed batching).

Each set-up is a real server process (``lslo.serve.serve``) on 127.0.0.1; an asyncio client
(httpx) sends one-sentence requests at exponentially distributed gaps (Poisson arrivals) at each
``--rates`` for ``--duration`` seconds, direction drawn uniformly from the 30; ``--clients N`` adds
a closed-loop load (N clients, each sending its next request when the last is answered). Reported
per set-up and load: answered sentences/s (over the time until the last answer), p50/p99 latency
of the answered requests, the documented refusals (503, queue full), any other error or lost
request, and from the server's ``/metrics`` the mean sentences, directions and seconds of its
predict calls under that load.

Models: ``demo`` (the demo's shape, d_model 64, 2 + 2 layers, random weights) by default;
``--shape 615m`` the M2M-124 615M shape with random weights (slow on a CPU; for a GPU machine).

    python -m benchmarks.bench_serve --rates 4,16,64 --duration 8
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as _dt
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lslo
from lslo.demo.base_model import demo_model_config
from lslo.testing import m2m124_config, make_sentences, make_tokenizer, randomize_adapters

LANGUAGES = ["en", "fr", "de", "es", "oc", "wo"]  # 6 x 5 = 30 directions
DIRECTIONS = [(s, t) for s in LANGUAGES for t in LANGUAGES if s != t]
SETUPS = {
    "mixed": {"batching": "mixed"},
    "direction": {"batching": "direction"},
    "no_batching": {"batching": "mixed", "max_batch_size": 1},
    "base": {"batching": "mixed", "adapters": None},
}
_REPO = Path(__file__).resolve().parents[1]


def build_model(root: Path, shape: str) -> tuple[str, str]:
    """A saved random model (+ tokenizer) and random adapters over LANGUAGES: (model folder, adapter folder)."""
    from transformers import M2M100ForConditionalGeneration

    tokenizer = make_tokenizer(root / "spm")
    vocab = max(tokenizer.lang_code_to_id.values()) + 1 + tokenizer.num_madeup_words
    if shape == "615m":
        config = m2m124_config(vocab_size=vocab)
    else:
        config = demo_model_config(tokenizer)
    torch.manual_seed(0)
    model = M2M100ForConditionalGeneration(config).eval()
    with torch.no_grad():  # spread weights: HF's default init makes every output one repeated token
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.5 if shape == "demo" else 0.02)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    lslo.apply_lslo(model, lslo.LSLoConfig(languages=LANGUAGES, ranks=8))
    randomize_adapters(model, seed=1)
    lslo.save_adapters(model, root / "adapters")
    return str(root / "model"), str(root / "adapters")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(options: dict, timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    """A ``lslo.serve.serve`` process with ServeConfig(**options), once its /health says ready."""
    import httpx

    code = "import json, sys; from lslo.serve import ServeConfig, serve; serve(ServeConfig(**json.loads(sys.argv[1])))"
    env = {**os.environ, "PYTHONPATH": str(_REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    process = subprocess.Popen([sys.executable, "-c", code, json.dumps(options)], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{options['port']}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    os.killpg(process.pid, signal.SIGKILL)
    raise RuntimeError(f"the server was not ready within {timeout_s} s")


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=120)
    except subprocess.TimeoutExpired:  # the whole group: its workers and HTTP processes too
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def batch_counters(url: str) -> dict[str, float]:
    """Sums and counts of the server's batch histograms (``/metrics``)."""
    import httpx

    wanted = {f"lslo_batch_{name}_{part}" for name in ("size", "directions", "seconds") for part in ("sum", "count")}
    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


def _batch_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean sentences, directions and seconds per predict call between two :func:`batch_counters`."""
    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    batches = delta("lslo_batch_size_count")
    mean = (lambda name: delta(f"lslo_batch_{name}_sum") / batches) if batches else (lambda name: float("nan"))
    return {"batches": int(batches), "mean_batch_sentences": mean("size"), "mean_batch_directions": mean("directions"),
            "mean_batch_s": mean("seconds")}


class _Tally:
    """Latencies of the answered requests and a count per status (-1: no answer, connection lost)."""

    def __init__(self):
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}

    async def send(self, client, url: str, sentence: str, direction: tuple[str, str]) -> None:
        import httpx

        started = time.monotonic()
        try:
            answer = await client.post(url + "/translate", json={"q": sentence, "source": direction[0],
                                                                "target": direction[1]})
            status = answer.status_code
        except httpx.HTTPError:
            status = -1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.latencies.append(time.monotonic() - started)

    def summary(self, elapsed: float) -> dict:
        latencies = sorted(self.latencies)

        def quantile(q):
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

        return {"sent": sum(self.statuses.values()), "answered": len(latencies),
                "sentences_per_s": len(latencies) / elapsed, "p50_s": quantile(0.50), "p99_s": quantile(0.99),
                "refused_503": self.statuses.get(503, 0),
                "other_errors": sum(n for s, n in self.statuses.items() if s not in (200, 503))}


def _client(clients: int):
    import httpx

    limits = httpx.Limits(max_connections=max(512, clients), max_keepalive_connections=max(512, clients))
    return httpx.AsyncClient(timeout=300, limits=limits)


async def poisson_load(url: str, rate: float, duration: float, sentences: list[str], seed: int) -> dict:
    """Send one-sentence requests at Poisson arrivals of ``rate``/s for ``duration`` s; wait for every answer."""
    rng, tally, tasks = random.Random(seed), _Tally(), []
    async with _client(0) as client:
        start = time.monotonic()
        at = rng.expovariate(rate)
        while at < duration:
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(tally.send(client, url, rng.choice(sentences), rng.choice(DIRECTIONS))))
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        return tally.summary(time.monotonic() - start)


async def closed_loop_load(url: str, clients: int, duration: float, sentences: list[str], seed: int) -> dict:
    """``clients`` clients, each sending its next one-sentence request as soon as the last is answered."""
    rng, tally = random.Random(seed), _Tally()
    async with _client(clients) as client:
        start = time.monotonic()

        async def loop():
            while time.monotonic() - start < duration:
                await tally.send(client, url, rng.choice(sentences), rng.choice(DIRECTIONS))

        await asyncio.gather(*[loop() for _ in range(clients)])
        return tally.summary(time.monotonic() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["demo", "615m"], default="demo", help="model shape (random weights)")
    parser.add_argument("--rates", default="4,16,64", help="offered requests/s, comma-separated")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per rate")
    parser.add_argument("--clients", type=int, default=0,
                        help="also a closed-loop load of this many clients for --duration s (0: none)")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"subset of {','.join(SETUPS)}")
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=10.0)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="CSV folder (default runs/bench_serve/<UTC time>)")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    setups = [s for s in args.setups.split(",") if s]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setups {unknown}; known: {', '.join(SETUPS)}")
    out = args.out or Path("runs/bench_serve") / _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    sentences = make_sentences(200, seed=3, max_words=10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = build_model(Path(tmp), args.shape)
        for setup in setups:
            options = {"model": model, "adapters": adapters, "port": _free_port(), "num_beams": args.num_beams,
                       "max_new_tokens": args.max_new_tokens, "max_batch_size": args.max_batch_size,
                       "batch_timeout_ms": args.batch_timeout_ms, "max_queue": args.max_queue,
                       "device": args.device, **SETUPS[setup]}
            process, url = start_server(options)
            try:
                loads = [(f"{rate:g}/s", poisson_load(url, rate, args.duration, sentences, seed=k))
                         for k, rate in enumerate(rates)]
                if args.clients:
                    loads.append((f"{args.clients} clients",
                                  closed_loop_load(url, args.clients, args.duration, sentences, seed=99)))
                for load, run in loads:
                    before = batch_counters(url)
                    result = asyncio.run(run)
                    rows.append({"shape": args.shape, "setup": setup, "load": load, **result,
                                 **_batch_means(before, batch_counters(url))})
                    print(json.dumps(rows[-1]), file=sys.stderr)
            finally:
                stop_server(process)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(table(rows))
    print(f"[bench_serve] wrote {out / 'results.csv'}", file=sys.stderr)
    return 0


def table(rows: list[dict]) -> str:
    """A markdown table of the rows, with each set-up's throughput over ``mixed`` under the same load."""
    mixed = {r["load"]: r["sentences_per_s"] for r in rows if r["setup"] == "mixed"}
    lines = [("| setup | load | answered sent/s | vs mixed | p50 s | p99 s | 503 | other errors | sent./batch | "
              "directions/batch | s/batch |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["sentences_per_s"] / mixed[r["load"]] if mixed.get(r["load"]) else float("nan")
        lines.append(f"| {r['setup']} | {r['load']} | {r['sentences_per_s']:.2f} | {ratio:.2f} | "
                     f"{r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['refused_503']} | {r['other_errors']} | "
                     f"{r['mean_batch_sentences']:.1f} | {r['mean_batch_directions']:.1f} | {r['mean_batch_s']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
