"""Architecture analyses of the paper and one step past it: Intrinsic Subspace Estimation (ISE),
language-specific pruning (LSP), their figures and correlations, and per-language rank plans.

- **ISE** (Section 4.2, Eq. 6; Figures 2 and 5; Tables 9-10): equal ranks in every module, layer-wise
  cross-language L1 pruning (one pool per encoder / decoder layer, all languages and modules) to
  P_ISE = 0.7 under the Gradual Pruning Schedule (E=2, k=8, T=15), then
  ``Score(B) = #pruned(B) - P_ISE * #B`` for every language x module x layer. Negative = the
  language kept more of its B than the pool's average: it needs more space there.
- **LSP** (Section 7.3, Appendix D; Figures 4 and 6): one pool per language, rank 8: which weight
  matrices matter most for each language.
- **Correlations** (Appendix C, Tables 9-10): Pearson r and p-value (``scipy.stats.pearsonr``) between
  each module's per-language score (mean over layers) and the languages' bitext sizes with English
  (the paper's Tables 5/6 built in as :data:`PAPER_BITEXT_SIZES`; English has none there, so the
  paper's correlations run over 11 languages, which its p-values confirm).
- **Plans** (:func:`plan_from_scores`): the paper's Limitations ask for per-language ranks and pruning
  ratios in place of coarse resource groups; a plan turns ISE scores into both under a parameter
  budget and writes a config file ``lslo train --config`` reads.
- **Weight Learning** (Section 4.1, Eq. 5; Figure 1): a source- and a target-indexed LSLo in every
  module, mixed by ``softmax`` of two logits per encoder/decoder layer (:mod:`lslo.weight_learning`),
  trained by the engine (``method="weight-learning"``); the larger weight per layer gives the index plan
  ``lslo train --index-plan`` reads (:func:`learn_index`).

Everything runs through :func:`lslo.train.train` (the same engine, CPU to many GPUs) and reads the
masks :func:`lslo.pruning.prune` wrote; the CLI verbs ``lslo estimate``, ``lslo plan`` and ``lslo learn-index``
only parse arguments and call :func:`estimate_subspace`, :func:`make_plan` and :func:`learn_index`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import GROUP_ORDER, RESOURCE_GROUPS
from .io import atomic_write_file
from .model import load_adapters, load_base_model, read_adapter_config
from .plans import (
    PlanArguments,
    format_plan,
    make_plan,
    parse_budget,
    plan_from_scores,
    plan_train_config,
    write_plan_config,
)
from .plotting import (
    plot_index_weights,
    plot_language_modules,
    plot_layer_modules,
    plot_per_language,
    plot_per_layer,
)
from .pruning import _check_ratio
from .scores import (
    _POOLS,
    MODULE_LABELS,
    PAPER_BITEXT_SIZES,
    SCORES_CSV,  # noqa: F401
    SCORES_FORMAT,
    SCORES_JSON,  # noqa: F401
    _help,
    check_equal_ranks,
    format_correlations,
    format_score_summary,
    language_demands,
    module_correlations,
    module_label,
    parse_size,
    read_scores,
    read_sizes,
    score_matrix,
    score_model,
    write_scores,
)
from .train import TrainArguments, load_config_file, train
from .weight_learning import (  # Weight Learning's names lived here: re-exported, as the scores', figures' and plans'
    INDEX_PLAN_FORMAT,  # noqa: F401
    WL_CONFIG_NAME,
    WL_FORMAT,  # noqa: F401
    WL_WEIGHTS_NAME,  # noqa: F401
    _check_weights,
    _mix_weights_json,
    derive_index_plan,
    learned_mix_weights,
    load_weight_learning,
    read_index_plan,
    save_weight_learning,
    weight_learning_config,
    weight_learning_state,
    write_index_plan,
)

__all__ = [
    "MODULE_LABELS",
    "PAPER_BITEXT_SIZES",
    "SCORES_FORMAT",
    "EstimateArguments",
    "EstimateResult",
    "LearnIndexArguments",
    "LearnIndexResult",
    "PlanArguments",
    "check_equal_ranks",
    "derive_index_plan",
    "estimate_subspace",
    "format_correlations",
    "format_index_weights",
    "format_plan",
    "format_score_summary",
    "language_demands",
    "learn_index",
    "learned_mix_weights",
    "load_weight_learning",
    "make_plan",
    "module_correlations",
    "module_label",
    "parse_budget",
    "parse_size",
    "plan_from_scores",
    "plan_train_config",
    "plot_index_weights",
    "plot_language_modules",
    "plot_layer_modules",
    "plot_per_language",
    "plot_per_layer",
    "read_index_plan",
    "read_scores",
    "read_sizes",
    "run_analyses",
    "save_weight_learning",
    "score_matrix",
    "score_model",
    "weight_learning_config",
    "weight_learning_state",
    "write_analysis",
    "write_index_plan",
    "write_plan_config",
    "write_scores",
]

# ============================================================ estimate (ISE)
@dataclass
class EstimateArguments:
    """Everything ``lslo estimate`` takes; each field is also the flag ``--field-name``.

    Training goes through :func:`lslo.train.train` with equal ranks, ``prune=prune_ratio`` and
    ``prune_pool=pool``; any other training setting comes from ``train_config`` (a file of
    :class:`lslo.train.TrainArguments` fields).
    """

    model: str = field(default="facebook/flores101_mm100_615M", metadata=_help("base model: hub id or folder"))
    output_dir: str | None = field(default=None, metadata=_help(
        "where scores, figures and tables go (the training run in <output-dir>/run)"))
    flores_dir: str | None = field(default=None, metadata=_help("FLORES-101/200 folder (dev/ trains)"))
    train_tsv: str | None = field(default=None, metadata=_help("training pairs TSV instead of FLORES dev"))
    languages: str | None = field(default=None, metadata=_help("lang12, lang30, all, or comma-separated codes"))
    groups: str | None = field(default=None, metadata=_help("resource groups of extra languages: 'xx=V,yy=H'"))
    pool: str = field(default="layer", metadata=_help(
        "layer: Intrinsic Subspace Estimation (one pool per encoder/decoder layer across languages); language: "
        "language-specific pruning (one pool per language)"))
    rank: int = field(default=8, metadata=_help("the rank of every language in every module"))
    prune_ratio: float = field(default=0.7, metadata=_help("P_ISE / P_LSP, the final ratio of every pool"))
    prune_start: int = field(default=2, metadata=_help("E: last epoch without pruning"))
    prune_duration: int = field(default=8, metadata=_help("k: epochs over which pruning reaches its ratio"))
    epochs: int = field(default=15, metadata=_help("T: training epochs (>= prune_start + prune_duration)"))
    target_modules: str = field(default="all", metadata=_help("all, attn, fc, names or a regex"))
    index_plan: str = field(default="paper", metadata=_help("paper, src, tgt, or a JSON plan file"))
    ffn: str = field(default="full", metadata=_help("full or reference (adapt only d_model units of fc1/fc2)"))
    init: str = field(default="lora", metadata=_help("lora or reference (the authors' A initialisation)"))
    lr: float | None = field(default=None, metadata=_help("peak learning rate (default 3e-3)"))
    max_tokens: int | None = field(default=None, metadata=_help("token budget of a batch per process (default 4096)"))
    warmup_updates: int | None = field(default=None, metadata=_help("inverse-sqrt warm-up steps (default 4000)"))
    seed: int = field(default=1, metadata=_help("random seed"))
    mixed_precision: str | None = field(default=None, metadata=_help(
        "no, bf16 or fp16 (default: as lslo train resolves it: accelerate's setting, else bf16/fp16 on a GPU, fp32 on CPU)"))
    cpu: bool = field(default=False, metadata=_help("train on the CPU even when a GPU is present"))
    train_config: str | None = field(default=None, metadata=_help(
        "a toml/json/yaml file of further `lslo train` settings (max_length, update_freq, ...)"))
    adapters: str | None = field(default=None, metadata=_help(
        "score these pruned adapters (an earlier run's final/) instead of training"))
    sizes: str | None = field(default=None, metadata=_help(
        "bitext/pretraining sizes per language (JSON or 'code size' lines); they add to and override the "
        "paper's Tables 5/6"))
    log_sizes: bool = field(default=False, metadata=_help("correlate with log10(size) (the paper: raw sizes)"))
    resume: bool = field(default=False, metadata=_help("continue the training run in <output-dir>/run"))
    overwrite: bool = field(default=False, metadata=_help("replace an earlier run in <output-dir>/run"))
    progress: bool = field(default=True, metadata=_help("progress bars"))

    def __post_init__(self) -> None:
        if self.pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {self.pool!r}")
        for name in ("rank", "prune_duration", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.prune_start, bool) or not isinstance(self.prune_start, int) or self.prune_start < 0:
            raise ValueError(f"prune_start must be an int >= 0, got {self.prune_start!r}")
        ratio = _check_ratio(self.prune_ratio, "prune_ratio")
        if ratio == 0.0:
            raise ValueError("prune_ratio must be > 0: scores compare how much of each B a pool prunes")
        if self.adapters is None and self.epochs < self.prune_start + self.prune_duration:
            raise ValueError(f"epochs={self.epochs} ends before the Gradual Pruning Schedule reaches prune_ratio "
                             f"(epoch prune_start + prune_duration = {self.prune_start + self.prune_duration}); "
                             "raise epochs or shorten the schedule")

    def train_arguments(self, overrides: Mapping[str, Any] | None = None):
        """The :class:`lslo.train.TrainArguments` of the pruning run (``train_config`` under these fields)."""
        if self.output_dir is None:
            raise ValueError("--output-dir is required")
        values = load_config_file(self.train_config) if self.train_config else {}
        for name in ("ranks", "prune", "prune_pool", "method"):
            if name in values:
                raise ValueError(f"--train-config sets {name!r}, which lslo estimate decides (rank/pool/prune_ratio)")
        if values.get("max_steps") is not None:
            raise ValueError("--train-config sets max_steps: the run could end before pruning reaches its ratio")
        values.update({
            "model": self.model, "output_dir": str(Path(self.output_dir) / "run"), "method": "lslo",
            "ranks": str(self.rank), "prune": str(self.prune_ratio), "prune_pool": self.pool,
            "prune_start": self.prune_start, "prune_duration": self.prune_duration, "epochs": self.epochs,
            "target_modules": self.target_modules, "index_plan": self.index_plan, "ffn": self.ffn, "init": self.init,
            "seed": self.seed, "mixed_precision": self.mixed_precision, "cpu": self.cpu, "resume": self.resume,
            "overwrite": self.overwrite, "progress": self.progress,
        })
        for name in ("flores_dir", "train_tsv", "languages", "groups", "lr", "max_tokens", "warmup_updates"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        values.update(overrides or {})
        return TrainArguments(**values)


@dataclass
class EstimateResult:
    """What :func:`estimate_subspace` produced."""

    output_dir: Path
    scores: dict[str, Any]
    correlations: dict[str, Any] | None
    files: dict[str, Path]
    summary: str
    run_dir: Path | None = None


def _figure_names(pool: str) -> list[tuple[str, str]]:
    # The paper draws Figures 2 and 5 from ISE and 4 and 6 from LSP; all four are cheap, so both pools
    # draw all of them, the pool's own figures first.
    isef = [("fig2_language_modules", "Figure 2"), ("fig5_per_layer", "Figure 5")]
    lspf = [("fig4_layer_modules", "Figure 4"), ("fig6_per_language", "Figure 6")]
    return isef + lspf if pool == "layer" else lspf + isef


def write_analysis(scores: Mapping[str, Any], output_dir: str | os.PathLike, *,
                   sizes: Mapping[str, float | None] | None = None, log_sizes: bool = False,
                   group_of=None) -> tuple[dict[str, Path], dict[str, Any] | None, str]:
    """Write the scores (CSV, JSON), the four figures and the correlation tables of a scores document.

    Returns:
        (files by name, correlations or None when fewer than 3 languages have a size, summary text).
    """
    out = Path(output_dir)
    files = {f"scores_{k}": v for k, v in write_scores(scores, out).items()}
    pool = scores.get("pool", "layer")
    plotters = {"fig2_language_modules": lambda p: plot_language_modules(scores, p, group_of=group_of),
                "fig5_per_layer": lambda p: plot_per_layer(scores, p, group_of=group_of),
                "fig4_layer_modules": lambda p: plot_layer_modules(scores, p),
                "fig6_per_language": lambda p: plot_per_language(scores, p)}
    for name, _ in _figure_names(pool):
        path = out / f"{name}.png"
        plotters[name](path)
        files[name] = path
    summary = [format_score_summary(scores, group_of)]
    merged = {**PAPER_BITEXT_SIZES, **(sizes or {})}
    correlations = None
    try:
        correlations = module_correlations(scores, merged, log_sizes=log_sizes)
    except ValueError as exc:
        summary.append(f"(no correlations: {exc})")
    if correlations is not None:
        table = format_correlations(correlations)
        summary.append(table)
        text = json.dumps(correlations, indent=1, allow_nan=True)
        files["correlations_json"] = out / "correlations.json"
        files["correlations_txt"] = out / "correlations.txt"
        atomic_write_file(files["correlations_json"], lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        atomic_write_file(files["correlations_txt"], lambda tmp: Path(tmp).write_text(table + "\n", encoding="utf-8"))
    return files, correlations, "\n\n".join(summary)


def estimate_subspace(args: EstimateArguments, *, train_overrides: Mapping[str, Any] | None = None) -> EstimateResult:
    """Intrinsic Subspace Estimation (``pool="layer"``) or language-specific pruning (``"language"``).

    Trains LSLo with one rank for every language and module through :func:`lslo.train.train`, pruning
    every pool to ``prune_ratio`` under the Gradual Pruning Schedule (unless ``args.adapters`` names
    pruned adapters to score), then writes to ``args.output_dir``: ``subspace_scores.{json,csv}``,
    ``fig2_language_modules.png``, ``fig5_per_layer.png``, ``fig4_layer_modules.png``,
    ``fig6_per_language.png`` and ``correlations.{json,txt}`` (Tables 9-10).

    Args:
        args: the :class:`EstimateArguments`.
        train_overrides: more :class:`lslo.train.TrainArguments` fields (win over ``train_config``).

    Returns:
        An :class:`EstimateResult`. Under several processes only the main one scores and writes;
        the others return an empty result after training.
    """
    if args.output_dir is None:
        raise ValueError("--output-dir is required")
    out = Path(args.output_dir)
    sizes = read_sizes(args.sizes) if args.sizes else None  # a bad file fails before hours of training
    run_dir = None
    if args.adapters is not None:
        read_adapter_config(args.adapters)  # a missing or damaged folder fails before the model loads
        adapters = Path(args.adapters)
    else:
        train_args = args.train_arguments(train_overrides)
        result = train(train_args)
        run_dir, adapters = result.output_dir, result.final_dir
        if result.stopped_early:
            raise ValueError(f"the run in {run_dir} stopped early (max_steps): its pools never reached prune_ratio")
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return EstimateResult(out, {}, None, {}, "", run_dir)
    model = load_base_model(args.model)
    load_adapters(model, adapters)
    scores = score_model(model, args.prune_ratio, pool=args.pool)
    scores.update({"model": args.model, "adapters": str(adapters), "prune_start": args.prune_start,
                   "prune_duration": args.prune_duration, "epochs": args.epochs})
    files, correlations, summary = write_analysis(scores, out, sizes=sizes, log_sizes=args.log_sizes)
    return EstimateResult(out, scores, correlations, files, summary, run_dir)


# ======================================================================== demo
def _group_means(totals: Mapping[str, float], group_of) -> dict[str, float]:
    by_group: dict[str, list[float]] = {}
    for code, value in totals.items():
        group = group_of(code)
        if group is not None:
            by_group.setdefault(group, []).append(value)
    return {g: sum(by_group[g]) / len(by_group[g]) for g in GROUP_ORDER if g in by_group}


def _write_sizes(out: Path, resource_sizes: Mapping[str, float]) -> Path:
    """``out/resource_sizes.json`` ({code: size}) for ``lslo estimate --sizes``; returns its path."""
    sizes = {str(c): parse_size(v) for c, v in resource_sizes.items()}
    out.mkdir(parents=True, exist_ok=True)
    sizes_file = out / "resource_sizes.json"
    text = json.dumps(sizes, indent=1)
    atomic_write_file(sizes_file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return sizes_file


def _recovery(scores, resource_sizes: Mapping[str, float] | None, group_of):
    """(raw-size correlations, log-size correlations, mean total score per group, whether the means fall
    H > M > L > V) of ISE scores against the languages' resource sizes."""
    # The demo's sizes are the truth of its languages: the paper's numbers must not fill gaps.
    merged = {c: parse_size(v) for c, v in resource_sizes.items()} if resource_sizes else PAPER_BITEXT_SIZES
    correlation_raw = module_correlations(scores, merged, log_sizes=False)
    correlation_log = module_correlations(scores, merged, log_sizes=True)
    totals = {c: d["score"] for c, d in language_demands(scores).items()}
    group_means = _group_means(totals, group_of)
    ordered = [g for g in GROUP_ORDER if g in group_means]
    monotone = all(group_means[a] >= group_means[b] for a, b in itertools.pairwise(ordered))
    return correlation_raw, correlation_log, group_means, monotone


def run_analyses(model_dir: str | os.PathLike, flores_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 languages: str | Sequence[str] | None = None, resource_sizes: Mapping[str, float] | None = None,
                 group_of=None, epochs: int = 6, prune_start: int = 1, prune_duration: int = 3, rank: int = 8,
                 prune_ratio: float = 0.7, budget: str = "H=2,M=2,L=8,V=8", lr: float = 3e-3, max_tokens: int = 1024,
                 warmup_updates: int = 20, seed: int = 1, progress: bool = False, weight_learning: bool = True,
                 wl_epochs: int | None = None, train_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """ISE, a plan and Weight Learning on a small set-up (the demo's), and whether ISE recovers the known
    resource levels.

    Runs :func:`estimate_subspace` (pool ``"layer"``, rank ``rank`` everywhere, GPS to ``prune_ratio``
    over ``epochs`` epochs) into ``out_dir/ise``, correlates each language's score with its
    ``resource_sizes`` (e.g. the pretraining sentences of the demo's synthetic languages: the analogue
    of Tables 9-10), and makes a plan (:func:`plan_from_scores`) at the budget of ``budget`` ranks,
    written to ``out_dir/plan.toml``. With ``weight_learning`` it first runs :func:`learn_index` into
    ``out_dir/wl`` and the plan's config uses the learned index plan.

    "Recovered" means: the overall Pearson correlation between each language's total score and
    log10(size) is positive with p < 0.05 (lower resource -> more negative score -> more space).
    Raw sizes (the paper's choice) are reported too; on sizes spanning orders of magnitude the log
    is the fairer test of a monotone trend.

    Args:
        model_dir: the base model folder (with its tokenizer).
        flores_dir: FLORES-layout folder of the fine-tuning data (dev/ trains).
        out_dir: where everything goes.
        languages: codes (default: every language of ``resource_sizes``, else the run's default).
        resource_sizes: code -> pretraining data size; default :data:`PAPER_BITEXT_SIZES`.
        group_of: code -> resource group (default: the paper's groups) for the group means.
        epochs, prune_start, prune_duration, rank, prune_ratio: the ISE run (defaults sized for a tiny
            model on a CPU; the paper's are 15, 2, 8, 8, 0.7).
        budget: the plan's budget (see :func:`parse_budget`); default the paper's ranks of the resource
            groups present (2;2;8 on lang12), so the plan competes with them at equal size.
        lr, max_tokens, warmup_updates, seed, progress, train_overrides: training settings.
        weight_learning: also run Weight Learning.
        wl_epochs: epochs of Weight Learning (default ``epochs``).

    Returns:
        ``{"estimate": EstimateResult, "correlation_log": {...}, "correlation_raw": {...},
        "group_means": {group: mean total score}, "groups_ordered": bool, "recovered": bool,
        "plan": plan dict, "plan_config": path, "index": LearnIndexResult or None, "summary": str}``.
    """
    out = Path(out_dir)
    group_of = group_of or RESOURCE_GROUPS.get
    if languages is None and resource_sizes:
        languages = list(resource_sizes)
    if languages is not None and not isinstance(languages, str):
        languages = ",".join(languages)
    sizes_file = _write_sizes(out, resource_sizes) if resource_sizes is not None else None
    args = EstimateArguments(model=str(model_dir), output_dir=str(out / "ise"), flores_dir=str(flores_dir),
                             languages=languages, pool="layer", rank=rank, prune_ratio=prune_ratio,
                             prune_start=prune_start, prune_duration=prune_duration, epochs=epochs, lr=lr,
                             max_tokens=max_tokens, warmup_updates=warmup_updates, seed=seed, cpu=True,
                             sizes=str(sizes_file) if sizes_file else None, overwrite=True, progress=progress)
    index = None
    if weight_learning:
        index = learn_index(LearnIndexArguments(
            model=str(model_dir), output_dir=str(out / "wl"), flores_dir=str(flores_dir), languages=languages,
            rank=rank, epochs=wl_epochs or epochs, lr=lr, max_tokens=max_tokens, warmup_updates=warmup_updates,
            seed=seed, cpu=True, overwrite=True, progress=progress), train_overrides=train_overrides)
    estimate = estimate_subspace(args, train_overrides=train_overrides)
    scores = estimate.scores
    correlation_raw, correlation_log, group_means, monotone = _recovery(scores, resource_sizes, group_of)
    overall = correlation_log["overall"]
    recovered = bool(math.isfinite(overall["r"]) and overall["r"] > 0 and overall["p"] < 0.05)
    plan = plan_from_scores(scores, budget)
    plan_path = write_plan_config(plan, out / "plan.toml",
                                  index_plan=str(index.files["index_plan"]) if index is not None else None)
    lines = [*([index.summary, ""] if index is not None else []), estimate.summary, "",
             (f"ISE vs resource sizes (each language's total score): log10 sizes r = {overall['r']:.2f} "
              f"(p = {overall['p']:.3g}); raw sizes r = {correlation_raw['overall']['r']:.2f} "
              f"(p = {correlation_raw['overall']['p']:.3g}); n = {overall['n']}"),
             ("mean total score by resource group: " + ", ".join(f"{g} {v:.1f}" for g, v in group_means.items())
              + (" (ordered H > ... > V as expected)" if monotone else " (NOT ordered by resource level)")),
             f"ISE recovers the resource levels: {'yes' if recovered else 'no'}", "", format_plan(plan, group_of),
             f"plan config: {plan_path}"]
    return {"estimate": estimate, "correlation_raw": correlation_raw, "correlation_log": correlation_log,
            "group_means": group_means, "groups_ordered": monotone, "recovered": recovered, "plan": plan,
            "plan_config": plan_path, "index": index, "summary": "\n".join(lines)}


def _help_field(default, text: str):
    return field(default=default, metadata=_help(text))


@dataclass
class LearnIndexArguments:
    """Everything ``lslo learn-index`` takes (Weight Learning, paper Sections 4.1 and 6.1)."""

    model: str = _help_field("facebook/flores101_mm100_615M", "base model: hub id or folder")
    output_dir: str | None = _help_field(None, "where the weights, Figure 1 and the index plan go (the run in "
                                               "<output-dir>/run)")
    flores_dir: str | None = _help_field(None, "FLORES-101/200 folder (dev/ trains)")
    train_tsv: str | None = _help_field(None, "training pairs TSV instead of FLORES dev")
    languages: str | None = _help_field(None, "lang12, lang30, all, or comma-separated codes")
    groups: str | None = _help_field(None, "resource groups of extra languages: 'xx=V,yy=H'")
    rank: int = _help_field(8, "rank of every language in both the source- and the target-indexed LSLo")
    epochs: int = _help_field(15, "training epochs")
    target_modules: str = _help_field("all", "all, attn, fc, names or a regex")
    ffn: str = _help_field("full", "full or reference (adapt only d_model units of fc1/fc2)")
    init: str = _help_field("lora", "lora or reference (the authors' A initialisation)")
    lr: float | None = _help_field(None, "peak learning rate (default 3e-3)")
    max_tokens: int | None = _help_field(None, "token budget of a batch per process (default 4096)")
    warmup_updates: int | None = _help_field(None, "inverse-sqrt warm-up steps (default 4000)")
    max_steps: int | None = _help_field(None, "stop after this many optimizer steps")
    seed: int = _help_field(1, "random seed")
    mixed_precision: str | None = _help_field(None, "no, bf16 or fp16 (default: as lslo train resolves it)")
    cpu: bool = _help_field(False, "train on the CPU even when a GPU is present")
    train_config: str | None = _help_field(None, "a toml/json/yaml file of further `lslo train` settings")
    adapters: str | None = _help_field(None, "read the weights of an earlier Weight-Learning run's final/ "
                                             "instead of training")
    resume: bool = _help_field(False, "continue the training run in <output-dir>/run")
    overwrite: bool = _help_field(False, "replace an earlier run in <output-dir>/run")
    progress: bool = _help_field(True, "progress bars")

    def __post_init__(self) -> None:
        for name in ("rank", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    def train_arguments(self, overrides: Mapping[str, Any] | None = None):
        """The :class:`lslo.train.TrainArguments` of the Weight-Learning run (``method="weight-learning"``)."""
        if self.output_dir is None:
            raise ValueError("--output-dir is required")
        values = load_config_file(self.train_config) if self.train_config else {}
        for name in ("ranks", "prune", "method", "index_plan"):
            if name in values:
                raise ValueError(f"--train-config sets {name!r}, which lslo learn-index decides")
        values.update({
            "model": self.model, "output_dir": str(Path(self.output_dir) / "run"), "method": "weight-learning",
            "ranks": str(self.rank), "epochs": self.epochs, "target_modules": self.target_modules, "ffn": self.ffn,
            "init": self.init, "seed": self.seed, "mixed_precision": self.mixed_precision, "cpu": self.cpu,
            "resume": self.resume, "overwrite": self.overwrite, "progress": self.progress,
        })
        for name in ("flores_dir", "train_tsv", "languages", "groups", "lr", "max_tokens", "warmup_updates",
                     "max_steps"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        values.update(overrides or {})
        return TrainArguments(**values)


@dataclass
class LearnIndexResult:
    """What :func:`learn_index` produced: the weights per layer, the derived plan, the files written."""

    output_dir: Path
    weights: dict[str, list[tuple[float, float]]]
    index_plan: dict[str, list[str]]
    files: dict[str, Path]
    summary: str
    run_dir: Path | None = None


def format_index_weights(weights: Mapping[str, Sequence[Sequence[float]]]) -> str:
    """The learned weights and the derived index per layer, as a table."""
    plan = derive_index_plan(weights)
    lines = [f"{'side':<8} {'layer':>5} {'w_src':>7} {'w_tgt':>7}  index"]
    for side, pairs in _check_weights(weights).items():
        for i, (w_src, w_tgt) in enumerate(pairs):
            lines.append(f"{side:<8} {i + 1:>5} {w_src:>7.3f} {w_tgt:>7.3f}  {plan[side][i]}")
    return "\n".join(lines)


def learn_index(args: LearnIndexArguments, *, train_overrides: Mapping[str, Any] | None = None) -> LearnIndexResult:
    """Weight Learning: train source- and target-indexed LSLo mixed per layer (Eq. 5), derive the index plan.

    Trains through :func:`lslo.train.train` (``method="weight-learning"``; equal ranks, every target
    module, both routings, two logits per encoder/decoder layer shared by its modules), unless
    ``args.adapters`` names an earlier run's ``final/``; then writes to ``args.output_dir``:
    ``mix_weights.json`` (w_src, w_tgt per layer), ``fig1_index_weights.png`` (Figure 1) and
    ``index_plan.json`` (the larger weight per layer) for ``lslo train --index-plan``.

    Returns:
        A :class:`LearnIndexResult` (empty on the non-main processes of a multi-process run).
    """
    if args.output_dir is None:
        raise ValueError("--output-dir is required")
    out = Path(args.output_dir)
    run_dir = None
    if args.adapters is not None:
        state_dir = Path(args.adapters)
        if not (state_dir / WL_CONFIG_NAME).is_file():
            raise ValueError(f"{state_dir} holds no Weight-Learning state ({WL_CONFIG_NAME}); give a learn-index "
                             "run's final/ folder")
    else:
        result = train(args.train_arguments(train_overrides))
        run_dir, state_dir = result.output_dir, result.final_dir
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return LearnIndexResult(out, {}, {}, {}, "", run_dir)
    model = load_base_model(args.model)
    load_weight_learning(model, state_dir)
    weights = learned_mix_weights(model)
    plan = derive_index_plan(weights)
    out.mkdir(parents=True, exist_ok=True)
    files = {"weights": out / "mix_weights.json", "figure1": out / "fig1_index_weights.png",
             "index_plan": out / "index_plan.json"}
    text = json.dumps({"weights": _mix_weights_json(weights), "state": str(state_dir)}, indent=1)
    atomic_write_file(files["weights"], lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    plot_index_weights(weights, files["figure1"])
    write_index_plan(weights, files["index_plan"])
    summary = (f"Weight Learning (Eq. 5): softmax mixing weights per layer and the index with the larger one\n"
               f"{format_index_weights(weights)}\n"
               f"train with it: lslo train --index-plan {files['index_plan']} ...")
    return LearnIndexResult(out, weights, plan, files, summary, run_dir)
