"""The figures and the configuration table that ``snakemake --report`` shows for a run.

Everything here reads files the workflow already wrote (the sequence index, the rank status
files, the manifest, a sample of the merged vectors) and draws with matplotlib's Agg canvas on ``Figure`` objects, never
through pyplot, so nothing needs a display and no global plotting state is involved. A rank
that failed has no timings; it is drawn as failed, never skipped and never an error.
"""

import html
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from esmshard.files import atomic_output
from esmshard.outputs import OutputSpec
from esmshard.plan import RANDOM_WEIGHTS_WARNING
from esmshard.status import read_status

OK_COLOR, FAILED_COLOR, MISSING_COLOR = "#2b6cb0", "#c53030", "#e53e3e"
_DPI = 100
_MAX_ERRORS_SHOWN = 4  # failed ranks named under the per-rank plot; the manifest has them all
_LABEL_EVERY_BAR_UP_TO = 32  # ranks; beyond that, per-bar labels would overlap


@dataclass
class RankOutcome:
    """One rank as the report shows it. Timings are None for a failed rank."""

    rank: int
    ok: bool
    device: str  # "GPU 0", "CPU", or "" when the rank failed before saying
    host: str | None
    seconds: float | None
    residues_per_second: float | None
    embedded: int  # sequences of this rank in embeddings.h5
    missing: int  # sequences of this rank that are not
    error: str | None


def read_lengths(index_path) -> np.ndarray:
    """Residue counts of the input sequences, from the index's ``length`` column."""
    with h5py.File(index_path, "r") as h5:
        return h5["length"][:]


def rank_outcomes(statuses: list[dict], manifest: dict) -> list[RankOutcome]:
    """Per rank: the status file's timings and where it ran, and the manifest's verdict.

    The manifest has the last word: the aggregation may have rejected the shard of a rank
    whose status says ok (a damaged shard), and that rank is then failed too.
    """
    failed = {entry["rank"]: entry for entry in manifest.get("ranks_failed", [])}
    outcomes = []
    for position, status in enumerate(statuses):
        rank = int(status.get("rank", position))
        ok = bool(status.get("ok")) and rank not in failed
        gpu = status.get("gpu")
        device = f"GPU {gpu}" if gpu else ("CPU" if "gpu" in status else "")
        failure = failed.get(rank, {})
        outcomes.append(
            RankOutcome(
                rank=rank,
                ok=ok,
                device=device,
                host=status.get("host"),
                seconds=status.get("seconds") if ok else None,
                residues_per_second=status.get("residues_per_second") if ok else None,
                embedded=int(status.get("sequences", 0)) if ok else 0,
                missing=len(failure.get("missing_ids", [])),
                error=None if ok else failure.get("error") or status.get("error") or "unknown error",
            )
        )
    return sorted(outcomes, key=lambda outcome: outcome.rank)


def length_histogram(lengths: np.ndarray, spec: OutputSpec) -> Figure:
    """Histogram of sequence lengths on a log axis (protein lengths span orders of magnitude),
    with the model's limit marked: longer sequences are truncated or embedded in windows."""
    figure, axes = _figure(7, 4)
    if len(lengths) == 0:
        axes.text(0.5, 0.5, "no sequences", ha="center", va="center", transform=axes.transAxes)
        return figure
    longest = int(lengths.max())
    bins = np.unique(np.geomspace(1, max(longest, 2) + 1, 60).astype(int))
    axes.hist(lengths, bins=bins, color=OK_COLOR)
    axes.set_xscale("log")
    axes.set_xlabel("sequence length (residues)")
    axes.set_ylabel("sequences")
    longer = int((lengths > spec.max_residues).sum())
    treatment = "truncated" if spec.long_sequences == "truncate" else "embedded in windows"
    axes.axvline(spec.max_residues, color=FAILED_COLOR, linestyle="--", linewidth=1)
    axes.text(
        spec.max_residues,
        0.97,
        f" {spec.max_residues}: longer ones {treatment} ({longer:,})",
        color=FAILED_COLOR,
        fontsize=8,
        va="top",
        transform=axes.get_xaxis_transform(),
    )
    axes.set_title(
        f"{len(lengths):,} sequences, {int(lengths.sum()):,} residues; "
        f"median {int(np.median(lengths)):,}, longest {longest:,}",
        fontsize=10,
    )
    return figure


def rank_throughput(outcomes: list[RankOutcome]) -> Figure:
    """Residues/s (top) and wall time (bottom) per rank; a failed rank gets a red band
    labelled 'failed' in both panels and its error under the plot."""
    figure = Figure(figsize=(7, 5.5), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    speed, wall = figure.subplots(2, 1, sharex=True)
    ranks = [outcome.rank for outcome in outcomes]
    for axes, field, label in (
        (speed, "residues_per_second", "residues/s"),
        (wall, "seconds", "wall time (s)"),
    ):
        values = [getattr(outcome, field) or 0 for outcome in outcomes]
        axes.bar(ranks, values, color=[OK_COLOR if o.ok else FAILED_COLOR for o in outcomes])
        axes.set_ylabel(label)
        axes.set_ylim(0, max(values + [1]) * 1.15)
        for outcome in outcomes:
            if not outcome.ok:
                axes.axvspan(outcome.rank - 0.4, outcome.rank + 0.4, color=FAILED_COLOR, alpha=0.2)
                axes.text(
                    outcome.rank,
                    0.5,
                    "failed",
                    rotation=90,
                    ha="center",
                    va="center",
                    color=FAILED_COLOR,
                    fontweight="bold",
                    transform=axes.get_xaxis_transform(),
                )
            elif len(outcomes) <= _LABEL_EVERY_BAR_UP_TO:
                value = getattr(outcome, field)
                axes.text(outcome.rank, value, _number(value), ha="center", va="bottom", fontsize=7)
    wall.set_xlabel("rank")
    wall.set_xticks(ranks)
    if len(outcomes) <= _LABEL_EVERY_BAR_UP_TO:
        several_hosts = len({outcome.host for outcome in outcomes if outcome.host}) > 1
        wall.set_xticklabels(
            [f"{o.rank}\n{o.device}" + (f"\n{o.host}" if several_hosts and o.host else "") for o in outcomes],
            fontsize=7,
        )
    failed = [outcome for outcome in outcomes if not outcome.ok]
    speed.set_title(
        f"{len(outcomes)} ranks: {len(outcomes) - len(failed)} succeeded, {len(failed)} failed", fontsize=10
    )
    if failed:
        lines = [_shorten(f"rank {o.rank} failed: {o.error}", 110) for o in failed[:_MAX_ERRORS_SHOWN]]
        if len(failed) > _MAX_ERRORS_SHOWN:
            lines.append(f"... and {len(failed) - _MAX_ERRORS_SHOWN} more (see results/manifest.json)")
        figure.text(0.01, 0.0, "\n".join(lines), fontsize=7, color=FAILED_COLOR, va="top", ha="left")
    return figure


def sequences_embedded(outcomes: list[RankOutcome], manifest: dict) -> Figure:
    """Per rank, sequences embedded (blue) and missing (red, the ranks that failed)."""
    figure, axes = _figure(7, 4)
    ranks = [outcome.rank for outcome in outcomes]
    embedded = [outcome.embedded for outcome in outcomes]
    missing = [outcome.missing for outcome in outcomes]
    axes.bar(ranks, embedded, color=OK_COLOR, label="embedded")
    axes.bar(ranks, missing, bottom=embedded, color=MISSING_COLOR, label="missing")
    axes.set_xlabel("rank")
    axes.set_ylabel("sequences")
    axes.set_xticks(ranks if len(ranks) <= _LABEL_EVERY_BAR_UP_TO else ranks[:: max(1, len(ranks) // 16)])
    axes.legend(loc="upper right", fontsize=8)
    axes.set_ylim(0, max([e + m for e, m in zip(embedded, missing)] + [1]) * 1.2)
    total, done, lost = manifest.get("sequences", 0), manifest.get("embedded", 0), manifest.get("missing", 0)
    status = "complete" if manifest.get("complete") else f"{lost:,} missing (IDs in results/missing_ids.txt)"
    axes.set_title(f"{done:,} of {total:,} sequences embedded; {status}", fontsize=10)
    return figure


@dataclass
class VectorCheck:
    """What the report sees in one pooled output, over a sample of distinct sequences."""

    name: str  # dataset, e.g. mean/layer_33
    sampled: int
    non_finite: int  # sampled sequences with a NaN or infinite value
    near_identical: float  # share of sampled sequences whose vector has a twin (cosine > NEAR_IDENTICAL)
    norm_spread: float  # standard deviation over mean of the vectors' norms

    def problems(self) -> list[str]:
        """Why the vectors look broken (a wrong or damaged checkpoint), in words; none when they do not."""
        found = []
        if self.non_finite:
            found.append(f"{self.non_finite} of {self.sampled} sampled sequences have non-finite values")
        if self.sampled > 1 and self.near_identical > NEAR_IDENTICAL_SHARE:
            found.append(
                f"{100 * self.near_identical:.0f}% of {self.sampled} sampled distinct sequences have a "
                f"near-identical vector (cosine > {NEAR_IDENTICAL})"
            )
        if self.sampled > 1 and self.norm_spread < COLLAPSED_NORM_SPREAD:
            found.append(f"the vectors' norms have collapsed to one value (spread {self.norm_spread:.1e})")
        return found


# A distinct sequence whose vector has a twin this close, in more than this share of the sample,
# means the model barely looks at its input; so does a spread of norms this small.
NEAR_IDENTICAL, NEAR_IDENTICAL_SHARE, COLLAPSED_NORM_SPREAD = 0.9999, 0.5, 1e-3
_VECTOR_SAMPLE = 2000  # distinct sequences the checks and the figure read


def sampled_vectors(embeddings_path, index_path, seed: int = 0):
    """(rows of ``embeddings.h5`` of up to _VECTOR_SAMPLE distinct sequences, increasing; their
    lengths; the pooled dataset names). Identical sequences count once: their vectors are one
    computation, so twins among them say nothing."""
    with h5py.File(index_path, "r") as index:
        index_ids, lengths = index["id"].asstr()[:], index["length"][:]
        digests = np.ascontiguousarray(index["digest"][:]).view(f"V{index['digest'].shape[1]}").ravel()
    with h5py.File(embeddings_path, "r") as h5:
        present = np.isin(index_ids, h5["ids"].asstr()[:])  # its rows are the index's less the missing
        names = [f"{group}/{name}" for group in ("mean", "bos") if group in h5 for name in h5[group]]
    _, first = np.unique(digests, return_index=True)
    chosen = np.sort(first[present[first]])
    if len(chosen) > _VECTOR_SAMPLE:
        chosen = np.sort(np.random.default_rng(seed).choice(chosen, _VECTOR_SAMPLE, replace=False))
    return (np.cumsum(present) - 1)[chosen], lengths[chosen], names


def check_vectors(vectors: np.ndarray, name: str) -> VectorCheck:
    """VectorCheck of ``vectors`` [n, dim], one per distinct sequence."""
    vectors = np.asarray(vectors, np.float64)
    finite = np.isfinite(vectors).all(axis=1)
    good = vectors[finite]
    norms = np.linalg.norm(good, axis=1)
    unit = good / np.maximum(norms, 1e-30)[:, None]
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, -1.0)
    twins = (cosine > NEAR_IDENTICAL).any(axis=1) if len(good) > 1 else np.zeros(len(good), bool)
    return VectorCheck(
        name,
        len(vectors),
        int((~finite).sum()),
        float(twins.mean()) if len(good) else 0.0,
        float(norms.std() / norms.mean()) if len(good) and norms.mean() > 0 else 0.0,
    )


def vector_figure(embeddings_path, index_path) -> tuple[Figure, list[VectorCheck]]:
    """For the last pooled output: a PCA of the sampled vectors coloured by sequence length, and a
    histogram of their norms; every pooled output checked (VectorCheck), problems in red."""
    rows, lengths, names = sampled_vectors(embeddings_path, index_path)
    with h5py.File(embeddings_path, "r") as h5:
        vectors = {name: h5[name][rows].astype(np.float64) if len(rows) else np.empty((0, 1)) for name in names}
    checks = [check_vectors(values, name) for name, values in vectors.items()]
    figure = Figure(figsize=(9, 4.2), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    pca, norms = figure.subplots(1, 2, width_ratios=[1.2, 1])
    shown = names[-1] if names else None
    kept = np.isfinite(vectors[shown]).all(axis=1) if shown else np.zeros(0, bool)
    values = vectors[shown][kept] if shown else np.empty((0, 1))
    if len(values) > 2:
        centred = values - values.mean(axis=0)
        _, singular, axes_ = np.linalg.svd(centred, full_matrices=False)
        points = centred @ axes_[:2].T
        scatter = pca.scatter(points[:, 0], points[:, 1], c=np.log10(lengths[kept]), s=6, cmap="viridis")
        figure.colorbar(scatter, ax=pca, label="log10 sequence length")
        share = singular[:2] ** 2 / max((singular**2).sum(), 1e-30)
        pca.set_xlabel(f"PC 1 ({100 * share[0]:.0f}%)")
        pca.set_ylabel(f"PC 2 ({100 * share[1]:.0f}%)")
        norms.hist(np.linalg.norm(values, axis=1), bins=40, color=OK_COLOR)
    pca.set_title(f"{shown}: {len(rows):,} distinct sequences (sample)", fontsize=9)
    norms.set_xlabel("vector norm")
    norms.set_ylabel("sequences")
    problems = [f"{check.name}: {problem}" for check in checks for problem in check.problems()]
    norms.set_title("looks broken" if problems else "no sign of a broken checkpoint", fontsize=9)
    if problems:
        figure.text(0.01, 0.0, "\n".join(problems[:4]), fontsize=7, color=FAILED_COLOR, va="top", ha="left")
    return figure, checks


def config_table(config: dict, world_size: int, random_weights: bool = False) -> str:
    """A small HTML page with every configuration value the run used (defaults included), under a
    warning when the model's weights are random."""
    rows = []
    for key in sorted(config):
        value = config[key]
        shown = json.dumps(value) if not isinstance(value, str) else value
        if key == "world_size" and value is None:
            shown = f"null (one rank per visible GPU: {world_size})"
        rows.append(f"<tr><th>{html.escape(key)}</th><td>{html.escape(shown)}</td></tr>")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>esmshard configuration</title>"
        "<style>body{font-family:sans-serif;margin:1.5em;background:#fff;color:#111}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:4px 10px;text-align:left;"
        "vertical-align:top}th{background:#f2f2f2;font-family:monospace}td{font-family:monospace;"
        "white-space:pre-wrap}</style></head><body>\n"
        + (
            f"<p id='random-weights' style='background:#c00;color:#fff;padding:8px;font-weight:bold'>"
            f"{html.escape(RANDOM_WEIGHTS_WARNING % config['model'])}</p>\n"
            if random_weights
            else ""
        )
        + f"<h2>Configuration used</h2>\n<table id='config'>\n{chr(10).join(rows)}\n</table>\n</body></html>\n"
    )


def write_report_files(
    index_path, status_paths, manifest_path, embeddings_path, config: dict, out: dict
) -> tuple[list[RankOutcome], list[VectorCheck]]:
    """Write every file of the report: ``out`` maps 'lengths', 'ranks', 'embedded', 'vectors' and
    'config' to their paths. Returns the rank outcomes and the vector checks (for the log)."""
    manifest = json.loads(Path(manifest_path).read_text())
    outcomes = rank_outcomes([read_status(path) for path in status_paths], manifest)
    with h5py.File(embeddings_path, "r") as h5:
        spec = OutputSpec.from_attrs(h5.attrs)
    save_png(length_histogram(read_lengths(index_path), spec), out["lengths"])
    save_png(rank_throughput(outcomes), out["ranks"])
    save_png(sequences_embedded(outcomes, manifest), out["embedded"])
    figure, checks = vector_figure(embeddings_path, index_path)
    save_png(figure, out["vectors"])
    with atomic_output(out["config"]) as tmp:
        Path(tmp).write_text(
            config_table(config, manifest.get("world_size", len(outcomes)), manifest.get("random_weights", False))
        )
    return outcomes, checks


def save_png(figure: Figure, path) -> None:
    with atomic_output(path) as tmp:
        # "tight" grows the image to hold the text placed under the axes (the failed ranks'
        # errors, the figure's only own text); it lays the figure out twice (~20% slower), so
        # a figure without such text keeps the constrained layout's fixed size
        tight = {"bbox_inches": "tight", "pad_inches": 0.1} if figure.texts else {}
        figure.savefig(tmp, format="png", **tight)


def _figure(width: float, height: float):
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas: PNG output without any display or pyplot
    return figure, figure.subplots()


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _shorten(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
