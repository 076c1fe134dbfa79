"""Summaries and plots of the metrics table: the three groups the paper reports, per dataset, per class.

Groups: ``seen`` (test episodes of training datasets), ``heldout`` (datasets never trained on) and
``novel`` (the held-out classes whose concept no training dataset has). A novel class is also counted in
``heldout``; the groups are views, not a partition.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from iris_pipelines.inference.strategies import SELF_CHECK_DICE

from .evaluate import BASELINES, GROUPS

METRICS = ("dice", "iou", "nsd", "hd95_mm")
MIN_INTERVAL_SUBJECTS = 5  # fewest query subjects a gain's bootstrap interval is reported for
# Up to 6 subjects every one of the n**n ordered resamples is taken, so the bound has no seed: 6**6 = 46 656
# is little more work than the ~10 000-26 000 draws 5-6 subjects would otherwise need; 7**7 = 823 543 is.
EXACT_SUBJECTS = 6
# Fewest Monte Carlo draws expected beyond each bound: with 2 (2000 draws, 5 subjects) the bound was one
# or two extreme draws and the verdict changed with the seed.
BEYOND_BOUND = 25
COUNTS = ("n", "hd95_n", "episode_failures", "method_errors")  # logged to MLflow beside the means
MAX_FAILURE_LINES = 50  # the report lists this many; the metrics table has all


def group_rows(metrics: pd.DataFrame, group: str) -> pd.DataFrame:
    """The rows of one reporting group."""
    if group == "seen":
        return metrics[~metrics["heldout"].astype(bool)]
    if group == "heldout":
        return metrics[metrics["heldout"].astype(bool)]
    if group == "novel":
        return metrics[metrics["novel"].astype(bool)]
    raise ValueError(f"unknown group {group!r}; groups are {GROUPS}")


def _method_order(metrics: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(metrics["method"]))
    return [m for m in present if m not in BASELINES] + [m for m in BASELINES if m in present]


def _aggregate(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    # A row with an error and a Dice is a method that failed (or cannot segment the class), scored as the
    # empty prediction a user would get, so it is in n and the means; one without a Dice is an episode that
    # could not be scored at all, and is in neither.
    failed, scored = rows["error"].astype(str) != "", rows["dice"].notna()
    rows = rows.assign(_episode_failure=failed & ~scored, _method_error=failed & scored)
    table = rows.groupby(keys, sort=False).agg(
        n=("dice", "count"),
        dice=("dice", "mean"),
        dice_std=("dice", "std"),
        iou=("iou", "mean"),
        nsd=("nsd", "mean"),
        hd95_mm=("hd95_mm", "mean"),  # NaN (an empty side) is skipped; hd95_n says how many counted
        hd95_n=("hd95_mm", "count"),
        episode_failures=("_episode_failure", "sum"),
        method_errors=("_method_error", "sum"),
    )
    return table.reset_index()


def summary_by_group(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean metrics per group × method (mean over episode × class rows)."""
    frames = []
    for group in GROUPS:
        rows = group_rows(metrics, group)
        if not rows.empty:
            frames.append(_aggregate(rows, ["method"]).assign(group=group))
    if not frames:
        return pd.DataFrame(columns=["group", "method", "n", *METRICS])
    table = pd.concat(frames, ignore_index=True)
    order = {m: i for i, m in enumerate(_method_order(metrics))}
    table = table.sort_values(["group", "method"], key=lambda c: c.map(order) if c.name == "method" else
                              c.map({g: i for i, g in enumerate(GROUPS)}))  # fmt: skip
    return table[
        ["group", "method", *[c for c in table.columns if c not in ("group", "method")]]
    ].reset_index(drop=True)


def summary_by_dataset(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean metrics per dataset × method."""
    if metrics.empty:
        return pd.DataFrame(columns=["dataset", "method", "n", *METRICS])
    return (
        _aggregate(metrics, ["dataset", "method"]).sort_values(["dataset", "method"]).reset_index(drop=True)
    )


def expanded_tail(subjects: int, alpha: float = 0.05) -> float:
    """The lower quantile level of the expanded percentile interval (Hesterberg 2015, "What teachers
    should know about the bootstrap", The American Statistician 69(4)) over ``subjects`` resampled units.

    The plain percentile interval (levels alpha/2 and 1 − alpha/2) acts like a z-interval with the
    spread divided by n rather than n − 1, so it is too narrow for few units: in a null simulation of
    subjects with 3–8 correlated episodes each, its lower bound was above 0 in 8.7 % of tables of 5
    subjects and 5.8 % of 8, against 2.5 % nominal. Taking the quantiles at Φ(√(n/(n−1)) · t_{alpha/2,
    n−1}) gave 4.4 % and 3.0 %, and converges to alpha/2 as n grows.
    """
    if subjects < 2:
        raise ValueError(f"an interval needs at least 2 subjects, got {subjects}")
    factor = np.sqrt(subjects / (subjects - 1))
    return float(stats.norm.cdf(factor * stats.t.ppf(alpha / 2, subjects - 1)))


def subject_bootstrap_interval(
    sums: np.ndarray, counts: np.ndarray, rng: np.random.Generator, resamples: int = 2000
) -> tuple[float, float]:
    """95 % interval of the mean gain ``sum(sums) / sum(counts)``, resampling whole subjects (one entry
    of ``sums``/``counts`` each: the summed gain of a subject's pairs and their number).

    With a handful of subjects the bootstrap spans little more than their means: at 2 a zero true gain
    read as a clear win 21 % of the time (3: 11 %, nominal 2.5 %), so below MIN_INTERVAL_SUBJECTS there is
    no interval (NaN, NaN). Above, the quantiles are widened for the spread the few subjects only estimate
    (``expanded_tail``). Those tails are thin (0.1 % at 5 subjects), so up to EXACT_SUBJECTS subjects all
    resamples are enumerated (``rng`` is not used) and above, ``resamples`` is raised until BEYOND_BOUND
    draws are expected beyond each bound (from 15 subjects on, 2000 is enough and stays).
    """
    subjects = len(sums)
    if subjects < MIN_INTERVAL_SUBJECTS:
        return np.nan, np.nan
    tail = expanded_tail(subjects)
    if subjects <= EXACT_SUBJECTS:
        draws = np.indices((subjects,) * subjects).reshape(subjects, -1).T
    else:
        resamples = max(resamples, math.ceil(BEYOND_BOUND / tail))
        draws = rng.integers(0, subjects, size=(resamples, subjects))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def gain_over_baseline(
    metrics: pd.DataFrame, baseline: str = "paste", resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Paired Dice gain of every Iris strategy over ``baseline`` per group, with a 95 % bootstrap CI.

    A pair is one episode × class scored by both methods, so each strategy is compared on exactly the
    structures the baseline saw. The interval resamples whole query subjects, (dataset, ``subject_id``):
    an episode's classes share their query and references, and the episodes of one subject (its T1 and
    T2 scans, several queries of it) share its anatomy, so none of them are independent; resampling
    episodes read a zero true gain as a clear win in 38 % of simulated tables of 4 subjects × 3 scans. A
    lower bound above 0 is what "clearly beats the baseline" means in the README and the issue notes. The
    interval is the expanded percentile one (``expanded_tail``), calibrated for a few subjects.
    ``win_fraction`` counts pairs where the strategy's Dice is higher.
    """
    columns = ["group", "method", "baseline", "pairs", "episodes", "subjects", "dice_gain", "ci_low",
               "ci_high", "win_fraction"]  # fmt: skip
    if metrics.empty or baseline not in set(metrics["method"]):
        return pd.DataFrame(columns=columns)
    if "subject_id" not in metrics.columns:
        raise ValueError(
            "evaluation_metrics has no subject_id column (written before the interval resampled subjects); "
            "re-run evaluate"
        )
    rows = []
    for group_index, group in enumerate(GROUPS):
        scored = group_rows(metrics, group).dropna(subset=["dice"])
        # Paired by label value: two classes of one dataset may share a name.
        reference = scored[scored["method"] == baseline][["episode_id", "label", "dice"]]
        for method in [m for m in _method_order(scored) if m not in BASELINES]:
            pairs = scored[scored["method"] == method].merge(
                reference, on=["episode_id", "label"], suffixes=("", "_baseline")
            )
            if pairs.empty:
                continue
            gain = pairs["dice"] - pairs["dice_baseline"]
            # Subject ids are per dataset: two datasets' "subj01" are different people.
            per_subject = gain.groupby([pairs["dataset"], pairs["subject_id"]]).agg(["sum", "size"])
            sums, counts = per_subject["sum"].to_numpy(), per_subject["size"].to_numpy()
            # A generator per group and method: an interval does not depend on which others were drawn.
            rng = np.random.default_rng([seed, group_index, zlib.crc32(method.encode())])
            low, high = subject_bootstrap_interval(sums, counts, rng, resamples)
            rows.append(
                {
                    "group": group,
                    "method": method,
                    "baseline": baseline,
                    "pairs": len(pairs),
                    "episodes": pairs["episode_id"].nunique(),
                    "subjects": len(sums),
                    "dice_gain": float(gain.mean()),
                    "ci_low": low,
                    "ci_high": high,
                    "win_fraction": float((gain > 0).mean()),
                }
            )
    return pd.DataFrame(rows, columns=columns)


def reference_check_table(
    metrics: pd.DataFrame, method: str = "one_shot", baseline: str = "paste"
) -> pd.DataFrame:
    """How well the reference check predicts ``method``'s Dice on the query, per group.

    A class is flagged when its first reference, segmented with its own one-shot embedding, shows it with a
    Dice below :data:`SELF_CHECK_DICE` (``iris segment`` warns about it). Per group and flag: the episode
    × class pairs, their mean ``method`` and ``baseline`` Dice on the query, and how often ``method`` fell
    below the baseline.
    """
    columns = [
        "group",
        "flagged",
        "pairs",
        "reference_check_dice",
        method,
        baseline,
        f"{method}_below_{baseline}",
    ]
    if metrics.empty or "reference_check_dice" not in metrics.columns:
        return pd.DataFrame(columns=columns)
    rows = []
    for group in GROUPS:
        scored = group_rows(metrics, group).dropna(subset=["dice", "reference_check_dice"])
        ours = scored[scored["method"] == method]
        theirs = scored[scored["method"] == baseline][["episode_id", "label", "dice"]]
        pairs = ours.merge(theirs, on=["episode_id", "label"], suffixes=("", "_baseline"))
        for flagged in (True, False):
            chosen = pairs[(pairs["reference_check_dice"] < SELF_CHECK_DICE) == flagged]
            if chosen.empty:
                continue
            rows.append(
                {
                    "group": group,
                    "flagged": flagged,
                    "pairs": len(chosen),
                    "reference_check_dice": float(chosen["reference_check_dice"].mean()),
                    method: float(chosen["dice"].mean()),
                    baseline: float(chosen["dice_baseline"].mean()),
                    f"{method}_below_{baseline}": float((chosen["dice"] < chosen["dice_baseline"]).mean()),
                }
            )
    return pd.DataFrame(rows, columns=columns)


def failure_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """The rows with an ``error``, one line per episode × method × error with its classes: ``scored``
    when they count as an empty prediction (the method failed), not when the episode failed (no metrics)."""
    columns = ["episode_id", "method", "classes", "scored", "error"]
    failed = metrics[metrics["error"].astype(str) != ""] if not metrics.empty else metrics
    if failed.empty:
        return pd.DataFrame(columns=columns)
    lines = (
        failed.assign(scored=failed["dice"].notna())
        .groupby(["episode_id", "method", "error", "scored"], sort=False)["class_name"]
        .agg(lambda names: ", ".join(map(str, names)))
    )
    return lines.reset_index().rename(columns={"class_name": "classes"})[columns]


def _failure_lines(failures: pd.DataFrame) -> list[str]:
    if failures.empty:
        return ["(none)"]
    shown = failures.head(MAX_FAILURE_LINES)
    # An error may hold newlines or "|", which would break the Markdown table.
    shown = shown.assign(error=[" ".join(str(e).split()).replace("|", "\\|") for e in shown["error"]])
    lines = [shown.to_markdown(index=False)]
    if len(failures) > len(shown):
        lines += [
            "",
            f"… and {len(failures) - len(shown)} more; all are in evaluation_metrics' `error` column.",
        ]
    return lines


def dice_pivot(summary: pd.DataFrame, index: str) -> pd.DataFrame:
    """``index`` × method table of mean Dice, methods in report order (strategies, then baselines)."""
    pivot = summary.pivot(index=index, columns="method", values="dice")
    ordered = [m for m in (*[c for c in pivot.columns if c not in BASELINES], *BASELINES) if m in pivot]
    return pivot[ordered]


def markdown_report(
    by_group: pd.DataFrame,
    by_dataset: pd.DataFrame,
    gains: pd.DataFrame,
    model: Mapping[str, str],
    reference_check: pd.DataFrame | None = None,
    failures: pd.DataFrame | None = None,
) -> str:
    """The evaluation as Markdown: Dice per group, the paired gain over paste, the reference check, per
    dataset, all metrics and, when ``failures`` (:func:`failure_table`) is given, what failed."""
    check = reference_check if reference_check is not None else pd.DataFrame()
    lines = [
        "# Iris evaluation",
        "",
        f"Model: `{model.get('model_uri') or 'unregistered'}` "
        f"(weights sha256 `{str(model.get('weights_sha256', ''))[:12]}`).",
        "",
        "Mean Dice per group (rows: seen = test episodes of training datasets; heldout = datasets never",
        "trained on; novel = held-out classes with no counterpart in training). Metrics are computed on",
        "each scan's original grid; HD95 and NSD in mm. HD95 is the mean over the rows where prediction and",
        "truth are both non-empty (`hd95_n` of them): a method that predicts nothing has no HD95, so read it",
        "with `hd95_n` and Dice. `n` counts the scored episode × class rows. `method_errors` of them are",
        "rows where the method failed (e.g. registration did not converge) or cannot segment the class:",
        "they are scored as an empty prediction (Dice 0), as a user would get it, so they are in `n` and the",
        "means. `episode_failures` counts the rows of episodes that could not be scored at all: they have no",
        "metrics and are not in `n`. Both are listed under Failures.",
        "",
        dice_pivot(by_group, "group").round(3).to_markdown() if not by_group.empty else "(no rows)",
        "",
        "## Gain over pasting the reference mask",
        "",
        "Mean paired Dice difference (strategy − paste) on the same episode × class, with a 95 % bootstrap",
        "interval over query subjects (a subject's episodes are correlated; expanded percentile interval,",
        "widened for few subjects; none below "
        f"{MIN_INTERVAL_SUBJECTS} subjects); a lower bound above 0 is a clear win.",
        "",
        gains.round(3).to_markdown(index=False) if not gains.empty else "(no paste baseline)",
        "",
        "## Reference check",
        "",
        "Each episode's first reference segmented with its own one-shot embedding: a class it shows with a",
        f"Dice below {SELF_CHECK_DICE:g} is flagged (`iris segment` warns about such a class). Mean one-shot",
        "and paste Dice on the query for flagged and unflagged classes, and how often one-shot fell below",
        "paste.",
        "",
        check.round(3).to_markdown(index=False) if not check.empty else "(no one-shot and paste rows)",
        "",
        "## Mean Dice per dataset",
        "",
        dice_pivot(by_dataset, "dataset").round(3).to_markdown() if not by_dataset.empty else "(no rows)",
        "",
        "## All metrics per group",
        "",
        by_group.round(3).to_markdown(index=False) if not by_group.empty else "(no rows)",
        "",
    ]
    if failures is not None:
        lines += [
            "## Failures",
            "",
            f"Rows with an error, one line per episode × method × error (at most {MAX_FAILURE_LINES} lines).",
            "`scored`: counted as an empty prediction (in `method_errors` and `n`); otherwise the episode",
            "failed and has no metrics (in `episode_failures`).",
            "",
            *_failure_lines(failures),
            "",
        ]
    return "\n".join(lines)


def headline_metrics(by_group: pd.DataFrame, gains: pd.DataFrame) -> dict[str, float]:
    """``eval/<group>/<method>/<metric>`` → value, for MLflow (finite values only).

    ``hd95_n`` goes beside ``hd95_mm``: HD95 exists only where prediction and truth are both non-empty, so
    a method that finds nothing on most queries has the mean of its few hits, the best HD95 of all, and
    only the count tells. ``n``, ``episode_failures`` and ``method_errors`` say what the means are over
    (see :func:`markdown_report`). The gains add ``dice_gain_vs_<baseline>`` with its ``_ci_low`` and
    ``_ci_high`` per group × strategy.
    """
    out = {}
    for row in by_group.to_dict("records"):
        for metric in (*METRICS, *COUNTS):
            value = float(row[metric])
            if np.isfinite(value):
                out[f"eval/{row['group']}/{row['method']}/{metric}"] = value
    for row in gains.to_dict("records"):
        key = f"eval/{row['group']}/{row['method']}/dice_gain_vs_{row['baseline']}"
        values = {key: row["dice_gain"], f"{key}_ci_low": row["ci_low"], f"{key}_ci_high": row["ci_high"]}
        out.update({name: value for name, value in values.items() if np.isfinite(value)})
    return out


def dice_boxplot(metrics: pd.DataFrame) -> Figure:
    """Dice distribution per method, one panel per group: how consistent a strategy is, not only its mean."""
    methods = _method_order(metrics)
    figure = Figure(figsize=(5 * len(GROUPS), 4.5))  # pyplot-free: no backend, no global state
    axes = figure.subplots(1, len(GROUPS), sharey=True)
    for axis, group in zip(np.atleast_1d(axes), GROUPS, strict=True):
        rows = group_rows(metrics, group)
        data = [rows.loc[rows["method"] == m, "dice"].dropna().to_numpy() for m in methods]
        shown = [(m, d) for m, d in zip(methods, data, strict=True) if d.size]
        if shown:
            axis.boxplot([d for _, d in shown], tick_labels=[m for m, _ in shown], showmeans=True)
        pairs = len(rows.dropna(subset=["dice"])[["episode_id", "label"]].drop_duplicates())
        axis.set_title(f"{group} (n = {pairs} classes × episodes)")
        axis.tick_params(axis="x", rotation=45)
        axis.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("Dice")
    figure.suptitle("Dice per strategy and baseline")
    figure.tight_layout()
    return figure


def class_bars(metrics: pd.DataFrame) -> Figure:
    """Mean Dice per class (dataset/class) and method as grouped bars.

    A bar is one label value of one dataset, as the gain over paste pairs them: two labels that share a
    name (left and right "kidney" in some datasets) get a bar each, told apart by their label value.
    """
    methods = _method_order(metrics)
    table = (
        metrics.groupby(["dataset", "label", "method"])["dice"]
        .mean()
        .unstack("method")
        .reindex(columns=methods)
    )
    names = metrics.drop_duplicates(["dataset", "label"]).set_index(["dataset", "label"])["class_name"]
    shared = names.groupby(level="dataset").transform(lambda column: column.duplicated(keep=False))
    tick_labels = [
        f"{dataset}/{names[dataset, label]}" + (f" ({int(label)})" if shared[dataset, label] else "")
        for dataset, label in table.index
    ]
    figure = Figure(figsize=(max(8, 0.55 * len(table) * max(1, len(methods)) / 3), 5))
    axis = figure.subplots()
    width = 0.8 / max(1, len(methods))
    positions = np.arange(len(table))
    for i, method in enumerate(methods):
        # NaN (the method never ran on that dataset, or its episodes failed) draws no bar, not a 0
        axis.bar(positions + i * width, table[method].to_numpy(), width, label=method)
    axis.set_xticks(positions + 0.4 - width / 2, tick_labels, rotation=75, ha="right", fontsize=8)
    axis.set_ylabel("mean Dice")
    axis.set_ylim(0, 1)
    if methods:  # an evaluation with nothing scored has no bars to name
        axis.legend(ncols=min(4, len(methods)), fontsize=8)
    axis.set_title("Mean Dice per class")
    figure.tight_layout()
    return figure
