"""Exact-string tests for mgsr.evaluation.tables."""

from __future__ import annotations

import csv
import math

import pytest

from mgsr.evaluation.tables import comparison_table, markdown_table, summarise_seeds, write_csv

# dolly: 20, 22 -> mean 21, std sqrt(2) = 1.414; uinst: 30, 34 -> mean 32, std sqrt(8) = 2.828.
# Average: mean (21 + 32) / 2 = 26.5; per-seed averages 25 (seed 10), 28 (seed 20) -> std sqrt(4.5) = 2.121.
# dist2 (dolly only): 0.5, 0.7 -> mean 0.6, std sqrt(0.02) = 0.141.
PER_SEED = {
    "dolly": {10: {"rougeL": 20.0, "dist2": 0.5}, 20: {"rougeL": 22.0, "dist2": 0.7}},
    "uinst": {10: {"rougeL": 30.0}, 20: {"rougeL": 34.0}},
}


def test_summarise_seeds_values():
    s = summarise_seeds(PER_SEED)
    assert list(s) == ["dolly", "uinst", "Average"]
    assert s["dolly"]["rougeL"] == pytest.approx((21.0, math.sqrt(2.0)))
    assert s["uinst"]["rougeL"] == pytest.approx((32.0, math.sqrt(8.0)))
    assert s["Average"]["rougeL"] == pytest.approx((26.5, math.sqrt(4.5)))
    assert s["dolly"]["dist2"] == pytest.approx((0.6, math.sqrt(0.02)))
    assert "dist2" not in s["Average"]  # only metrics every set reports are averaged


def test_average_std_is_over_per_seed_averages():
    # Anti-correlated sets: per-seed averages are equal (std 0) although each set varies.
    s = summarise_seeds({"a": {1: {"m": 0.0}, 2: {"m": 2.0}}, "b": {1: {"m": 2.0}, 2: {"m": 0.0}}})
    assert s["Average"]["m"] == pytest.approx((1.0, 0.0))


def test_summarise_seeds_rejects_reserved_name():
    with pytest.raises(ValueError):
        summarise_seeds({"Average": {10: {"m": 1.0}}})


def test_markdown_table_exact_string_with_label_override():
    table = markdown_table(summarise_seeds(PER_SEED), label_overrides={"uinst": "U-NI subset"})
    assert table == (
        "| metric | dolly | U-NI subset | Average |\n"
        "| --- | --- | --- | --- |\n"
        "| rougeL | 21.00 ± 1.41 | 32.00 ± 2.83 | 26.50 ± 2.12 |\n"
    )


def test_markdown_table_order_and_missing_metric():
    table = markdown_table(
        summarise_seeds(PER_SEED), metrics=("rougeL", "dist2"), set_order=["uinst", "dolly"]
    )
    assert table == (
        "| metric | uinst | dolly | Average |\n"
        "| --- | --- | --- | --- |\n"
        "| rougeL | 32.00 ± 2.83 | 21.00 ± 1.41 | 26.50 ± 2.12 |\n"
        "| dist2 | — | 0.60 ± 0.14 | — |\n"
    )


ROWS = {"sft": {"dolly": (20.0, 0.5), "vicuna": (15.256, 1.004)}, "mgsr": {"dolly": (24.5, 0.25)}}


def test_comparison_table_exact_string():
    assert comparison_table(ROWS, ["dolly", "vicuna"]) == (
        "| variant | dolly | vicuna |\n"
        "| --- | --- | --- |\n"
        "| sft | 20.00 ± 0.50 | 15.26 ± 1.00 |\n"
        "| mgsr | 24.50 ± 0.25 | — |\n"
    )


def test_write_csv_round_trip(tmp_path):
    path = write_csv(ROWS, ["dolly", "vicuna"], tmp_path / "sub" / "report.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows == [
        ["variant", "dolly_mean", "dolly_std", "vicuna_mean", "vicuna_std"],
        ["sft", "20.0", "0.5", "15.256", "1.004"],
        ["mgsr", "24.5", "0.25", "", ""],
    ]
