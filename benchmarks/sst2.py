"""SST-2 (GLUE) from ../shared/data/sst2/ for the benchmarks: rows as a text,label CSV the simulation reads."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from fedtune.benchmarks.record import SHARED_DATA

SST2 = SHARED_DATA / "sst2"
LABELS = ("negative", "positive")  # label ids 0 and 1 of the GLUE files


def sst2_csv(split: str, out: Path, rows: int | None = None) -> Path:
    """The first `rows` rows (all when None) of SST-2's `split` (train or dev) as a text,label CSV at `out`.

    GLUE's train.tsv is already in shuffled order, so its first rows are a fair sample of it.
    """
    lines = (SST2 / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
    with out.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for line in lines[:rows]:
            text, label = line.rsplit("\t", 1)
            w.writerow([text.strip(), LABELS[int(label)]])
    return out


def sst2_present(benchmark: str) -> bool:
    """Whether SST-2 is beside the checkout; says on stderr why `benchmark` skips when it is not."""
    if (SST2 / "train.tsv").exists() and (SST2 / "dev.tsv").exists():
        return True
    print(f"{benchmark} skipped: SST-2 is absent from {SST2} (train.tsv and dev.tsv are needed)", file=sys.stderr)
    return False
