"""Canonical examples -> token ids + labels, cached on disk, split into train / eval.

The tokenized data is cached under a key made of everything that changes it: the data files (path,
size, mtime), their dataset_info entries, the tokenizer's vocabulary and special tokens, the template
and the settings (the stage's data kind, cutoff_len, train_on_prompt, mask_history, max_samples). Any change makes
a new key; `overwrite_cache: true` rebuilds it anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.data import formats, registry
from trainer.data.templates import Template
from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class DataReport:
    """What happened to every input row: nothing is dropped without being counted here and logged."""

    read: int = 0
    bad: int = 0
    truncated: int = 0
    dropped_long: int = 0
    no_labels: int = 0
    examples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    bad_samples: list[str] = field(default_factory=list)

    def merge(self, other: "DataReport") -> None:
        for name in ("read", "bad", "truncated", "dropped_long", "no_labels", "examples", "tokens", "label_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bad_samples += other.bad_samples


def tokenize_row(row: dict, template: Template | None, tokenizer, cutoff_len: int, train_on_prompt: bool,
                 mask_history: bool) -> dict:
    """One canonical sft example -> input_ids/labels, truncated to cutoff_len (flagged)."""
    ids, trained = template.encode(tokenizer, row["messages"], row["system"], train_on_prompt, mask_history)
    truncated = len(ids) > cutoff_len
    ids, trained = ids[:cutoff_len], trained[:cutoff_len]
    labels = [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]
    # Position 0 is never predicted (labels shift by one), so it cannot count as a trained token.
    no_labels = not any(t for t in trained[1:])
    return {"input_ids": ids, "labels": labels, "_truncated": truncated, "_no_labels": no_labels}


def tokenize_document(row: dict, tokenizer, cutoff_len: int) -> list[dict]:
    """One pt document -> chunks of at most cutoff_len tokens ending in EOS (long documents are split, not cut)."""
    ids = tokenizer(row["messages"][0]["content"], add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return [{"input_ids": ids[i:i + cutoff_len], "labels": ids[i:i + cutoff_len], "_truncated": False,
             "_no_labels": len(ids[i:i + cutoff_len]) < 2} for i in range(0, len(ids), cutoff_len)]


def _file_fingerprint(spec: registry.DatasetSpec) -> list:
    if spec.source != "file":
        return [spec.path, spec.subset, spec.split, spec.folder]
    out = []
    for f in spec.files():
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(),
                                                                                sort_keys=True).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(specs: list[registry.DatasetSpec], tokenizer, template: Template | None, settings: dict) -> str:
    payload = {
        "version": 1,
        "datasets": [[asdict(s), _file_fingerprint(s)] for s in specs],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "template": repr(template),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    root = os.environ.get("ZEROTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zerotune")
    return Path(root) / "tokenized"


def _num_proc(requested: int | None, rows: int) -> int | None:
    """Worker processes only pay off on large data; never more than the cores there are."""
    if not requested or requested <= 1 or rows < 2000:
        return None
    return max(1, min(requested, os.cpu_count() or 1, rows // 1000))


DATA_KINDS = ("supervised", "pretrain")  # what a stage's data_kind may name (trainer/stages)


def _check_kind(data_kind: str) -> None:
    if data_kind not in DATA_KINDS:
        raise ConfigError(f"data kind {data_kind!r} has no tokenizer yet; known: {', '.join(DATA_KINDS)}.")


def _tokenize_one(spec, data_args, data_kind: str, tokenizer, template: Template | None):
    import datasets

    report = DataReport()
    rows = registry.load_rows(spec)
    if data_args.max_samples is not None:
        rows = rows.select(range(min(data_args.max_samples, len(rows))))
    report.read = len(rows)
    num_proc = _num_proc(data_args.preprocessing_num_workers, len(rows))
    if data_kind == "pretrain":  # documents: the 'text' column, or whatever columns.prompt names
        spec.formatting = "text"
    canonical, bad = formats.to_canonical(spec, rows, num_proc=num_proc)
    with_tools = sum(1 for t in canonical["tools"] if t)
    if with_tools:
        logger.warning("%s: %d rows carry tool definitions (the tools column), which zerotune's templates do not "
                       "render yet; those rows train without them.", spec.name, with_tools)
    report.bad = len(bad)
    report.bad_samples = [f"{spec.name} ({spec.path}) row {r}: {why}" for r, why in bad[:5]]
    allowed = data_args.max_bad_rows * report.read if data_args.max_bad_rows < 1 else data_args.max_bad_rows
    if report.bad > allowed:
        raise ConfigError(
            f"dataset {spec.name!r} ({spec.path}): {report.bad} of {report.read} rows are malformed, more than "
            f"max_bad_rows={data_args.max_bad_rows} allows. First ones: " + "; ".join(report.bad_samples)
            + ". Fix the rows, map the right columns in dataset_info.json, or raise max_bad_rows.")

    if data_kind == "pretrain":
        def apply(batch: dict) -> dict:
            out: dict[str, list] = {"input_ids": [], "labels": [], "_truncated": [], "_no_labels": []}
            for messages in batch["messages"]:
                for chunk in tokenize_document({"messages": messages}, tokenizer, data_args.cutoff_len):
                    for k in out:
                        out[k].append(chunk[k])
            return out
        tokenized = canonical.map(apply, batched=True, batch_size=data_args.preprocessing_batch_size,
                                  remove_columns=canonical.column_names, num_proc=num_proc,
                                  desc=f"Tokenizing {spec.name}")
    else:
        tokenized = canonical.map(
            lambda row: tokenize_row(row, template, tokenizer, data_args.cutoff_len, data_args.train_on_prompt,
                                     data_args.mask_history),
            remove_columns=canonical.column_names, num_proc=num_proc, desc=f"Tokenizing {spec.name}")
    report.truncated = sum(tokenized["_truncated"])
    if data_args.cutoff_policy == "drop" and report.truncated:
        report.dropped_long, report.truncated = report.truncated, 0
        tokenized = tokenized.filter(lambda x: not x, input_columns="_truncated")
    report.no_labels = sum(tokenized["_no_labels"])
    if report.no_labels:
        tokenized = tokenized.filter(lambda x: not x, input_columns="_no_labels")
    tokenized = tokenized.remove_columns(["_truncated", "_no_labels"])
    lengths = [len(x) for x in tokenized["input_ids"]]
    tokenized = tokenized.add_column("length", lengths)
    report.examples = len(tokenized)
    report.tokens = sum(lengths)
    report.label_tokens = sum(sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in tokenized["labels"])
    return tokenized, report


def _log_report(name: str, report: DataReport, cutoff_len: int) -> None:
    logger.info("%s: %d rows read, %d examples, %d tokens (%d trained).", name, report.read, report.examples,
                report.tokens, report.label_tokens)
    if report.bad:
        logger.warning("%s: skipped %d malformed rows, e.g. %s", name, report.bad, "; ".join(report.bad_samples))
    if report.truncated:
        logger.warning("%s: %d examples were longer than cutoff_len=%d and were truncated "
                       "(cutoff_policy: drop drops them instead).", name, report.truncated, cutoff_len)
    if report.dropped_long:
        logger.warning("%s: dropped %d examples longer than cutoff_len=%d (cutoff_policy: drop).", name,
                       report.dropped_long, cutoff_len)
    if report.no_labels:
        logger.warning("%s: dropped %d examples with no trained tokens left after truncation (raise cutoff_len).",
                       name, report.no_labels)


def tokenized_dataset(names: list[str], data_args, data_kind: str, tokenizer, template: Template | None,
                      rebuild: bool) -> tuple[Any, DataReport]:
    """All named datasets tokenized and concatenated (in the given order), from cache when possible."""
    import datasets

    _check_kind(data_kind)
    specs = [registry.get_spec(n, data_args.dataset_dir) for n in names]
    settings = {"data_kind": data_kind, "cutoff_len": data_args.cutoff_len, "train_on_prompt": data_args.train_on_prompt,
                "mask_history": data_args.mask_history, "max_samples": data_args.max_samples,
                "cutoff_policy": data_args.cutoff_policy, "max_bad_rows": data_args.max_bad_rows}
    key = cache_key(specs, tokenizer, template, settings)
    root = Path(data_args.tokenized_cache_dir) if data_args.tokenized_cache_dir else default_cache_dir()
    path = root / key
    report_path = path / "zerotune_report.json"
    if path.is_dir() and report_path.is_file() and not rebuild:
        logger.info("Reusing tokenized data for %s from %s (overwrite_cache: true rebuilds it).", ",".join(names), path)
        report = DataReport(**json.loads(report_path.read_text()))
        return datasets.load_from_disk(str(path / "data")), report

    parts, total = [], DataReport()
    for spec in specs:
        tokenized, report = _tokenize_one(spec, data_args, data_kind, tokenizer, template)
        _log_report(spec.name, report, data_args.cutoff_len)
        if report.examples == 0:
            raise ConfigError(f"dataset {spec.name!r} ({spec.path}) yields no usable examples: {report.read} rows read, "
                              f"{report.bad} malformed, {report.dropped_long} too long, {report.no_labels} without trained tokens. "
                              + ("; ".join(report.bad_samples)))
        parts.append(tokenized)
        total.merge(report)
    data = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    # Write beside, then rename: a killed run never leaves a half-written cache that looks complete.
    tmp = root / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    data.save_to_disk(str(tmp / "data"))
    (tmp / "zerotune_report.json").write_text(json.dumps(asdict(total)))
    if path.exists():  # a rebuild: move the old cache aside first (a reader holding it keeps its files)
        old = root / f".{key}.old-{os.getpid()}"
        try:
            os.replace(path, old)
        except OSError:
            pass
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process published the same key meanwhile: its data is identical, use it
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path / "data")), total


def split_validation(data, val_size: float, seed: int):
    """val_size < 1 is a fraction, >= 1 a count of examples, as in LLaMA-Factory."""
    if not val_size:
        return data, None
    size = int(val_size) if val_size >= 1 else val_size
    if isinstance(size, int) and size >= len(data):
        raise ConfigError(f"val_size: {val_size} leaves no training data ({len(data)} examples in all).")
    split = data.train_test_split(test_size=size, seed=seed)
    return split["train"], split["test"]
