"""``lslo demo``: the paper's experiment end to end on a laptop CPU, no downloads.

Stages (each recorded in ``<output-dir>/demo_state.json`` when done, so an interrupted demo resumes
where it stopped with ``--resume``):

1. ``data``: the synthetic multi-way corpus (:mod:`lslo.demo.synthetic`) in the FLORES-101 layout,
   plus an imbalanced pretraining TSV;
2. ``pretrain``: a tiny M2M-100 pretrained many-to-many on it (:mod:`lslo.demo.base_model`, through
   :func:`lslo.train.train`), so that it starts out knowing the high-resource languages well;
3. one stage per system, fine-tuned on the balanced ``dev`` split with :func:`lslo.train.train` exactly
   as ``lslo train`` would on FLORES, and scored on ``devtest`` with beam search through
   :func:`lslo.evaluate.evaluate`: ``Pretrain`` (zero-shot), ``Ft-all``, LSLo with equal ranks, LSLo
   with heterogeneous ranks, and heterogeneous ranks + the Gradual Pruning Schedule on the high- and
   medium-resource languages;
4. ``report``: the direction-group table (terminal and ``report.md``), per-direction CSV/JSON, the
   per-epoch H2H/V2V curves (Figure 3) and a bar chart of the table.

With ``model=`` and ``flores_dir=`` the same systems run on a real model and FLORES-101 (stages 1-2
skipped). Scores on the artificial languages are BLEU and chrF++ with sacrebleu's standard
tokenizers, labelled as such; nothing is tuned to echo the paper's numbers.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..analysis import plan_from_scores, plan_train_config, read_scores, run_analyses, write_plan_config
from ..data import load_flores, resolve_languages
from ..evaluate import (
    METRIC_LABELS,
    Scorer,
    evaluate,
    format_table,
    group_table,
    plot_epoch_curves,
    plot_group_bars,
    write_scores,
)
from ..io import atomic_write_file
from ..model import format_parameter_report, get_lslo_config, load_adapters, load_base_model, parameter_report
from ..recipe import RECIPE
from ..train import METRICS_NAME, RecipeWarning, TrainArguments, train
from .base_model import PretrainConfig, pretrain_base_model
from .synthetic import CorpusSpec, write_corpus

__all__ = ["FULL", "PAPER_LR", "QUICK", "DemoSettings", "DemoSystem", "gps_schedule", "paired_differences",
           "run_demo"]

STATE_FILE = "demo_state.json"


@dataclass(frozen=True)
class DemoSystem:
    """One row of the table: a name, and the :class:`lslo.train.TrainArguments` fields it sets."""

    name: str
    train: Mapping[str, Any] | None  # None: evaluation of the base model only (zero-shot)

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-").replace("--", "-")


def gps_schedule(epochs: int) -> tuple[int, int]:
    """(E, k) of the Gradual Pruning Schedule with the paper's shape for ``epochs`` epochs: pruning
    starts after 2/15 of training and reaches its ratio with a third of the epochs left (the paper:
    E=2, k=8 over T=15; Appendix B calls ending in the last epochs unreasonable)."""
    start = round(2 * epochs / 15)
    end = max(start + 1, round(2 * epochs / 3))
    return start, end - start


# One rule for every system's learning rate: the paper's (Section 6.2), not tuned on the demo.
PAPER_LR = {"ft-all": 1e-4, "lslo": 3e-3}


def _systems(epochs: int, ft_lr: float = PAPER_LR["ft-all"], lslo_lr: float = PAPER_LR["lslo"]) -> tuple[DemoSystem, ...]:
    prune_start, prune_duration = gps_schedule(epochs)
    gps = {"prune": "H=0.9,M=0.9", "prune_start": prune_start, "prune_duration": prune_duration}
    return (
        DemoSystem("Pretrain", None),
        DemoSystem("Ft-all", {"method": "ft-all", "lr": ft_lr}),
        DemoSystem("LSLo 8;8;8", {"ranks": "8;8;8", "lr": lslo_lr}),
        DemoSystem("LSLo 2;2;8", {"ranks": "2;2;8", "lr": lslo_lr}),
        DemoSystem("LSLo 2;2;8+GPS(0.9)", {"ranks": "2;2;8", "lr": lslo_lr, **gps}),
    )


def _with_schedule(systems: Sequence[DemoSystem], epochs: int) -> tuple[DemoSystem, ...]:
    """The systems with their GPS schedule refitted to ``epochs`` (gps_schedule)."""
    start, duration = gps_schedule(epochs)
    return tuple(DemoSystem(s.name, {**s.train, "prune_start": start, "prune_duration": duration})
                 if s.train and "prune_start" in s.train else s for s in systems)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and schedule of a demo run (:data:`FULL`, :data:`QUICK`)."""

    dev_size: int
    devtest_size: int
    pretrain_size: int
    pretrain_steps: int
    epochs: int
    max_tokens: int
    curve_sentences: int  # devtest sentences per direction in the per-epoch curves
    eval_sentences: int  # devtest sentences per direction in the final table
    num_beams: int
    systems: tuple[DemoSystem, ...]
    warmup_updates: int = 30
    languages: tuple[str, ...] = ("en", "fr", "de", "nl", "ja", "oc", "wo")  # H, H, H, M, M, V, V
    concepts: float = 0.5  # share of the meaning space (lslo.demo.synthetic.CorpusSpec.concepts)
    threads: int = 1  # tiny models run fastest on one intra-op thread...
    workers: int = 2  # ...so two cores are best used by two systems training at once
    model_shape: Mapping[str, int] = field(default_factory=dict)  # PretrainConfig fields (d_model, layers, ...)
    # --analyses: the ISE run (epochs, GPS start and duration), Weight-Learning epochs, the plan sharpness
    # values trained against the resource-group system (lslo.analysis.run_analyses / plan_from_scores).
    analysis: Mapping[str, Any] = field(default_factory=lambda: dict(_ANALYSIS))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["systems"] = [{"name": s.name, "train": dict(s.train) if s.train else None} for s in self.systems]
        data["model_shape"] = dict(self.model_shape)
        data["analysis"] = json.loads(json.dumps(dict(self.analysis)))  # tuples as lists, as the state file has them
        return data


# Where the demo leaves the authors' recipe (lslo.recipe.RECIPE), for every system alike: one batch a step
# (the tiny corpus has few batches an epoch; 4 would leave a handful of steps) and no attention dropout
# (the tiny base model was pretrained without it).
DEMO_TRAIN_OVERRIDES: dict[str, Any] = {"update_freq": 1, "attention_dropout": 0.0}


# ISE: the paper's P = 0.7 reached by GPS over epochs 1-4 of 6 (the paper: 2-10 of 15; the tiny model
# converges in fewer). Weight Learning as long as the systems' fine-tuning (10 epochs): at 3 epochs the
# encoder's weights had not left 0.5. Sharpness 1 (ranks proportional to the kept share) and 4 (the
# default of plan_from_scores) are both trained at the budget of the resource-group ranks.
_ANALYSIS = {"epochs": 6, "prune_start": 1, "prune_duration": 3, "wl_epochs": 10, "sharpness": (1.0, 4.0)}


# The systems' learning rates follow one rule (PAPER_LR: the paper's values for all, Ft-all 1e-4, LSLo
# 3e-3; an earlier demo gave Ft-all 1e-3) and GPS keeps the paper's shape (gps_schedule).
# Sized for about 10 minutes on 2 idle CPU cores (measured in CPU seconds on one thread: pretraining
# 1,000 steps ~250 s, each fine-tuned system ~75-95 s of training and ~10-20 s of scoring, two systems
# at a time): a base model that knows the high-resource languages well, few fine-tuning sentences
# (100 per language, 4,200 pairs over 42 directions) and 10 epochs, enough for the high-resource
# directions to over-fit as in the paper. Greedy decoding keeps scoring cheap (the paper: beam 5).
FULL = DemoSettings(dev_size=100, devtest_size=100, pretrain_size=100_000, pretrain_steps=1000, epochs=10,
                    max_tokens=2048, curve_sentences=10, eval_sentences=100, num_beams=1, warmup_updates=45,
                    systems=_systems(10))
# A smoke run of every stage (tests, a first look): a smaller model, fewer sentences, greedy decoding.
QUICK = DemoSettings(dev_size=24, devtest_size=8, pretrain_size=4_000, pretrain_steps=60, epochs=2, concepts=0.2,
                     max_tokens=1024, curve_sentences=2, eval_sentences=4, num_beams=1, warmup_updates=10,
                     systems=_systems(2),
                     model_shape={"d_model": 32, "layers": 2, "ffn_dim": 64, "vocab_size": 400},
                     analysis={**_ANALYSIS, "epochs": 2, "prune_duration": 1, "wl_epochs": 2})


@dataclass
class DemoResult:
    output_dir: Path
    table: str
    summary: str
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


# Settings that only the --analyses stages use: a demo run without --analyses may be resumed with it (and
# the other way round); they must match only when the analyses are both done and asked for again.
_ANALYSIS_KEYS = ("analyses", "analysis")


class _State:
    """``demo_state.json``: the settings of the run and the stages done (with their seconds)."""

    def __init__(self, path: Path, settings: dict[str, Any], resume: bool):
        self.path = path
        self.data = {"settings": settings, "done": {}}
        if resume and path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            saved_settings = saved.get("settings", {})
            compare_analyses = settings.get("analyses") and "analyses" in saved.get("done", {})
            differing = sorted(k for k in set(saved_settings) | set(settings)
                               if saved_settings.get(k) != settings.get(k)
                               and (k not in _ANALYSIS_KEYS or (compare_analyses and k != "analyses")))
            if differing:
                raise ValueError(f"--resume: {path.parent} holds a demo with other settings ({', '.join(differing)}); "
                                 "pass --overwrite to start again")
            self.data = saved
            if settings.get("analyses"):
                self.data["settings"] = settings

    def done(self, stage: str) -> bool:
        return stage in self.data["done"]

    def mark(self, stage: str, seconds: float, **info) -> None:
        self.data["done"][stage] = {"seconds": seconds, **info}
        atomic_write_file(self.path, lambda tmp: Path(tmp).write_text(json.dumps(self.data, indent=2)))

    def seconds(self) -> dict[str, float]:
        return {stage: info["seconds"] for stage, info in self.data["done"].items()}


def _demo_settings(quick: bool, epochs: int | None, workers: int | None) -> DemoSettings:
    """:data:`QUICK` or :data:`FULL`, with ``epochs`` when given (``workers`` is only checked here)."""
    settings = QUICK if quick else FULL
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        settings = replace(settings, epochs=epochs, systems=_with_schedule(settings.systems, epochs))
    return settings


def _output_folder(output_dir: str, *, overwrite: bool, resume: bool) -> Path:
    """The demo's folder, created; refused when it holds another run unless ``overwrite`` (emptied) or ``resume``."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise ValueError(f"--output-dir {out} already holds a run; pass --resume to continue it or --overwrite to "
                         "start again")
    if overwrite and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_demo(
    output_dir: str = "runs/demo",
    *,
    quick: bool = False,
    model: str | None = None,
    flores_dir: str | None = None,
    languages: str | Sequence[str] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    analyses: bool = False,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo (see the module docstring) into ``output_dir``.

    Args:
        output_dir: where everything goes; refused when it holds another run, unless ``overwrite``
            (start again) or ``resume`` (continue, stages already done are kept).
        quick: the small settings (:data:`QUICK`: about 2 minutes) instead of :data:`FULL`.
        model, flores_dir: a real base model and FLORES-101 folder instead of the synthetic set-up
            (both or neither).
        languages: codes or a set name (default: the synthetic languages, or lang12 with FLORES).
        epochs: fine-tuning epochs (default: the settings').
        seed: seed of the corpus, the pretraining and every run.
        analyses: also run Weight Learning, Intrinsic Subspace Estimation and rank plans
            (:func:`lslo.analysis.run_analyses`), report whether ISE recovers the resource levels, and
            train the ISE plans (``settings.analysis["sharpness"]``) with the systems' recipe at the
            budget of the resource-group ranks, to compare them on the same devtest sentences
            (``analyses/summary.json`` ``"comparison"``, the report, the terminal).
        workers: systems trained at once, each in its own one-thread process (default: the
            settings'; 1 runs them one after the other in this process).
        progress: progress bars.
        log: receives one-line progress messages.

    Returns:
        A :class:`DemoResult` (the printed table and summary, stage times, written files).
    """
    import torch

    if (model is None) != (flores_dir is None):
        raise ValueError("give both --model and --flores-dir (a real model on FLORES-101), or neither (the synthetic demo)")
    settings = _demo_settings(quick, epochs, workers)
    out = _output_folder(output_dir, overwrite=overwrite, resume=resume)
    if flores_dir is not None:
        codes = list(resolve_languages(languages or "lang12", flores_dir=flores_dir))
        load_flores(flores_dir, codes, "dev")  # a folder not in the FLORES layout fails here, before any work
        load_flores(flores_dir, codes, "devtest")
    else:
        codes = list(settings.languages) if languages is None else (
            languages.split(",") if isinstance(languages, str) else list(languages))
    run_settings = {**settings.to_dict(), "seed": seed, "languages": codes, "model": model, "flores_dir": flores_dir,
                    "analyses": analyses}
    state = _State(out / STATE_FILE, run_settings, resume)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        corpus_dir, base_dir = _prepare(out, state, settings, codes, seed, model, flores_dir, progress, log)
        rows = _run_systems(out, state, settings, codes, seed, base_dir, corpus_dir, progress, log,
                            workers=settings.workers if workers is None else workers)
        analysis = None
        if analyses:
            analysis, plan_rows = _analyses(out, state, settings, base_dir, corpus_dir, codes, seed, rows, progress,
                                            log, workers=settings.workers if workers is None else workers)
            rows = {**rows, **plan_rows}
        return _report(out, state, settings, codes, base_dir, rows, analysis, synthetic=flores_dir is None, log=log)
    finally:
        torch.set_num_threads(previous_threads)


def _prepare(out, state, settings, codes, seed, model, flores_dir, progress, log) -> tuple[Path, Path]:
    if flores_dir is not None:
        return Path(flores_dir), Path(model)

    corpus_dir, base_dir = out / "data", out / "base_model"
    if not state.done("data"):
        clock = time.perf_counter()
        log("[demo] 1/4 generating the synthetic languages and corpus")
        write_corpus(corpus_dir, CorpusSpec(languages=tuple(codes), dev_size=settings.dev_size,
                                            devtest_size=settings.devtest_size, pretrain_size=settings.pretrain_size,
                                            concepts=settings.concepts, seed=seed))
        state.mark("data", time.perf_counter() - clock)
    if not state.done("pretrain"):
        clock = time.perf_counter()
        log(f"[demo] 2/4 pretraining the tiny base model ({settings.pretrain_steps} steps, imbalanced corpus)")
        config = PretrainConfig(steps=settings.pretrain_steps, seed=seed, threads=settings.threads,
                                **settings.model_shape)
        result = pretrain_base_model(corpus_dir, base_dir, config,
                                     progress=progress, log=log)
        state.mark("pretrain", time.perf_counter() - clock, steps=result.steps, parameters=result.num_parameters)
    return corpus_dir, base_dir


def _load_system(base_dir: Path, final_dir: Path | None, method: str | None):
    if final_dir is not None and method == "ft-all":
        return load_base_model(str(final_dir))
    model = load_base_model(str(base_dir))
    if final_dir is not None:
        load_adapters(model, final_dir)
    return model


def _run_systems(out, state, settings, codes, seed, base_dir, corpus_dir, progress, log, *, workers: int):
    """Every system's stage: one after the other here, or ``workers`` at a time in one-thread
    processes. The state file is written by this process only, as each system finishes."""
    rows = {}
    todo = []
    for system in settings.systems:
        if state.done(f"system:{system.name}"):
            rows[system.name] = json.loads((out / "systems" / system.slug / "scores.json").read_text())["rows"]
        else:
            todo.append(system)
    job = (out, settings, codes, seed, base_dir, corpus_dir)
    if workers <= 1 or len(todo) <= 1:
        for system in todo:
            rows[system.name], seconds, params = _run_system(*job, system, progress, log)
            state.mark(f"system:{system.name}", seconds, params=params)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        log(f"[demo] 3/4 {len(todo)} systems, {workers} at a time (one process and one thread each)")
        # spawn, not fork: a forked child of a process that already ran torch's thread pools can hang.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_system, *job, system, False, print): system for system in todo}
            try:
                for future in as_completed(futures):
                    system = futures[future]
                    rows[system.name], seconds, params = future.result()
                    state.mark(f"system:{system.name}", seconds, params=params)
                    log(f"[demo] {system.name}: done in {seconds:.0f} s")
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return {system.name: rows[system.name] for system in settings.systems}


def _run_system(out, settings, codes, seed, base_dir, corpus_dir, system: DemoSystem, progress, log):
    """Fine-tune (unless zero-shot) and score one system. Returns (rows, seconds, #params)."""
    import torch

    torch.set_num_threads(settings.threads)
    from transformers import AutoTokenizer

    run_dir = out / "systems" / system.slug
    clock = time.perf_counter()
    final_dir = None
    if system.train is not None:
        log(f"[demo] 3/4 fine-tuning {system.name} ({settings.epochs} epochs on dev)")
        values = {
            "model": str(base_dir), "flores_dir": str(corpus_dir), "languages": ",".join(codes),
            "output_dir": str(run_dir / "run"), "epochs": settings.epochs, "max_tokens": settings.max_tokens,
            "warmup_updates": settings.warmup_updates, "seed": seed + 1, "cpu": True, "progress": progress,
            "eval_every_epoch": True, "eval_sentences": settings.curve_sentences, "num_beams": 1, "log_every": 20,
            **DEMO_TRAIN_OVERRIDES, **system.train,
        }
        resume = (run_dir / "run").is_dir()
        with warnings.catch_warnings():  # the departures from the recipe are the demo's, stated in report.md
            warnings.simplefilter("ignore", RecipeWarning)
            result = train(TrainArguments(**values, resume_or_start=resume))
        final_dir = result.final_dir
    else:
        log(f"[demo] 3/4 evaluating {system.name} (the base model, zero-shot)")
    model = _load_system(base_dir, final_dir, (system.train or {}).get("method"))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    references = load_flores(corpus_dir, codes, "devtest")
    rows = evaluate(model, tokenizer, references, None, num_beams=settings.num_beams, max_new_tokens=96,
                    max_sentences=settings.eval_sentences, scorer=Scorer(warn=False), progress=progress)
    config = get_lslo_config(model)
    params = parameter_report(model)["total"] if config is not None else (
        sum(p.numel() for p in model.parameters()) if system.train else None)
    write_scores(rows, run_dir, name="scores", metadata={"system": system.name, "params": params,
                                                         "num_beams": settings.num_beams,
                                                         "eval_sentences": settings.eval_sentences})
    return rows, time.perf_counter() - clock, params


def _reference_system(settings: DemoSettings) -> DemoSystem:
    """The resource-group system an ISE plan competes with: the last LSLo system with group ranks (the
    demo's 2;2;8+GPS), whose ranks give the plan its budget and whose recipe the plan trains with."""
    for system in reversed(settings.systems):
        train = system.train or {}
        if train.get("method", "lslo") == "lslo" and ";" in str(train.get("ranks", "")):
            return system
    raise ValueError("--analyses: the demo has no LSLo system with resource-group ranks to compare a plan with")


def _plan_system(reference: DemoSystem, plan: Mapping[str, Any]) -> DemoSystem:
    """The reference's recipe (lr, GPS schedule, index plan) with the plan's ranks and pruning ratios."""
    config = plan_train_config(plan)
    train = {k: v for k, v in (reference.train or {}).items() if k not in ("ranks", "prune", "prune_pool")}
    train["ranks"] = config["ranks"]
    if "prune" in config:
        train.update(prune=config["prune"], prune_pool=config["prune_pool"])
    else:
        train = {k: v for k, v in train.items() if k not in ("prune_start", "prune_duration")}
    return DemoSystem(f"LSLo ISE plan s={plan['sharpness']:g}", train)


def _analyses(out, state, settings, base_dir, corpus_dir, codes, seed, rows, progress, log, *, workers: int):
    """Weight Learning, ISE and plans (stage ``analyses``), then the plans trained as systems and compared
    with the resource-group system at the same budget. Returns (summary, the plan systems' rows)."""
    analysis_dir = out / "analyses"
    path = analysis_dir / "summary.json"
    options = settings.analysis
    reference = _reference_system(settings)
    budget = reference.train["ranks"]
    if not state.done("analyses"):
        clock = time.perf_counter()
        log(f"[demo] analyses: Weight Learning ({options['wl_epochs']} epochs), Intrinsic Subspace Estimation "
            f"({options['epochs']} epochs), plans at the budget of ranks {budget}")
        sizes = None
        info = Path(corpus_dir) / "languages.json"
        if info.is_file():  # the synthetic languages' true pretraining sizes: what ISE should recover
            sizes = {c: v["pretrain_sentences"] for c, v in json.loads(info.read_text())["languages"].items()
                     if c in codes}
        result = run_analyses(base_dir, corpus_dir, analysis_dir, languages=codes, resource_sizes=sizes, seed=seed + 2,
                              epochs=options["epochs"], prune_start=options["prune_start"],
                              prune_duration=options["prune_duration"], wl_epochs=options["wl_epochs"],
                              budget=budget, max_tokens=settings.max_tokens, progress=progress,
                              train_overrides=DEMO_TRAIN_OVERRIDES)
        summary = {k: v for k, v in result.items() if isinstance(v, (str, int, float, bool, dict, list, type(None)))}
        if result.get("index") is not None:
            summary["weight_learning"] = {"epochs": options["wl_epochs"], "index_plan": result["index"].index_plan,
                                          "weights": {side: [{"w_src": a, "w_tgt": b} for a, b in pairs]
                                                      for side, pairs in result["index"].weights.items()}}
        _write_json(path, summary)
        state.mark("analyses", time.perf_counter() - clock)
    summary = json.loads(path.read_text(encoding="utf-8"))

    # The plans at every sharpness compared: deterministic given the scores, so rebuilt on resume.
    scores = read_scores(analysis_dir / "ise")
    plans = [plan_from_scores(scores, budget, sharpness=float(v)) for v in options["sharpness"]]
    plan_systems = []
    for plan in plans:
        write_plan_config(plan, analysis_dir / f"plan_s{plan['sharpness']:g}.toml")
        plan_systems.append(_plan_system(reference, plan))
    log(f"[demo] analyses: training {len(plan_systems)} ISE plan(s) with {reference.name}'s recipe")
    plan_rows = _run_systems(out, state, replace(settings, systems=tuple(plan_systems)), codes, seed, base_dir,
                             corpus_dir, progress, log, workers=workers)
    params = {name: info.get("params") for name, info in
              ((n[len("system:"):], i) for n, i in state.data["done"].items() if n.startswith("system:"))}
    references = [s for s in settings.systems if s.train and s.train.get("ranks") == budget
                  and s.train.get("method", "lslo") == "lslo"]
    summary["comparison"] = compare_systems(
        {s.name: rows[s.name] for s in references}, plan_rows, params=params, reference=reference.name,
        plans={system.name: plan for system, plan in zip(plan_systems, plans)}, budget=budget,
        eval_sentences=settings.eval_sentences)
    _write_json(path, summary)
    return summary, plan_rows


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    text = json.dumps(document, indent=2, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def compare_systems(references: Mapping[str, Sequence[Mapping[str, Any]]],
                    challengers: Mapping[str, Sequence[Mapping[str, Any]]], *, reference: str,
                    params: Mapping[str, int | None] | None = None, plans: Mapping[str, Mapping[str, Any]] | None = None,
                    budget: str | None = None, metric: str = "bleu", eval_sentences: int | None = None) -> dict[str, Any]:
    """Direction-group scores of ISE-plan systems against resource-group systems, on the same directions.

    Args:
        references: name -> per-direction rows of the resource-group systems (:func:`lslo.evaluate.evaluate`).
        challengers: name -> per-direction rows of the plan systems.
        reference: the name in ``references`` each challenger is judged against.
        params: name -> trainable parameters (``lslo.parameter_report(model)["total"]``).
        plans: challenger name -> its plan (:func:`lslo.analysis.plan_from_scores`), for ranks and ratios.
        budget: the ranks whose cost is the budget, e.g. ``"2;2;8"``.
        metric: the score compared (sacrebleu's name: "bleu", "chrf++").
        eval_sentences: devtest sentences per direction (reported).

    Returns:
        ``{"metric", "budget", "reference", "eval_sentences", "systems": {name: {"role", "params", "ranks",
        "prune", "sharpness", "scores" {group: mean}, "avg_directions", "avg_groups"}}, "verdicts": [{"system",
        "against", "delta" {group: challenger - reference}, "delta_avg_directions", "delta_avg_groups",
        "directions_better", "directions", "paired_se" (of the mean per-direction difference), "winner"
        (or "tie"), "clear" (the AVG difference exceeds 2 paired s.e.), "equal_budget"}], "text"}``.
    """
    if reference not in references:
        raise ValueError(f"reference {reference!r} is not among the reference systems {sorted(references)}")
    params = params or {}
    plans = plans or {}
    systems: dict[str, Any] = {}
    for role, group in (("resource groups", references), ("ISE plan", challengers)):
        for name, rows in group.items():
            table = group_table(rows, metric=metric)
            plan = plans.get(name)
            systems[name] = {
                "role": role, "params": params.get(name), "scores": table["scores"],
                "avg_directions": table["avg_directions"], "avg_groups": table["avg_groups"],
                **({"ranks": plan["ranks"], "prune": plan["prune"], "sharpness": plan["sharpness"]} if plan else {}),
            }
    base_rows = {(r["src"], r["tgt"]): float(r[metric]) for r in references[reference]}
    label = METRIC_LABELS[metric]
    verdicts, lines = [], []
    for name, rows in challengers.items():
        mine, theirs = systems[name], systems[reference]
        differences = [float(r[metric]) - base_rows[(r["src"], r["tgt"])] for r in rows
                       if (r["src"], r["tgt"]) in base_rows]
        count = len(differences)
        mean = sum(differences) / count if count else float("nan")
        spread = (sum((d - mean) ** 2 for d in differences) / (count - 1)) ** 0.5 if count > 1 else float("nan")
        delta_avg = mine["avg_directions"] - theirs["avg_directions"]
        verdict = {
            "system": name, "against": reference,
            "delta": {g: mine["scores"][g] - theirs["scores"][g] for g in mine["scores"] if g in theirs["scores"]},
            "delta_avg_directions": delta_avg, "delta_avg_groups": mine["avg_groups"] - theirs["avg_groups"],
            "directions_better": sum(d > 0 for d in differences), "directions": count,
            "paired_se": spread / count ** 0.5 if count > 1 else float("nan"),
            # a difference that rounds to 0.00 in the table is a tie, whatever its sign
            "winner": name if delta_avg >= 0.005 else reference if delta_avg <= -0.005 else "tie",
            "equal_budget": None if mine["params"] is None or theirs["params"] is None
            else mine["params"] == theirs["params"],
        }
        # Directions share sentences, so this standard error is rough; it still tells noise from a result.
        verdict["clear"] = bool(abs(delta_avg) > 2 * verdict["paired_se"])
        verdicts.append(verdict)
        budget_text = (f"{mine['params']:,} vs {theirs['params']:,} parameters" if verdict["equal_budget"] is not None
                       else "parameters unknown")
        lines.append(
            f"{name} vs {reference} ({budget_text}): AVG {label} {mine['avg_directions']:.2f} vs "
            f"{theirs['avg_directions']:.2f} ({delta_avg:+.2f} +- {verdict['paired_se']:.2f} s.e. over {count} "
            f"directions, better in {verdict['directions_better']}/{count}); "
            + ("a tie" if verdict["winner"] == "tie" else f"{verdict['winner']} wins by {abs(delta_avg):.2f} {label}")
            + ("" if verdict["clear"] else " (within 2 paired s.e.: no clear winner)"))
    return {"metric": label, "budget": budget, "reference": reference, "eval_sentences": eval_sentences,
            "systems": systems, "verdicts": verdicts, "text": "\n".join(lines)}


def paired_differences(rows: Mapping[str, Sequence[Mapping[str, Any]]], references: Sequence[str], *,
                       metric: str = "bleu") -> list[dict[str, Any]]:
    """Each system against each reference system: the AVG difference over the directions both were
    scored on, with its paired standard error.

    Args:
        rows: system -> per-direction rows (:func:`lslo.evaluate.evaluate`: ``src``, ``tgt``, ``metric``).
        references: the systems every other one is compared with (those absent from ``rows`` are skipped).
        metric: the score compared.

    Returns:
        One dict per (system, reference) pair, system != reference: ``{"system", "against", "delta"
        (mean of system - reference over the shared directions = the difference of their AVG over
        directions), "paired_se" (sample standard deviation of the differences / sqrt(n); NaN for
        n < 2), "directions" (n), "within_noise" (|delta| <= 2 paired_se, or n < 2)}``.
    """
    out = []
    for against in references:
        if against not in rows:
            continue
        base = {(r["src"], r["tgt"]): float(r[metric]) for r in rows[against] if r.get(metric) is not None}
        for system, system_rows in rows.items():
            if system == against:
                continue
            differences = [float(r[metric]) - base[(r["src"], r["tgt"])] for r in system_rows
                           if r.get(metric) is not None and (r["src"], r["tgt"]) in base]
            count = len(differences)
            mean = sum(differences) / count if count else float("nan")
            se = ((sum((d - mean) ** 2 for d in differences) / (count - 1)) ** 0.5 / count ** 0.5
                  if count > 1 else float("nan"))
            out.append({"system": system, "against": against, "delta": mean, "paired_se": se, "directions": count,
                        "within_noise": not (count > 1 and abs(mean) > 2 * se)})
    return out


# The paper's LSLo share of the model: 2;2;8+WL+GPS(0.9), 15.3M trainable parameters on the 615M M2M-124.
PAPER_SHARE = 15.3 / 615


def _fairness_section(settings: DemoSettings, rows, params: Mapping[str, int | None], metric: str = "bleu") -> list[str]:
    """report.md's rules (one learning-rate rule, GPS shape), paired differences and the parameter share."""
    references = [name for name in ("Ft-all", "LSLo 8;8;8") if name in rows]
    verdicts = {(v["system"], v["against"]): v for v in paired_differences(rows, references, metric=metric)}
    gps = next((s.train for s in settings.systems if s.train and "prune_start" in s.train), None)
    departures = {k: v for k, v in {**DEMO_TRAIN_OVERRIDES, "warmup_updates": settings.warmup_updates,
                                    "max_tokens": settings.max_tokens, "epochs": settings.epochs}.items()
                  if RECIPE.get(k) != v}
    lines = ["## How the systems were trained (the same rules for all)", "",
             (f"- Learning rate: the paper's for every system (Ft-all {PAPER_LR['ft-all']:g}, LSLo {PAPER_LR['lslo']:g}), "
             "not tuned on the demo."),
             (f"- GPS: pruning starts after epoch {gps['prune_start']} and reaches its ratio at epoch "
              f"{gps['prune_start'] + gps['prune_duration']} of {settings.epochs} (the paper's shape: start after 2/15 "
              "of training, the ratio reached with a third of the epochs left)." if gps else "- GPS: none."),
             "- Otherwise the authors' recipe (`lslo.recipe.RECIPE`), except, for every system alike: "
             + ", ".join(f"{k} {v}" for k, v in departures.items()) + ".", "",
             "## Differences (paired over directions)", "",
             (f"AVG {METRIC_LABELS.get(metric, metric)} of each system minus the reference's, over the "
              "directions both were scored on, +- the paired standard error (standard deviation of the per-direction "
              "differences / sqrt(directions)). Directions share sentences and languages, so the error is rough; a "
              "difference within 2 standard errors is marked *within noise* and is not a result."), "",
             "| system | " + " | ".join(f"vs {r}" for r in references) + " |", "|---|" + "---|" * len(references)]
    noise = []
    for system in rows:
        cells = []
        for against in references:
            verdict = verdicts.get((system, against))
            if verdict is None:
                cells.append("-")
                continue
            cells.append(f"{verdict['delta']:+.2f} +- {verdict['paired_se']:.2f}"
                         + (" (within noise)" if verdict["within_noise"] else ""))
            if verdict["within_noise"]:
                noise.append(f"{system} vs {against}")
        if any(c != "-" for c in cells):
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines += ["", "Within noise: " + (", ".join(noise) if noise else "none") + ".", ""]
    base = params.get("Ft-all")
    shares = {name: count / base for name, count in params.items()
              if name not in ("Ft-all", "Pretrain") and count and base}
    if shares:
        lines += ["## LSLo's share of the model's parameters", ""]
        lines += [f"- {name}: {params[name]:,} trainable parameters, {100 * share:.1f}% of the model's {base:,}"
                  for name, share in shares.items()]
        top = max(shares.values())
        lines += ["", (f"The paper's LSLo (2;2;8+WL+GPS(0.9)) trains {100 * PAPER_SHARE:.1f}% of M2M-124 615M. "
                       + (f"Here the share is up to {100 * top:.1f}%, {top / PAPER_SHARE:.0f}x the paper's: the tiny "
                          "model's layers are narrow, so per-language adapters are large next to them. The demo can "
                          "show the pipeline end to end, every system trained and scored by the same rules, and how "
                          "heterogeneous ranks and GPS behave against equal ranks and Ft-all on this corpus, with the "
                          "noise stated; it cannot show the paper's parameter efficiency (beating Ft-all with a "
                          "2.5% share), which needs a model of the paper's size."
                          if top > 2 * PAPER_SHARE else
                          f"Here the share is at most {100 * top:.1f}%, the paper's regime.")), ""]
    return lines


def _summary_line(tables: Mapping[str, Mapping[str, Any]], metric_label: str) -> str:
    """What the table shows, in one line, from the numbers (whichever way they came out)."""
    def score(system, column):
        table = tables.get(system)
        return None if table is None else table["scores"].get(column)

    parts = []
    base_h, ft_h = score("Pretrain", "H2H"), score("Ft-all", "H2H")
    if base_h is not None and ft_h is not None:
        parts.append(f"Ft-all {'lowers' if ft_h < base_h else 'raises'} H2H {metric_label} from {base_h:.1f} to {ft_h:.1f}")
    best = "LSLo 2;2;8+GPS(0.9)"
    gps_h, gps_v, ft_v = score(best, "H2H"), score(best, "V2V"), score("Ft-all", "V2V")
    if gps_h is not None and ft_h is not None:
        parts.append(f"{best} reaches H2H {gps_h:.1f} ({gps_h - ft_h:+.1f} vs Ft-all)")
    if gps_v is not None and ft_v is not None:
        parts.append(f"V2V {gps_v:.1f} ({gps_v - ft_v:+.1f} vs Ft-all)")
    avgs = {s: t["avg_directions"] for s, t in tables.items() if t.get("avg_directions") is not None}
    if avgs:
        top = max(avgs, key=avgs.get)
        parts.append(f"best average: {top} ({avgs[top]:.1f})")
    return "; ".join(parts) + "." if parts else "no comparable scores."


def _epoch_history(out: Path, settings: DemoSettings) -> dict[str, dict[int, dict[str, float]]]:
    """{system: {epoch: {group: BLEU}}} of the trained systems' ``metrics.jsonl`` (epochs 1 and up)."""
    history = {}
    for system in settings.systems:
        metrics = out / "systems" / system.slug / "run" / METRICS_NAME
        if system.train is None or not metrics.is_file():
            continue
        epochs = {}
        for line in metrics.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("type") == "epoch" and record["epoch"] >= 1:
                epochs[record["epoch"]] = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("bleu/")}
        if epochs:
            history[system.name] = epochs
    return history


def _analysis_section(analysis: Mapping[str, Any], rows, params, metric: str) -> tuple[list[str], str]:
    """(report.md lines of the analyses and of the ISE plans' comparison, the comparison's text or "")."""
    comparison_text = ""
    lines = ["", "## Analyses (Weight Learning, Intrinsic Subspace Estimation, plan)", "",
             "```", str(analysis.get("summary", ""))[:6000], "```"]
    if analysis.get("comparison"):
        comparison = analysis["comparison"]
        compared = {name: rows[name] for name in comparison["systems"] if name in rows}
        comparison_text = comparison["text"]
        lines += ["", f"### ISE plans against the resource-group ranks at the budget of {comparison['budget']}", "",
                  (f"Same recipe (learning rate, epochs, GPS schedule, index plan) as {comparison['reference']}; "
                   f"only the per-language ranks and pruning ratios differ. {comparison['metric']} on the first "
                   f"{comparison['eval_sentences']} devtest sentences per direction (the table above). A difference "
                   "within about two paired standard errors is not a result."), "",
                  format_table(compared, metric=metric, params=params, style="markdown"), "",
                  *[f"- {line}" for line in comparison_text.splitlines()], "",
                  "Plans (rank / pruning ratio per language):", "",
                  *[f"- {name}: " + ", ".join(f"{c} {r}/{entry['prune'].get(c, 0.0):.2f}"
                                              for c, r in entry["ranks"].items())
                    for name, entry in comparison["systems"].items() if "ranks" in entry]]
    return lines, comparison_text


def _report(out, state, settings, codes, base_dir, rows, analysis, *, synthetic: bool, log) -> DemoResult:
    clock = time.perf_counter()
    params = {name: state.data["done"].get(f"system:{name}", {}).get("params") for name in rows}
    metric = "bleu"
    tables = {name: group_table(r, metric=metric) for name, r in rows.items()}
    table_text = format_table(rows, params=params, style="plain")
    table_md = format_table(rows, params=params, style="markdown")
    summary = _summary_line(tables, "BLEU")

    files = {}
    history = _epoch_history(out, settings)
    pretrain_table = tables.get("Pretrain")
    if history:
        files["curves"] = out / "curves.png"
        plot_epoch_curves(history, files["curves"], groups=("H2H", "V2V"), metric=metric,
                          pretrained=pretrain_table["scores"] if pretrain_table else None,
                          title=f"devtest BLEU per epoch ({settings.curve_sentences} sentences per direction, greedy)")
    files["table_png"] = out / "table.png"
    plot_group_bars(rows, files["table_png"], metric=metric, title="BLEU by direction group (devtest)")

    lslo_system = next((s for s in reversed(settings.systems) if s.train and s.train.get("method") != "ft-all"), None)
    param_text = ""
    if lslo_system is not None:
        model = _load_system(base_dir, out / "systems" / lslo_system.slug / "run" / "final", "lslo")
        param_text = f"{lslo_system.name}:\n" + format_parameter_report(parameter_report(model))
    seconds = state.seconds()
    labels = ("BLEU and chrF++ with sacrebleu's standard tokenizers (13a / chrF word_order=2) on ARTIFICIAL "
              "languages; not spBLEU, and not comparable with the paper's numbers" if synthetic else
              "see the metric named in each table")
    lines = [
        "# lslo demo report", "",
        f"Languages: {', '.join(codes)}" + (" (artificial stand-ins, see data/languages.json)" if synthetic else ""),
        (f"Metric: {labels}. Beam {settings.num_beams}, first {settings.eval_sentences} devtest sentences per "
         f"direction; fine-tuning {settings.epochs} epochs on dev ({settings.dev_size} sentences per language)."), "",
        f"**What the table shows:** {summary}", "",
        table_md, "",
        *_fairness_section(settings, rows, params, metric),
        "## Parameters", "", "```", param_text, "```", "",
        "## Stage times (this machine)", "",
        "| stage | seconds |", "|---|---|",
        *[f"| {stage} | {secs:.1f} |" for stage, secs in seconds.items()],
        f"| total | {sum(seconds.values()):.1f} |", "",
        "## Files", "",
        ("- `systems/<system>/scores.csv|json`: per-direction scores; `systems/<system>/run/`: the training run "
         "(metrics.jsonl, checkpoints, final adapters or model)"),
        "- `curves.png`: H2H and V2V per epoch (the paper's Figure 3); `table.png`: the table as bars",
        "- `base_model/`: the pretrained tiny model; `data/`: the synthetic corpus" if synthetic else "",
    ]
    comparison_text = ""
    if analysis is not None:
        analysis_lines, comparison_text = _analysis_section(analysis, rows, params, metric)
        lines += analysis_lines
    report = "\n".join(lines) + "\n"
    files["report"] = out / "report.md"
    atomic_write_file(files["report"], lambda tmp: Path(tmp).write_text(report, encoding="utf-8"))
    state.mark("report", time.perf_counter() - clock)

    log("")
    log(table_text)
    if param_text:
        log(param_text)
    log(f"What the table shows: {summary}")
    if analysis is not None:
        log(str(analysis.get("summary", "")))
        if comparison_text:
            log("ISE plan vs resource-group ranks at the same budget:")
            log(comparison_text)
    log(f"Metric: {labels}.")
    log(f"[demo] total {sum(state.seconds().values()):.0f} s; report: {files['report']}")
    return DemoResult(out, table_text, summary, state.seconds(), files)
