"""The dataset mixture: Hub datasets and local JSON/JSONL files, Open-Instruct style.

Open-Instruct's ``--dataset_mixer_list a 1.0 b 0.5 c 1000`` takes, of each dataset, a
fraction of its rows (a number <= 1) or a number of rows (> 1), after a seeded shuffle,
and concatenates the results. TRL's own ``DatasetMixtureConfig.fraction`` means something
else (a share of the final mixture, capped so no dataset is oversampled), so the paper's
"equal mix" (every dataset in full) is expressed here with ``fraction: 1.0`` per dataset.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

LOCAL_JSON_SUFFIXES = (".json", ".jsonl")


class DatasetSpecError(ValueError):
    """A dataset entry of the mixture is malformed or cannot be loaded."""


@dataclass
class DatasetSource:
    """One dataset of the mixture.

    ``path`` is a Hub dataset id, a local dataset folder, or a local ``.json``/``.jsonl``
    file (loaded with the ``json`` builder). Take either ``fraction`` (0 < f <= 1 of the
    rows) or ``rows`` (a number of rows), not both; neither means all rows.
    """

    path: str
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    fraction: float | None = None
    rows: int | None = None
    # Only the chat column goes to TRL: the Tülu data also has a string `prompt` column,
    # which TRL would take for a prompt-completion dataset.
    columns: list[str] = field(default_factory=lambda: ["messages"])

    def __post_init__(self) -> None:
        if self.fraction is not None and self.rows is not None:
            raise DatasetSpecError(f"dataset {self.path!r}: give `fraction` or `rows`, not both.")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise DatasetSpecError(
                f"dataset {self.path!r}: `fraction` must be in (0, 1], got {self.fraction}; "
                "use `rows` for a number of rows."
            )
        if self.rows is not None and self.rows < 1:
            raise DatasetSpecError(f"dataset {self.path!r}: `rows` must be >= 1, got {self.rows}.")

    @property
    def is_local_file(self) -> bool:
        return self.path.endswith(LOCAL_JSON_SUFFIXES)

    @classmethod
    def from_mapping(cls, entry: Any) -> DatasetSource:
        """Build from a YAML mapping (or a bare path string), naming unknown keys."""
        if isinstance(entry, DatasetSource):
            return entry
        if isinstance(entry, str):
            return cls(path=entry)
        if not isinstance(entry, dict) or "path" not in entry:
            raise DatasetSpecError(
                f"each entry of `datasets` needs at least a `path`, got {entry!r}."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(entry) - known)
        if unknown:
            hints = [
                f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)
                for key in unknown
                for close in [difflib.get_close_matches(key, known, n=1)]
            ]
            raise DatasetSpecError(
                f"dataset {entry['path']!r}: unknown key(s) {', '.join(hints)}; "
                f"allowed keys: {', '.join(sorted(known))}."
            )
        return cls(**entry)


def check_sources_exist(sources: list[DatasetSource]) -> None:
    """Fail before any model is loaded if a local dataset file is missing."""
    if not sources:
        raise DatasetSpecError(
            "no training data: add a `datasets:` list to the config "
            "(each entry a Hub id or a local .jsonl file under `path`)."
        )
    for source in sources:
        if source.is_local_file and not Path(source.path).is_file():
            raise DatasetSpecError(
                f"dataset file {source.path!r} does not exist (looked in {Path.cwd()}); "
                "fix `path` in the config's `datasets` list."
            )


def load_source(source: DatasetSource, seed: int):
    """Load one dataset, keep its chat columns, and take its fraction or rows."""
    import datasets

    try:
        if source.is_local_file:
            dataset = datasets.load_dataset("json", data_files=source.path, split=source.split)
        else:
            dataset = datasets.load_dataset(
                source.path, name=source.name, split=source.split, revision=source.revision
            )
    except Exception as error:  # datasets raises many types; all mean "cannot load this"
        raise DatasetSpecError(
            f"could not load dataset {source.path!r} (split {source.split!r}): {error}. "
            "Check the Hub id or local path; offline, only datasets already in the "
            "Hugging Face cache or local files can be used."
        ) from error
    missing = [column for column in source.columns if column not in dataset.column_names]
    if missing:
        raise DatasetSpecError(
            f"dataset {source.path!r} has no column(s) {missing}; it has "
            f"{dataset.column_names}. Tülu-format data needs a `messages` column."
        )
    dataset = dataset.select_columns(source.columns)
    return _take(dataset, source, seed)


def _take(dataset, source: DatasetSource, seed: int):
    if source.fraction is None and source.rows is None:
        return dataset
    count = round(source.fraction * len(dataset)) if source.fraction else source.rows
    if count > len(dataset):
        raise DatasetSpecError(
            f"dataset {source.path!r} has {len(dataset)} rows, fewer than the {count} asked for."
        )
    if count == len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(count))


def load_mixture(sources: list[DatasetSource], seed: int):
    """Concatenate the mixture's datasets (each subsampled with ``seed``)."""
    import datasets

    check_sources_exist(sources)
    parts = [load_source(source, seed) for source in sources]
    return datasets.concatenate_datasets(parts)
