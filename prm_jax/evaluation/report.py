"""Evaluation outputs: results.json, results.md, predictions.jsonl and PNG plots.

* `results.json` is strict JSON: undefined values (`nan`, e.g. the accuracy of an empty class)
  are written as `null` and `allow_nan=False` guarantees no `NaN` token slips through, so any
  JSON parser (jq, JavaScript, pandas) reads it. Accuracies are fractions in [0, 1].
* `results.md` shows percentages with one decimal, as the paper's tables do; `-` marks an
  undefined value.
* `predictions.jsonl` has one line per record (rewards, verdicts, selections) so a run can be
  inspected and re-scored without the model.
* Plots use matplotlib's Agg backend (no display needed on cluster nodes).

Every file is written to a temporary name and renamed, so a killed run never leaves a half-written
file that looks complete.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from prm_jax.files import atomic_file, atomic_write, atomic_write_lines

__all__ = [
    "json_safe",
    "write_json",
    "write_jsonl",
    "percent",
    "processbench_markdown",
    "bon_markdown",
    "plot_processbench",
    "plot_bon",
]


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON `null`), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_safe(value.item())
    return value


def write_json(path: str | Path, data: Any) -> None:
    text = json.dumps(json_safe(data), indent=2, allow_nan=False, ensure_ascii=False)
    atomic_write(path, text + "\n")


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    atomic_write_lines(path, (json.dumps(json_safe(row), allow_nan=False, ensure_ascii=False) for row in rows))


def percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal, rounded half up (`2/3 -> "66.7"`,
    `0.7345 -> "73.5"`); `-` when undefined."""
    if value is None or not math.isfinite(value):
        return "-"
    # Half-up on the decimal value (0.7345 -> 73.5), not on its binary approximation (73.4499...).
    scaled = Decimal(repr(round(100 * value, 9)))
    return str(scaled.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- ProcessBench


def processbench_markdown(results: Mapping[str, Any]) -> str:
    """The ProcessBench tables: per-subset error/correct accuracy and F1, sweep, analyses."""
    parts = [f"# ProcessBench ({results['mode']})", ""]
    if results.get("threshold") is not None:
        parts.append(f"Threshold: {results['threshold']:g} (first step with reward below it is the predicted error).\n")

    def scores_table(block: Mapping[str, Any]) -> str:
        names = list(block["subsets"])
        header = ["metric", *names, "average"]
        rows = [
            ["error acc", *(percent(block["subsets"][n]["acc_err"]) for n in names), ""],
            ["correct acc", *(percent(block["subsets"][n]["acc_ok"]) for n in names), ""],
            ["F1", *(percent(block["subsets"][n]["f1"]) for n in names), percent(block["average_f1"])],
            [
                "n (error / correct)",
                *(f"{block['subsets'][n]['n_err']} / {block['subsets'][n]['n_ok']}" for n in names),
                "",
            ],
        ]
        if any(block["subsets"][n].get("n_unparseable") for n in names):
            rows.append(["unparseable", *(str(block["subsets"][n]["n_unparseable"]) for n in names), ""])
        return _table(header, rows)

    parts += [scores_table(results), ""]
    parts += _not_scored_lines(results)
    sweep = results.get("threshold_sweep")
    if sweep:
        parts += [f"## Threshold tuned on {sweep['tuned_on']}: {sweep['threshold']:.4g}", "", scores_table(sweep), ""]
    analyses = results.get("analyses") or {}
    if analyses:
        parts += ["## Analyses", ""]
        parts += _analyses_lines(analyses)
    parts.append(
        "Accuracies in %; F1 = 2·acc_err·acc_ok/(acc_err+acc_ok), 0 when a class is empty; average = unweighted mean of subset F1s."
    )
    return "\n".join(parts) + "\n"


def _not_scored_lines(results: Mapping[str, Any]) -> list[str]:
    """A note on the records left out for the scoring cap (`over_length.over_cap_records`)."""
    over = results.get("over_length") or {}
    left_out = over.get("over_cap_records") or []
    if not left_out:
        return []
    shown = ", ".join(left_out[:10]) + (f", ... ({len(left_out) - 10} more)" if len(left_out) > 10 else "")
    return [
        f"Not scored: {len(left_out)} record(s) with an input longer than max_score_tokens="
        f"{over['max_score_tokens']} ({shown}); they are in no metric above.\n"
    ]


def _analyses_lines(analyses: Mapping[str, Any]) -> list[str]:
    lines = []
    minimum = analyses.get("min_position")
    if minimum:
        lines.append(
            f"- Minimum step reward on the final step: {percent(minimum['final_step_share'])}% of "
            f"{minimum['n_responses']} multi-step responses ({minimum['n_single_step']} single-step excluded)."
        )
    flawed = analyses.get("flawed_process")
    if flawed:
        lines.append(
            f"- Correct answer, flawed process ({flawed['n']} solutions; mean over subsets): flagged "
            f"{percent(flawed['flagged'])}%, exact first error {percent(flawed['exact'])}% "
            f"(pooled over solutions: {percent(flawed['pooled_exact'])}%)."
        )
        if flawed.get("subsets"):
            lines.append(
                "  " + ", ".join(f"{name} {percent(d['exact'])}% of {d['n']}" for name, d in flawed["subsets"].items())
            )
    cal = analyses.get("calibration")
    if cal:
        ece = "-" if cal["ece"] is None or not math.isfinite(cal["ece"]) else f"{cal['ece']:.4f}"
        lines.append(f"- Calibration over {cal['n_steps']} labelled steps: ECE {ece}.")
    return lines + [""]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")


def _plot_min_position(plt: Any, minimum: Mapping[str, Any], path: Path, title: str) -> None:
    edges, counts = minimum["histogram_edges"], minimum["histogram_counts"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge", edgecolor="black")
    ax.set_xlabel("relative position of the minimum step reward (0 = first step, 1 = final step)")
    ax.set_ylabel("responses")
    ax.set_title(f"{title}: min on final step {percent(minimum['final_step_share'])}%")
    _save(fig, path)
    plt.close(fig)


def _plot_calibration(plt: Any, cal: Mapping[str, Any], path: Path) -> None:
    edges = cal["bin_edges"]
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    xs = [c for c, a in zip(centers, cal["bin_accuracy"]) if a is not None]
    ys = [a for a in cal["bin_accuracy"] if a is not None]
    ax.bar(xs, ys, width=edges[1] - edges[0], alpha=0.7, edgecolor="black", label="step accuracy")
    ax.set_xlabel("step reward")
    ax.set_ylabel("fraction of steps correct")
    ece = cal["ece"]
    ax.set_title("reliability" + ("" if ece is None or not math.isfinite(ece) else f" (ECE {ece:.3f})"))
    ax.legend(loc="upper left")
    _save(fig, path)
    plt.close(fig)


def plot_processbench(
    results: Mapping[str, Any], out_dir: str | Path, curves: Mapping[str, Any] | None = None
) -> list[Path]:
    """F1 by subset (with both accuracies), the threshold curve, min position and calibration."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    written = []
    names = list(results["subsets"])
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 3.8))
    width = 0.27
    for k, (key, label) in enumerate((("acc_err", "error acc"), ("acc_ok", "correct acc"), ("f1", "F1"))):
        values = [results["subsets"][n][key] for n in names]
        values = [0.0 if v is None or not math.isfinite(v) else 100 * v for v in values]
        ax.bar([i + (k - 1) * width for i in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(f"ProcessBench ({results['mode']}): average F1 {percent(results['average_f1'])}")
    ax.legend(loc="upper right", fontsize="small")
    written.append(out_dir / "f1_by_subset.png")
    _save(fig, written[-1])
    plt.close(fig)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for name, f1 in curves["f1"].items():
            ax.plot(curves["thresholds"], [100 * v for v in f1], label=name)
        if results.get("threshold") is not None:
            ax.axvline(results["threshold"], color="gray", linestyle="--", linewidth=1)
        sweep = results.get("threshold_sweep")
        if sweep:
            ax.axvline(sweep["threshold"], color="black", linestyle=":", linewidth=1)
        ax.set_xlabel("threshold")
        ax.set_ylim(0, 100)
        ax.set_ylabel("F1 (%)")
        ax.set_title("F1 against the step-reward threshold")
        ax.legend(fontsize="small")
        written.append(out_dir / "f1_by_threshold.png")
        _save(fig, written[-1])
        plt.close(fig)
    analyses = results.get("analyses") or {}
    if analyses.get("min_position", {}).get("n_responses"):
        written.append(out_dir / "min_position.png")
        _plot_min_position(plt, analyses["min_position"], written[-1], "ProcessBench")
    if analyses.get("calibration", {}).get("n_steps"):
        written.append(out_dir / "calibration.png")
        _plot_calibration(plt, analyses["calibration"], written[-1])
    return written


# ---------------------------------------------------------------------------- Best-of-N


def bon_markdown(results: Mapping[str, Any]) -> str:
    aggregations = list(results["aggregations"])
    names = list(results["datasets"])
    header = ["method", *names, "average"]
    blocks = [*(results["datasets"][n] for n in names), results["average"]]
    n = results["average"]["n"]
    at = "N" if n is None else str(n)
    rows = [[f"maj@{at}", *(percent(b["maj_at_n"]) for b in blocks)]]
    rows += [[f"prm@{at} ({how})", *(percent(b["prm_at_n"][how]) for b in blocks)] for how in aggregations]
    rows.append([f"pass@{at}", *(percent(b["pass_at_n"]) for b in blocks)])
    rows.append(["problems", *(str(b["n_problems"]) for b in blocks)])
    parts = ["# Best-of-N", "", _table(header, rows), ""]
    by_k = results.get("by_k")
    if by_k:
        ks = list(by_k)
        k_rows = [["maj", *(percent(by_k[k]["maj_at_n"]) for k in ks)]]
        k_rows += [[f"prm ({how})", *(percent(by_k[k]["prm_at_n"][how]) for k in ks)] for how in aggregations]
        k_rows.append(["pass", *(percent(by_k[k]["pass_at_n"]) for k in ks)])
        parts += [
            "## Average over datasets by k (first k responses)",
            "",
            _table(["method", *(f"@{k}" for k in ks)], k_rows),
            "",
        ]
    not_measured = results.get("by_k_not_measured")
    if not_measured:
        reasons = sorted(set(not_measured.values()), key=list(not_measured.values()).index)
        parts.append(f"k = {', '.join(not_measured)}: not measured ({'; '.join(reasons)}).\n")
    parts += _not_scored_lines(results)
    if results["average"].get("n_inconsistent_votes"):
        parts.append(
            f"Note: {results['average']['n_inconsistent_votes']} problems had responses with the same answer but "
            "different `correct` flags; maj uses the first such response's flag.\n"
        )
    analyses = results.get("analyses") or {}
    if analyses:
        parts += ["## Analyses", ""] + _analyses_lines(analyses)
    parts.append("Accuracies in %; average = unweighted mean over datasets; ties go to the lowest response index.")
    return "\n".join(parts) + "\n"


def plot_bon(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Accuracy by aggregation (with maj/pass as reference lines), by k, and min position."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    written = []
    average = results["average"]
    aggregations = list(results["aggregations"])
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.bar(aggregations, [100 * average["prm_at_n"][a] for a in aggregations], color="tab:blue", label="prm@N")
    ax.axhline(100 * average["maj_at_n"], color="tab:orange", linestyle="--", label="maj@N")
    ax.axhline(100 * average["pass_at_n"], color="tab:green", linestyle=":", label="pass@N")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Best-of-{average['n'] or 'N'} by aggregation (average over {len(results['datasets'])} datasets)")
    ax.legend(loc="lower right", fontsize="small")
    written.append(out_dir / "bon_by_aggregation.png")
    _save(fig, written[-1])
    plt.close(fig)
    by_k = results.get("by_k")
    if by_k and len(by_k) > 1:
        ks = [int(k) for k in by_k]
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for how in aggregations:
            ax.plot(ks, [100 * by_k[str(k)]["prm_at_n"][how] for k in ks], marker="o", label=f"prm ({how})")
        ax.plot(ks, [100 * by_k[str(k)]["maj_at_n"] for k in ks], marker="s", linestyle="--", label="maj")
        ax.plot(ks, [100 * by_k[str(k)]["pass_at_n"] for k in ks], marker="^", linestyle=":", label="pass")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k (responses per problem)")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize="small")
        written.append(out_dir / "bon_by_k.png")
        _save(fig, written[-1])
        plt.close(fig)
    minimum = (results.get("analyses") or {}).get("min_position")
    if minimum and minimum.get("n_responses"):
        written.append(out_dir / "min_position.png")
        _plot_min_position(plt, minimum, written[-1], "Best-of-N responses")
    return written
