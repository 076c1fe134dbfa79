"""The paired comparison against paste that decides whether a strategy "clearly beats" the baseline."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from iris_pipelines.evaluation.report import (
    class_bars,
    dice_boxplot,
    expanded_tail,
    failure_table,
    gain_over_baseline,
    headline_metrics,
    markdown_report,
    reference_check_table,
    subject_bootstrap_interval,
    summary_by_dataset,
    summary_by_group,
)
from iris_pipelines.imaging.metrics import mask_metrics


def _rows(
    method: str,
    dice: np.ndarray,
    *,
    heldout: bool = False,
    episodes: int = 10,
    scans_per_subject: int = 1,
    dataset: str = "D",
) -> pd.DataFrame:
    """``dice`` laid out as episodes × 3 classes, as evaluate writes them; consecutive episodes are scans
    of one subject, ``scans_per_subject`` each."""
    episode = np.repeat([f"{dataset}/case_{i:03d}" for i in range(episodes)], 3)
    subject = np.repeat([f"subj{i // scans_per_subject:02d}" for i in range(episodes)], 3)
    return pd.DataFrame(
        {
            "episode_id": episode,
            "dataset": dataset,
            "subject_id": subject,
            "class_name": np.tile(["a", "b", "c"], episodes),
            "label": np.tile([1, 2, 3], episodes),
            "method": method,
            "heldout": heldout,
            "novel": heldout,
            "dice": dice,
            "iou": dice,
            "nsd": dice,
            "hd95_mm": 1.0,
            "error": "",
        }
    )


def test_a_uniform_gain_has_a_tight_interval_above_zero() -> None:
    paste = np.linspace(0.1, 0.6, 30)
    metrics = pd.concat([_rows("paste", paste), _rows("one_shot", paste + 0.2)], ignore_index=True)
    gains = gain_over_baseline(metrics)
    row = gains.set_index(["group", "method"]).loc[("seen", "one_shot")]
    assert row.dice_gain == pytest.approx(0.2)
    assert row.ci_low == pytest.approx(0.2) and row.ci_high == pytest.approx(0.2)
    assert (row.pairs, row.episodes, row.subjects, row.win_fraction) == (30, 10, 10, 1.0)
    assert set(gains.group) == {"seen"}  # no held-out rows, no held-out comparison


def test_noise_around_the_baseline_gives_an_interval_that_contains_zero() -> None:
    rng = np.random.default_rng(1)
    paste = rng.uniform(0.2, 0.8, 60)
    noisy = np.clip(paste + rng.normal(0.0, 0.3, 60), 0, 1)
    paired = [_rows(m, d, heldout=True, episodes=20) for m, d in (("paste", paste), ("one_shot", noisy))]
    metrics = pd.concat(paired, ignore_index=True)
    for row in gain_over_baseline(metrics).itertuples():
        assert row.ci_low < 0 < row.ci_high, row
        assert row.ci_low < row.dice_gain < row.ci_high


def test_only_pairs_scored_by_both_methods_count() -> None:
    """A class the strategy failed on (no row, or NaN Dice) must not be compared with paste's score."""
    paste = _rows("paste", np.full(30, 0.5))
    one_shot = _rows("one_shot", np.full(30, 0.7))
    one_shot.loc[0, "dice"] = np.nan
    one_shot = one_shot.drop(index=[1, 2])
    gains = gain_over_baseline(pd.concat([paste, one_shot], ignore_index=True))
    row = gains.iloc[0]
    assert (row.pairs, row.episodes, row.subjects) == (27, 9, 9) and row.dice_gain == pytest.approx(0.2)


def test_headline_metrics_carry_the_gain_and_its_interval() -> None:
    paste = np.linspace(0.1, 0.6, 30)
    metrics = pd.concat([_rows("paste", paste), _rows("one_shot", paste + 0.1)], ignore_index=True)
    headline = headline_metrics(summary_by_group(metrics), gain_over_baseline(metrics))
    assert headline["eval/seen/one_shot/dice_gain_vs_paste"] == pytest.approx(0.1)
    assert headline["eval/seen/one_shot/dice_gain_vs_paste_ci_low"] == pytest.approx(0.1)
    assert headline["eval/seen/one_shot/dice"] == pytest.approx(paste.mean() + 0.1)
    assert not any("paste/dice_gain" in key for key in headline)  # the baseline is not compared to itself


def test_no_paste_rows_means_no_comparison() -> None:
    metrics = _rows("one_shot", np.full(30, 0.5))
    assert gain_over_baseline(metrics).empty


@pytest.mark.parametrize("episodes", [1, 4])
def test_a_handful_of_subjects_has_no_interval(episodes: int) -> None:
    """Resampling one episode returns it every time, and a few give little more: a zero true gain read as
    a clear win in 21 % of 2-episode draws. No interval must read as a win there."""
    metrics = pd.concat(
        [
            _rows("paste", np.full(3 * episodes, 0.2), episodes=episodes),
            _rows("one_shot", np.full(3 * episodes, 0.5), episodes=episodes),
        ],
        ignore_index=True,
    )
    gains = gain_over_baseline(metrics)
    row = gains.iloc[0]
    assert row.subjects == episodes and row.dice_gain == pytest.approx(0.3)
    assert np.isnan(row.ci_low) and np.isnan(row.ci_high)
    headline = headline_metrics(summary_by_group(metrics), gains)
    assert headline["eval/seen/one_shot/dice_gain_vs_paste"] == pytest.approx(0.3)
    assert "eval/seen/one_shot/dice_gain_vs_paste_ci_low" not in headline  # MLflow gets finite values


def _gain_table(paste: np.ndarray, one_shot: np.ndarray, **layout) -> pd.DataFrame:
    return pd.concat(
        [_rows("paste", paste, **layout), _rows("one_shot", one_shot, **layout)], ignore_index=True
    )


def test_the_interval_resamples_subjects_not_their_correlated_episodes() -> None:
    """Scans of one subject share its anatomy: resampling them as independent episodes read a zero true
    gain as a clear win in 38 % of simulated tables. Three identical scans per subject must give exactly
    the interval of one scan per subject, not a narrower one."""
    rng = np.random.default_rng(2)
    paste = rng.uniform(0.2, 0.8, 3 * 8)
    one_shot = np.clip(paste + rng.normal(0.0, 0.2, 3 * 8), 0, 1)
    tripled = [np.repeat(d.reshape(8, 1, 3), 3, axis=1).ravel() for d in (paste, one_shot)]
    once = gain_over_baseline(_gain_table(paste, one_shot, episodes=8)).iloc[0]
    per_scan = gain_over_baseline(_gain_table(*tripled, episodes=24, scans_per_subject=3)).iloc[0]
    assert (per_scan.episodes, per_scan.subjects, once.subjects) == (24, 8, 8)
    assert (per_scan.ci_low, per_scan.ci_high) == pytest.approx((once.ci_low, once.ci_high))
    assert per_scan.dice_gain == pytest.approx(once.dice_gain)


def test_the_interval_needs_enough_subjects_not_episodes() -> None:
    many_scans = _gain_table(np.full(36, 0.2), np.full(36, 0.5), episodes=12, scans_per_subject=3)
    row = gain_over_baseline(many_scans).iloc[0]
    assert (row.episodes, row.subjects) == (12, 4) and np.isnan(row.ci_low)


def test_subject_ids_are_told_apart_by_dataset() -> None:
    """Two datasets' "subj00" are two people: six subjects, enough for an interval."""
    rng = np.random.default_rng(4)
    tables = [
        _gain_table(paste, paste + 0.1, episodes=3, dataset=dataset)
        for dataset, paste in (("A", rng.uniform(0.2, 0.6, 9)), ("B", rng.uniform(0.2, 0.6, 9)))
    ]
    row = gain_over_baseline(pd.concat(tables, ignore_index=True)).iloc[0]
    assert (row.episodes, row.subjects) == (6, 6) and row.ci_low == pytest.approx(0.1)


def test_a_table_without_subjects_is_refused() -> None:
    metrics = _gain_table(np.full(30, 0.2), np.full(30, 0.5)).drop(columns="subject_id")
    with pytest.raises(ValueError, match="no subject_id column.*re-run evaluate"):
        gain_over_baseline(metrics)


def _two_kidneys() -> pd.DataFrame:
    """Paste and one-shot at 0.5 everywhere, except one-shot's 0.8 on label 3; labels 2 and 3 are both
    named "kidney"."""
    paste, one_shot = _rows("paste", np.full(30, 0.5)), _rows("one_shot", np.full(30, 0.5))
    for table in (paste, one_shot):
        table["class_name"] = table["class_name"].replace({"b": "kidney", "c": "kidney"})
    one_shot.loc[one_shot["label"] == 3, "dice"] = 0.8
    return pd.concat([paste, one_shot], ignore_index=True)


def test_classes_sharing_a_name_are_paired_by_label_value() -> None:
    """Two labels named "kidney": each is compared with paste's score of itself, not of the other."""
    row = gain_over_baseline(_two_kidneys()).iloc[0]
    assert (
        row.pairs == 30 and row.dice_gain == pytest.approx(0.1) and row.win_fraction == pytest.approx(1 / 3)
    )


def test_an_interval_does_not_depend_on_the_other_methods_compared() -> None:
    rng = np.random.default_rng(3)
    paste = rng.uniform(0.2, 0.8, 60)
    one_shot = _rows("one_shot", np.clip(paste + rng.normal(0.1, 0.2, 60), 0, 1), heldout=True, episodes=20)
    alone = pd.concat([_rows("paste", paste, heldout=True, episodes=20), one_shot], ignore_index=True)
    ensemble = one_shot.assign(method="ensemble")
    seen = _rows("paste", paste, episodes=20)
    crowded = pd.concat([seen, seen.assign(method="tuning"), ensemble, alone], ignore_index=True)

    def interval(metrics: pd.DataFrame) -> tuple[float, float]:
        row = gain_over_baseline(metrics).set_index(["group", "method"]).loc[("heldout", "one_shot")]
        return row.ci_low, row.ci_high

    assert interval(alone) == interval(crowded)


def test_class_bars_give_labels_that_share_a_name_a_bar_each() -> None:
    """Left and right "kidney" are two structures: one bar each, told apart by label value."""
    axis = class_bars(_two_kidneys()).axes[0]
    ticks = [tick.get_text() for tick in axis.get_xticklabels()]
    assert ticks == ["D/a", "D/kidney (2)", "D/kidney (3)"]
    one_shot_heights = [bar.get_height() for bar in axis.containers[0]]  # strategies first, then baselines
    assert one_shot_heights == pytest.approx([0.5, 0.5, 0.8])


def test_class_bars_draw_no_bar_for_a_method_that_never_ran_on_a_dataset() -> None:
    """memory_bank does not run on held-out datasets: its missing bar read as a Dice of 0."""
    seen = pd.concat([_rows(m, np.full(30, 0.8)) for m in ("memory_bank", "paste")], ignore_index=True)
    held = _rows("paste", np.full(30, 0.6), dataset="H", heldout=True)
    axis = class_bars(pd.concat([seen, held], ignore_index=True)).axes[0]
    memory_bank = [bar.get_height() for bar in axis.containers[0]]
    assert memory_bank[:3] == pytest.approx([0.8] * 3) and np.isnan(memory_bank[3:]).all()


def test_the_box_plot_counts_scored_rows_only() -> None:
    titles = [axis.get_title() for axis in dice_boxplot(_with_failures()).axes]
    assert titles[0] == "seen (n = 15 classes × episodes)"  # not the 6 rows of the failed episodes


def test_class_bars_of_an_empty_evaluation_draw_no_bars() -> None:
    empty = _rows("paste", np.zeros(0), episodes=0)
    assert class_bars(empty).axes[0].containers == []


def test_hd95_goes_to_mlflow_with_the_number_of_rows_it_is_over() -> None:
    """Empty predictions have no HD95, so a method that found nothing on 9 of 10 queries had the best
    eval/…/hd95_mm, with no count beside it to say it was one row."""
    truth = np.zeros((20, 20, 20), bool)
    truth[5:15, 5:15, 5:15] = True
    rows = []
    for episode in range(10):
        misses = truth if episode == 0 else np.zeros_like(truth)
        for method, prediction in (("misses", misses), ("finds", np.roll(truth, 2, axis=2))):
            scored = mask_metrics(prediction, truth, (3.0, 3.0, 3.0), 3.0).to_row()
            rows.append(
                {"episode_id": f"D/case_{episode}", "dataset": "D", "label": 1, "method": method,
                 "heldout": False, "novel": False, "error": "", **scored}
            )  # fmt: skip
    metrics = pd.DataFrame(rows)
    summary, gains = summary_by_group(metrics), gain_over_baseline(metrics)
    headline = headline_metrics(summary, gains)
    assert headline["eval/seen/misses/hd95_mm"] == 0.0 < headline["eval/seen/finds/hd95_mm"]
    assert (headline["eval/seen/misses/hd95_n"], headline["eval/seen/finds/hd95_n"]) == (1, 10)
    report = markdown_report(summary, summary_by_dataset(metrics), gains, {})
    assert "HD95 is the mean over the rows where prediction and\ntruth are both non-empty" in report


def test_the_reference_check_table_splits_flagged_classes_from_the_others() -> None:
    """The report says how well the reference check (iris segment's warning) predicts one-shot misses."""
    checked = np.tile([0.9, 0.8, 0.1], 10)  # class c is not found again in its own reference
    one_shot, paste = np.tile([0.7, 0.6, 0.0], 10), np.tile([0.4, 0.4, 0.5], 10)
    metrics = pd.concat(
        [
            _rows("one_shot", one_shot, heldout=True).assign(reference_check_dice=checked),
            _rows("paste", paste, heldout=True).assign(reference_check_dice=checked),
        ],
        ignore_index=True,
    )
    table = reference_check_table(metrics).set_index(["group", "flagged"])
    assert set(table.index) == {("heldout", True), ("heldout", False), ("novel", True), ("novel", False)}
    flagged, clear = table.loc[("heldout", True)], table.loc[("heldout", False)]
    assert (flagged.pairs, flagged.reference_check_dice, flagged.one_shot, flagged.paste) == (
        10,
        0.1,
        0.0,
        0.5,
    )
    assert flagged.one_shot_below_paste == 1.0 and clear.one_shot_below_paste == 0.0
    assert (clear.pairs, clear.one_shot, clear.paste) == (20, pytest.approx(0.65), pytest.approx(0.4))
    summary, by_dataset, gains = (
        summary_by_group(metrics),
        summary_by_dataset(metrics),
        gain_over_baseline(metrics),
    )
    report = markdown_report(summary, by_dataset, gains, {}, reference_check_table(metrics))
    assert "## Reference check" in report and "one_shot_below_paste" in report
    # a table written before the column existed has no check to report
    assert reference_check_table(metrics.drop(columns="reference_check_dice")).empty


def _with_failures() -> pd.DataFrame:
    """12 scored one-shot rows, 3 rows where the method failed (scored as empty: Dice 0) and 6 rows of
    two episodes that failed (no metrics)."""
    scored = _rows("one_shot", np.linspace(0.2, 0.8, 12), episodes=4)
    errored = _rows("one_shot", np.zeros(3), episodes=1, dataset="F").assign(error="did not converge")
    failed = _rows("one_shot", np.full(6, np.nan), episodes=2, dataset="E").assign(error="unreadable scan")
    return pd.concat([scored, errored, failed], ignore_index=True)


def test_n_counts_method_errors_as_empty_predictions_and_not_failed_episodes() -> None:
    """A method that failed is scored as the empty prediction a user gets (in n and the mean); a failed
    episode has no metrics (in neither). One `failures` column counted both while the report said they
    all had no metrics."""
    metrics = _with_failures()
    row = summary_by_group(metrics).set_index(["group", "method"]).loc[("seen", "one_shot")]
    assert (row.n, row.episode_failures, row.method_errors) == (15, 6, 3)
    assert row.dice == pytest.approx(0.5 * 12 / 15)
    by_dataset = summary_by_dataset(metrics).set_index("dataset")
    assert by_dataset.loc["E", ["n", "episode_failures", "method_errors"]].tolist() == [0, 6, 0]
    report = markdown_report(
        summary_by_group(metrics), by_dataset.reset_index(), gain_over_baseline(metrics), {}
    )
    assert (
        "scored as an empty prediction (Dice 0)" in report
        and "they have no\nmetrics and are not in `n`" in report
    )


def test_the_report_lists_failures_and_mlflow_gets_the_counts() -> None:
    metrics = _with_failures()
    summary, gains = summary_by_group(metrics), gain_over_baseline(metrics)
    failures = failure_table(metrics)
    assert failures.to_dict("records") == [
        {"episode_id": "F/case_000", "method": "one_shot", "classes": "a, b, c", "scored": True,
         "error": "did not converge"},
        {"episode_id": "E/case_000", "method": "one_shot", "classes": "a, b, c", "scored": False,
         "error": "unreadable scan"},
        {"episode_id": "E/case_001", "method": "one_shot", "classes": "a, b, c", "scored": False,
         "error": "unreadable scan"},
    ]  # fmt: skip
    report = markdown_report(summary, summary_by_dataset(metrics), gains, {}, failures=failures)
    listed = report[report.index("## Failures") :]
    assert "E/case_001" in listed and "unreadable scan" in listed and "did not converge" in listed
    headline = headline_metrics(summary, gains)
    counts = {
        name: headline[f"eval/seen/one_shot/{name}"] for name in ("n", "episode_failures", "method_errors")
    }
    assert counts == {"n": 15, "episode_failures": 6, "method_errors": 3}


def test_the_failures_section_is_bounded() -> None:
    many = _rows("one_shot", np.full(3 * 60, np.nan), episodes=60).assign(error="bad | label\nfile")
    report = markdown_report(summary_by_group(many), summary_by_dataset(many), pd.DataFrame(), {},
                             failures=failure_table(many))  # fmt: skip
    listed = report[report.index("## Failures") :]
    assert listed.count("bad \\| label file") == 50 and "… and 10 more" in listed
    clean = _rows("one_shot", np.full(30, 0.5))
    assert "(none)" in markdown_report(summary_by_group(clean), summary_by_dataset(clean), pd.DataFrame(), {},
                                       failures=failure_table(clean))  # fmt: skip


def test_the_interval_keeps_its_false_win_rate_near_nominal_with_few_subjects() -> None:
    """A zero true gain must rarely read as a clear win. Tables of 5 subjects (the fewest given an
    interval) with 3–8 correlated pairs each: the plain percentile bootstrap put its lower bound above 0
    in 8.7 % of them, against 2.5 % nominal."""
    rng = np.random.default_rng(11)
    tables, false_wins = 2000, 0
    for _ in range(tables):
        counts = rng.integers(3, 9, size=5)
        subject_effect = rng.normal(0.0, 0.1, 5)
        pairs = zip(subject_effect, counts, strict=True)
        sums = np.array([(effect + rng.normal(0.0, 0.15, n)).sum() for effect, n in pairs])
        low, _ = subject_bootstrap_interval(sums, counts.astype(float), rng, resamples=1000)
        false_wins += low > 0
    assert false_wins / tables < 0.06


def test_the_interval_of_a_few_subjects_does_not_depend_on_the_seed() -> None:
    """At 5 subjects the expanded tail is 0.1 %: with 2000 draws each bound was one or two extreme draws
    and moved with the seed (a lower bound either side of 0). Up to 6 subjects every resample is taken."""
    rng = np.random.default_rng(5)
    for subjects in (5, 6):
        sums, counts = rng.normal(0.03, 0.1, subjects) * 4, np.full(subjects, 4.0)
        bounds = {subject_bootstrap_interval(sums, counts, np.random.default_rng(s)) for s in range(10)}
        assert len(bounds) == 1
        draws = np.array(list(itertools.product(range(subjects), repeat=subjects)))
        tail = expanded_tail(subjects)
        exact = np.quantile(sums[draws].sum(1) / counts[draws].sum(1), [tail, 1 - tail])
        assert bounds.pop() == pytest.approx(tuple(exact))


class _CountingGenerator:
    """A generator that records how many resamples were drawn."""

    def __init__(self, seed: int) -> None:
        self.rng, self.sizes = np.random.default_rng(seed), []

    def integers(self, low: int, high: int, size: tuple[int, int]) -> np.ndarray:
        self.sizes.append(size)
        return self.rng.integers(low, high, size=size)


@pytest.mark.parametrize("subjects", [7, 8, 10, 14])
def test_enough_draws_fall_beyond_each_bound(subjects: int) -> None:
    counting = _CountingGenerator(0)
    subject_bootstrap_interval(np.linspace(-1, 1, subjects), np.ones(subjects), counting)
    [(resamples, _)] = counting.sizes
    assert resamples * expanded_tail(subjects) >= 25


@pytest.mark.parametrize("subjects", [15, 16, 30])
def test_groups_of_15_subjects_or_more_keep_their_intervals(subjects: int) -> None:
    """The README records intervals of make run's groups: 2000 draws already put 25 beyond each bound."""
    sums, counts = np.random.default_rng(subjects).normal(0.05, 0.1, subjects), np.full(subjects, 3.0)
    counting = _CountingGenerator(7)
    interval = subject_bootstrap_interval(sums, counts, counting)
    assert counting.sizes == [(2000, subjects)]
    draws = np.random.default_rng(7).integers(0, subjects, size=(2000, subjects))
    tail = expanded_tail(subjects)
    assert interval == tuple(np.quantile(sums[draws].sum(1) / counts[draws].sum(1), [tail, 1 - tail]))
    assert math.isfinite(interval[0])
