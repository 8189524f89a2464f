"""The data holder's loader: every supported format loads, and each kind of bad input gets one clear sentence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fedtune.client.config import ColumnSpec
from fedtune.client.data import DataError, load_data

LABELS = ("negative", "positive")


def load_examples(path, labels, text_column: str = "text", label_column: str = "label"):
    return load_data(path, ColumnSpec(text_column, label_column), labels)


def test_loads_csv_tsv_jsonl_parquet_with_label_names_and_ids(tmp_path: Path, write_csv) -> None:
    rows = [("what a great film", "positive"), ("dull and slow", "negative"), ("fine", "1")]
    paths = [write_csv(rows, "d.csv"), write_csv(rows, "d.tsv")]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    parquet = tmp_path / "d.parquet"
    pd.DataFrame(rows, columns=["text", "label"]).to_parquet(parquet)
    for path in [*paths, jsonl, parquet]:
        examples, labels = load_examples(path, LABELS)
        assert labels == LABELS
        assert list(examples["text"]) == ["what a great film", "dull and slow", "fine"], path
        assert list(examples["label"]) == [1, 0, 1], path


def test_custom_columns_and_inferred_labels(write_csv) -> None:
    path = write_csv([("a", "spam"), ("b", "ham"), ("c", "spam")], header=("body", "kind"))
    examples, labels = load_examples(path, None, text_column="body", label_column="kind")
    assert labels == ("ham", "spam")
    assert list(examples["label"]) == [1, 0, 1]


def _error(path, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_examples(path, kw.pop("labels", LABELS), **kw)
    return str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    assert _error(path) == f"{path}: no such file"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    assert _error(path) == f"{path}: the file is empty"


def test_header_only_file(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("text,label\n")
    assert _error(path) == f"{path}: the file has a header but no rows"


def test_missing_column(write_csv) -> None:
    path = write_csv([("x", "positive")], header=("sentence", "label"))
    assert _error(path) == (f"{path}: no column 'text' (columns are: sentence, label); set the text/label column options")


def test_unreadable_encoding(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nok,positive\ncaf\xe9 au lait,negative\n".encode("latin-1"))
    assert _error(path) == f"{path}: line 3 is not valid UTF-8 (byte 0xe9); save the file as UTF-8"


def test_label_outside_known_set(write_csv) -> None:
    path = write_csv([("fine", "positive"), ("meh", "neutral")])
    assert _error(path) == (f"{path}: row 2: label 'neutral' in column 'label' is not one of: negative, positive (or an id 0..1)")


def test_empty_text(write_csv) -> None:
    path = write_csv([("fine", "positive"), ("   ", "negative")])
    assert _error(path) == f"{path}: row 2: column 'text' is empty"


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK")
    assert "unknown format '.xlsx'" in _error(path)


def test_malformed_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": "positive"}\n{"text": "broken\n')
    assert _error(path).startswith(f"{path}: cannot be read as jsonl: ")


def test_cli_reports_bad_data_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9,positive\n".encode("latin-1"))
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.simulations.cli", "--dataset", str(path), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "not valid UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


def test_simulation_evaluates_on_a_separate_test_file(write_csv) -> None:
    from fedtune.simulations.datasets import DataSpec, split
    from tests.conftest import sentiment_rows

    train = write_csv(sentiment_rows(40), "train.csv")
    dev = write_csv([("truly superb", "1"), ("dreadful", "negative"), ("nice", "positive")], "dev.csv")
    pool, held, labels = split(DataSpec(dataset=str(train), labels=LABELS, test_dataset=str(dev)))
    assert labels == LABELS
    assert len(pool) == 40  # every training row goes to the clients
    assert list(held["text"]) == ["truly superb", "dreadful", "nice"]
    assert list(held["label"]) == [1, 0, 1]
    assert held.features["label"].names == list(LABELS)
