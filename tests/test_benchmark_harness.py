"""The shared benchmark harness's timing loops, paired statistics, profile comparison and retried,
resumable phases, with hand-computed figures (no model, no ranks: a few seconds)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.harness import (
    FOREIGN_LIMIT,
    Phases,
    abba,
    all_ranks,
    checkpoint_folder,
    compare_profiles,
    disturbed,
    paired_ratios,
    slowest_median,
    step_seconds,
)


def test_step_seconds_times_each_call_and_not_what_runs_before_it() -> None:
    calls: list[str] = []
    times = step_seconds(
        lambda: (calls.append("step"), time.sleep(0.02)),
        3,
        before=lambda: (calls.append("before"), time.sleep(0.2)),
    )
    assert calls == ["before", "step"] * 3
    assert len(times) == 3
    # Each call sleeps 0.02 s; the 0.2 s of ``before`` must not be in the figure.
    assert all(0.02 <= t < 0.2 for t in times), times


def test_abba_alternates_the_order_and_keeps_each_side_in_its_place() -> None:
    order: list[str] = []

    def side(name: str) -> Any:
        def run() -> str:
            order.append(name)
            return f"{name}{len(order)}"

        return run

    pairs = abba(4, side("a"), side("b"))
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    # Results are (first's, second's) whatever order they ran in.
    assert pairs == [("a1", "b2"), ("a4", "b3"), ("a5", "b6"), ("a8", "b7")]
    assert abba(0, side("a"), side("b")) == []


def test_paired_ratios_by_hand() -> None:
    # Ratios 2/1, 3/2, 12/4 = 2, 1.5, 3: median 2. Medians 3 and 2: ratio of medians 1.5.
    result = paired_ratios([2.0, 3.0, 12.0], [1.0, 2.0, 4.0])
    assert result["ratios"] == [2.0, 1.5, 3.0]
    assert result["median_ratio"] == 2.0
    assert result["ratio_of_medians"] == 1.5
    # An even count: the median is the mean of the middle two (ratios 1, 2, 3, 4 -> 2.5; medians
    # (2 + 3) / 2 = 2.5 over 1 -> 2.5).
    even = paired_ratios([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    assert even["median_ratio"] == 2.5
    assert even["ratio_of_medians"] == 2.5


def test_paired_ratios_refuses_unpaired_lists() -> None:
    with pytest.raises(ValueError):
        paired_ratios([1.0, 2.0], [1.0])


def test_slowest_median_is_the_largest_per_rank_median() -> None:
    # Medians: 3 (of 1, 3, 5) and 4 (of 2, 2, 6, 10: (2 + 6) / 2); the mean or the maximum would differ.
    assert slowest_median([[1.0, 5.0, 3.0], [2.0, 2.0, 10.0, 6.0]]) == 4.0
    assert slowest_median([[7.0]]) == 7.0


def test_compare_profiles_ranks_ops_by_excess_over_an_even_split() -> None:
    single = {"a": (10.0, 2), "b": (4.0, 1)}
    multi = {"a": (6.0, 2), "c": (1.5, 3)}
    rows = compare_profiles(single, multi, world=2)
    # Excess over 1/2 of the 1-rank time: c 1.5 - 0 = 1.5, a 6 - 10 / 2 = 1.0, b 0 - 4 / 2 = -2.0.
    assert [(row["op"], row["excess_over_ideal_ms"]) for row in rows] == [("c", 1.5), ("a", 1.0), ("b", -2.0)]
    assert rows[1] == {
        "op": "a",
        "one_rank_ms": 10.0,
        "one_rank_calls": 2,
        "2_rank_ms": 6.0,
        "2_rank_calls": 2,
        "excess_over_ideal_ms": 1.0,
    }
    assert rows[0]["one_rank_calls"] == 0 and rows[2]["2_rank_calls"] == 0
    assert [row["op"] for row in compare_profiles(single, multi, world=2, top=2)] == ["c", "a"]


def test_disturbed_is_strictly_over_the_limit() -> None:
    assert FOREIGN_LIMIT == 0.05
    assert disturbed({"foreign_cpu_fraction": 0.06})
    assert not disturbed({"foreign_cpu_fraction": 0.05})
    assert not disturbed({})  # off Linux: no figure, nothing to hold against the run
    assert disturbed({"foreign_cpu_fraction": 0.02}, limit=0.01)


def test_all_ranks_without_a_process_group_is_the_value_alone() -> None:
    assert all_ranks({"x": 1}) == [{"x": 1}]


def runs(fractions: list[float]) -> tuple[list[int], Any]:
    """A measurement whose n-th run reports ``fractions[n]`` of the CPUs used by others."""
    calls: list[int] = []

    def run_once() -> dict[str, Any]:
        calls.append(len(calls))
        return {"value": len(calls), "foreign_cpu": {"foreign_cpu_fraction": fractions[len(calls) - 1]}}

    return calls, run_once


def test_run_clean_retries_until_undisturbed() -> None:
    phases = Phases(retries=2)
    calls, run_once = runs([0.5, 0.2, 0.01])
    result = phases.run_clean("m", run_once)
    assert len(calls) == 3
    assert result["value"] == 3 and result["attempts"] == 3
    assert "disturbed" not in result
    assert [record["phase"] for record in phases.records] == ["m", "m (retry 1)", "m (retry 2)"]
    assert all("wall_seconds" in record for record in phases.records)


def test_run_clean_gives_up_after_the_retries_and_says_so() -> None:
    phases = Phases(retries=1)
    calls, run_once = runs([0.5, 0.5, 0.0])
    result = phases.run_clean("m", run_once)
    assert len(calls) == 2
    assert result["value"] == 2 and result["attempts"] == 2 and result["disturbed"] is True


def test_run_clean_takes_a_custom_test_of_cleanliness() -> None:
    phases = Phases(retries=3)
    calls, run_once = runs([0.0, 0.0, 0.9])
    result = phases.run_clean("m", run_once, clean=lambda r: r["value"] >= 3)
    assert len(calls) == 3 and result["attempts"] == 3 and "disturbed" not in result


def test_checkpoints_keep_undisturbed_results_only(tmp_path: Path) -> None:
    first = Phases(checkpoints=tmp_path)
    _, clean_run = runs([0.0])
    kept = first.run_clean("clean", clean_run)
    _, disturbed_run = runs([0.9])
    first.run_clean("disturbed", disturbed_run)
    assert len(list(tmp_path.glob("*.pkl"))) == 1

    restarted = Phases(checkpoints=tmp_path)

    def must_not_run() -> dict[str, Any]:
        raise AssertionError("an undisturbed result was measured again")

    assert restarted.run_clean("clean", must_not_run) == kept
    assert restarted.records == []  # nothing measured, no phase recorded
    calls, again = runs([0.0])
    assert restarted.run_clean("disturbed", again)["value"] == 1 and calls == [0]


def test_checkpoint_folder_depends_on_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = checkpoint_folder("bench", {"steps": 9})
    assert folder.is_dir() and folder.parent == tmp_path and folder.name.startswith("bench-")
    assert checkpoint_folder("bench", {"steps": 9}) == folder
    assert checkpoint_folder("bench", {"steps": 10}) != folder
