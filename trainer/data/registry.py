"""dataset_info.json (LLaMA-Factory's schema) -> DatasetSpec, and loading the raw rows it names."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError
from trainer.options import did_you_mean

FORMATTINGS = ("alpaca", "sharegpt", "openai", "text")
FILE_BUILDERS = {
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text",
}
ENTRY_KEYS = {"file_name", "hf_hub_url", "ms_hub_url", "script_url", "cloud_file_name", "formatting", "ranking",
              "subset", "split", "folder", "num_samples", "columns", "tags", "file_sha1"}


@dataclass
class DatasetSpec:
    name: str
    source: str  # "file" or "hub"
    path: str  # file/folder path, or hub id
    formatting: str = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def column(self, role: str, default: str | None) -> str | None:
        return self.columns.get(role, default)

    def files(self) -> list[Path]:
        path = Path(self.path)
        if path.is_dir():
            return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_BUILDERS)
        return [path]


def read_dataset_info(dataset_dir: str) -> dict[str, Any]:
    info_path = Path(dataset_dir) / "dataset_info.json"
    if not info_path.is_file():
        raise ConfigError(
            f"dataset_dir {dataset_dir!r} has no dataset_info.json. Point dataset_dir at the folder that holds it."
        )
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{info_path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{info_path}: must be a JSON object mapping dataset names to entries.")
    return info


# The `columns` roles of dataset_info.json that zerotune reads, and those it refuses by name: a mapped column is
# either used or refused, never dropped silently.
COLUMN_ROLES = ("prompt", "query", "response", "history", "messages", "system", "tools", "chosen", "rejected",
                "kto_tag")
REFUSED_ROLES = {
    "images": "multimodal inputs (images, videos, audios) are not supported: zerotune trains text models",
    "videos": "multimodal inputs (images, videos, audios) are not supported: zerotune trains text models",
    "audios": "multimodal inputs (images, videos, audios) are not supported: zerotune trains text models",
}


def _check_column_roles(name: str, info_path: Path, columns: dict) -> None:
    for role in columns:
        if role in REFUSED_ROLES:
            raise ConfigError(f"{info_path}: dataset {name!r} maps a {role!r} column ({columns[role]!r}), and "
                              f"{REFUSED_ROLES[role]}. Remove \"{role}\" from its columns to train on the text alone.")
        if role not in COLUMN_ROLES:
            raise ConfigError(f"{info_path}: dataset {name!r} maps an unknown column role {role!r}."
                              f"{did_you_mean(role, COLUMN_ROLES + tuple(REFUSED_ROLES))} Known: "
                              f"{', '.join(COLUMN_ROLES)}.")


def get_spec(name: str, dataset_dir: str) -> DatasetSpec:
    info = read_dataset_info(dataset_dir)
    info_path = Path(dataset_dir) / "dataset_info.json"
    if name not in info:
        import difflib

        close = difflib.get_close_matches(name, list(info), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else f" Known: {', '.join(sorted(info)[:20])}."
        raise ConfigError(f"dataset {name!r} is not in {info_path}.{hint}")
    entry = info[name]
    if not isinstance(entry, dict):
        raise ConfigError(f"{info_path}: entry {name!r} must be an object.")
    extra = set(entry) - ENTRY_KEYS
    if extra:
        raise ConfigError(f"{info_path}: entry {name!r} has unknown keys {sorted(extra)}; allowed: {sorted(ENTRY_KEYS)}.")
    for unsupported in ("ms_hub_url", "script_url", "cloud_file_name"):
        if unsupported in entry and "file_name" not in entry and "hf_hub_url" not in entry:
            raise ConfigError(f"{info_path}: entry {name!r} uses {unsupported}, which zerotune does not support; "
                              "use file_name (a local file) or hf_hub_url.")
    _check_column_roles(name, info_path, dict(entry.get("columns") or {}))
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise ConfigError(f"{info_path}: entry {name!r} has formatting {formatting!r}; choose one of {FORMATTINGS}.")
    common = dict(
        name=name, formatting=formatting, ranking=bool(entry.get("ranking", False)),
        subset=entry.get("subset"), split=entry.get("split", "train"), folder=entry.get("folder"),
        num_samples=entry.get("num_samples"), columns=dict(entry.get("columns") or {}),
        tags=dict(entry.get("tags") or {}),
    )
    if "file_name" in entry:
        path = Path(dataset_dir) / entry["file_name"]
        if not path.exists():
            raise ConfigError(f"dataset {name!r}: file {str(path)!r} (file_name in {info_path}) does not exist.")
        spec = DatasetSpec(source="file", path=str(path), **common)
        files = spec.files()
        if not files:
            raise ConfigError(f"dataset {name!r}: folder {str(path)!r} holds no {'/'.join(FILE_BUILDERS)} files.")
        bad = [f for f in files if f.suffix not in FILE_BUILDERS]
        if bad:
            raise ConfigError(f"dataset {name!r}: {bad[0]} has an unsupported extension; use one of "
                              f"{', '.join(FILE_BUILDERS)}.")
        return spec
    if "hf_hub_url" in entry:
        return DatasetSpec(source="hub", path=entry["hf_hub_url"], **common)
    raise ConfigError(f"{info_path}: entry {name!r} needs file_name or hf_hub_url.")


def load_rows(spec: DatasetSpec, cache_dir: str | None = None):
    """The raw rows of one dataset as a datasets.Dataset, with a `_row` column (1-based row in its file)."""
    import datasets

    if spec.source == "file":
        files = [str(f) for f in spec.files()]
        builders = {FILE_BUILDERS[Path(f).suffix] for f in files}
        if len(builders) > 1:
            raise ConfigError(f"dataset {spec.name!r}: {spec.path} mixes file types {sorted(builders)}; use one.")
        builder = builders.pop()
        empty = [f for f in files if _holds_no_rows(f, builder)]
        if empty:
            raise ConfigError(f"dataset {spec.name!r}: file {empty[0]} holds no rows"
                              f"{' (an empty JSON list)' if builder == 'json' and Path(empty[0]).stat().st_size else ''}"
                              "; add rows or remove it from dataset_info.json.")
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
        except Exception as err:  # datasets wraps parse errors in several types
            where = json_syntax_errors(files) if builder == "json" else ""
            raise ConfigError(f"dataset {spec.name!r}: could not read {spec.path}: {where or err}") from None
    else:
        try:
            ds = datasets.load_dataset(spec.path, name=spec.subset, split=spec.split, data_dir=spec.folder,
                                       cache_dir=cache_dir)
        except Exception as err:
            raise ConfigError(
                f"dataset {spec.name!r}: could not load hub dataset {spec.path!r} ({type(err).__name__}: {err}). "
                "Without network access, download it and use file_name instead."
            ) from None
    if len(ds) == 0:
        raise ConfigError(f"dataset {spec.name!r}: {spec.path} holds no rows; add rows or remove it from "
                          "dataset_info.json.")
    ds = ds.add_column("_row", list(range(1, len(ds) + 1)))
    if spec.num_samples is not None:
        ds = ds.select(range(min(spec.num_samples, len(ds))))
    return ds


def _holds_no_rows(path: str, builder: str) -> bool:
    """An empty file (or only whitespace), a JSON file that is an empty list, a CSV file of a header alone: the
    datasets library's own errors for these name neither the file nor the reason."""
    if os.path.getsize(path) > (1 << 20):
        return False  # a file this size holds something; reading it here would only cost time
    if builder in ("parquet", "arrow"):
        return os.path.getsize(path) == 0
    text = Path(path).read_text(encoding="utf-8", errors="replace").strip()
    if not text:
        return True
    if builder == "csv":
        return len([line for line in text.splitlines() if line.strip()]) <= 1  # a header alone
    if builder == "json" and text[0] == "[":
        try:
            return json.loads(text) == []
        except json.JSONDecodeError:
            return False
    return False


def json_syntax_errors(files: list[str]) -> str:
    """Which lines of JSON / JSON Lines files do not parse: file, 1-based line, how many (empty: none found)."""
    for f in files:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        if f.endswith(".json") and text.lstrip()[:1] in "[{":
            try:
                json.loads(text)
                continue
            except json.JSONDecodeError as err:
                return f"{f} line {err.lineno}, column {err.colno} is not valid JSON ({err.msg})."
        lines = text.splitlines()
        bad = []
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    bad.append((number, err.msg))
        if bad:
            shown = "; ".join(f"line {n} ({msg})" for n, msg in bad[:5])
            return (f"{len(bad)} of {len(lines)} lines of {f} are not valid JSON: {shown}. Fix or remove them "
                    "(each line of a .jsonl file is one JSON object).")
    return ""
