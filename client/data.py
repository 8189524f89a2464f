"""Load a data holder's text file (CSV, TSV, JSONL, Parquet): labelled rows, or a causal LM's texts or prompt/response pairs."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import datasets

from fedtune.client.config import ColumnSpec
from fedtune.privacy.ledger import fingerprint_rows

SUFFIX_TO_BUILDER = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


class DataError(ValueError):
    """The data file cannot be used; the message names the file, row or column."""


def _check_text_encoding(path: Path) -> None:
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8") from None


def read_table(path: str | Path) -> datasets.Dataset:
    """Read a local file with the `datasets` loader for its format, without leaving a cache copy."""
    path = Path(path)
    builder = SUFFIX_TO_BUILDER.get(path.suffix.lower())
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if builder is None:
        raise DataError(f"{path}: unknown format {path.suffix!r}; use one of {', '.join(SUFFIX_TO_BUILDER)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if builder != "parquet":
        _check_text_encoding(path)
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    # A throw-away cache dir: the `datasets` loaders would otherwise leave an Arrow copy of the
    # data holder's rows in ~/.cache, outside the file the holder chose to keep.
    with tempfile.TemporaryDirectory(prefix="fedtune-data-") as cache:
        try:
            table = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True, **kwargs
            )
        except Exception as err:  # the loaders raise many types; all mean "unreadable file"
            if "corresponds to no data" in str(err):
                raise DataError(f"{path}: the file has a header but no rows") from None
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise DataError(f"{path}: cannot be read as {path.suffix.lstrip('.')}: {reason}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has a header but no rows")
    return table


def to_examples(
    table: datasets.Dataset, labels: Sequence[str], text_column: str, label_column: str, source: str
) -> datasets.Dataset:
    """Validate and map a table to columns `text` (str) and `label` (int id into `labels`)."""
    for column in (text_column, label_column):
        if column not in table.column_names:
            raise DataError(
                f"{source}: no column {column!r} (columns are: {', '.join(table.column_names)}); "
                "set the text/label column options"
            )
    label_ids = {name: i for i, name in enumerate(labels)}
    texts, ids = [], []
    for row, (text, label) in enumerate(zip(table[text_column], table[label_column]), start=1):
        if text is None or not str(text).strip():
            raise DataError(f"{source}: row {row}: column {text_column!r} is empty")
        key = str(label).strip() if label is not None else ""
        if key in label_ids:
            ids.append(label_ids[key])
        elif key.lstrip("-").isdigit() and 0 <= int(key) < len(labels):
            ids.append(int(key))  # numeric ids, as in GLUE files, index the label list
        else:
            raise DataError(
                f"{source}: row {row}: label {label!r} in column {label_column!r} is not one of: "
                f"{', '.join(labels)} (or an id 0..{len(labels) - 1})"
            )
        texts.append(str(text).strip())
    return datasets.Dataset.from_dict({"text": texts, "label": ids})


def infer_labels(table: datasets.Dataset, label_column: str, source: str) -> tuple[str, ...]:
    """The sorted distinct label values of a table, for when no label set is configured."""
    if label_column not in table.column_names:
        raise DataError(f"{source}: no column {label_column!r} (columns are: {', '.join(table.column_names)})")
    values = {str(v).strip() for v in table[label_column] if v is not None and str(v).strip()}
    if len(values) < 2:
        raise DataError(f"{source}: column {label_column!r} has fewer than two distinct labels")
    return tuple(sorted(values, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v)))


def to_lm_examples(table: datasets.Dataset, columns: ColumnSpec, source: str) -> datasets.Dataset:
    """Validate and map a table to a causal LM's rows: column `text`, or columns `prompt` and `response`.

    Each row stays one example (one unit of privacy): rows are never split or joined.
    """
    if columns.instructions and not (columns.prompt_column and columns.response_column):
        raise DataError("instruction data needs both a prompt and a response column (--prompt-column and --response-column)")
    wanted = (columns.prompt_column, columns.response_column) if columns.instructions else (columns.text_column,)
    for column in wanted:
        if column not in table.column_names:
            raise DataError(
                f"{source}: no column {column!r} (columns are: {', '.join(table.column_names)}); a causal LM reads "
                "one text column (--text-column) or prompt and response columns (--prompt-column, --response-column)"
            )
    values = [[None if v is None else str(v).strip() for v in table[c]] for c in wanted]
    for row, cells in enumerate(zip(*values), start=1):
        if columns.instructions and cells[0] and not cells[1]:
            raise DataError(f"{source}: row {row}: a prompt without a response (column {wanted[1]!r} is empty)")
        for column, cell in zip(wanted, cells):
            if not cell:
                raise DataError(f"{source}: row {row}: column {column!r} is empty")
    names = ("prompt", "response") if columns.instructions else ("text",)
    return datasets.Dataset.from_dict(dict(zip(names, values)))


def table_examples(
    table: datasets.Dataset, columns: ColumnSpec, labels: Sequence[str] | None, causal_lm: bool, source: str
) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """A table's examples for the run's task, and the label set used (none for a causal LM)."""
    if causal_lm:
        return to_lm_examples(table, columns, source), ()
    names = tuple(labels) if labels else infer_labels(table, columns.label_column, source)
    return to_examples(table, names, columns.text_column, columns.label_column, source), names


def load_data(
    path: str | Path, columns: ColumnSpec, labels: Sequence[str] | None = None, causal_lm: bool = False
) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """Read and validate a data file for the run's task: labelled rows, or a causal LM's rows."""
    return table_examples(read_table(path), columns, labels, causal_lm, str(path))


def ledger_keys(examples: datasets.Dataset, labels: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The ledger's key for these rows, and their older keys.

    The key is the rows' text alone (a causal LM's prompt and response), so a classifier and a causal LM trained
    on the same texts spend from one budget. Ledgers written before causal LMs keyed a classifier's rows by text
    and label *name*; that key is read too.
    """
    texts = ["prompt", "response"] if "prompt" in examples.column_names else ["text"]
    key = fingerprint_rows(zip(*(examples[c] for c in texts)))
    if "label" not in examples.column_names:
        return key, ()
    return key, (fingerprint_rows((t, labels[y]) for t, y in zip(examples["text"], examples["label"])),)
