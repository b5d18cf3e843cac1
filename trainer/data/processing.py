"""Raw rows -> token ids + labels, cached on disk, split into train / eval.

One path for every row, cached or streamed: `process_rows` takes a batch of raw rows, converts each to the
canonical form (formats.py), tokenizes the whole batch in one call of the fast tokenizer (its Rust batch
encoder), reads the labels from character offsets with numpy (no Python loop over tokens), truncates, and
says for every row what became of it (bad, truncated, without trained tokens). `keep_reason` is the one
place that decides what is dropped; both the cache builder and the stream call it and count the reasons.

The tokenized data is cached under a key made of everything that changes it: the data files (path, size,
mtime), their dataset_info entries, the tokenizer's vocabulary and special tokens, the template and the
settings (the stage's data kind, cutoff_len, train_on_prompt, mask_history, max_samples, ...). Any change
makes a new key; `overwrite_cache: true` rebuilds it anyway. Large datasets are tokenized by worker processes
over all cores (the main process once; the other ranks read its cache).
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

import numpy as np

from trainer.data import formats, registry
from trainer.data.kinds import DATA_KINDS, DataKind
from trainer.data.templates import Template
from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Columns process_rows writes besides input_ids and labels; the underscored ones are bookkeeping.
OUTCOME_COLUMNS = ("length", "trained", "_row", "_doc", "_error", "_truncated", "_no_labels")


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


# ---- tokenization, one batch of canonical examples at a time -------------------------------------------------
def labelled(ids: list[int], trained: np.ndarray, cutoff_len: int) -> dict:
    truncated = len(ids) > cutoff_len
    ids, trained = ids[:cutoff_len], trained[:cutoff_len]
    labels = np.where(trained, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
    count = int(trained[1:].sum())  # position 0 is never predicted (labels shift by one)
    return {"input_ids": ids, "labels": labels, "trained": count, "_truncated": truncated, "_no_labels": count == 0}


def encode_supervised(examples: list[dict], tokenizer, template: Template, data_args) -> list[list[dict]]:
    """Conversations -> one example each: the template's ids, labels on the assistant replies."""
    encoded = template.encode_batch(tokenizer, [(e["messages"], e["system"], e.get("tools") or "") for e in examples],
                                    data_args.train_on_prompt, data_args.mask_history)
    return [[labelled(ids, trained, data_args.cutoff_len)] for ids, trained in encoded]


def split_document(ids: list[int], cutoff_len: int) -> list[list[int]]:
    """Pieces of at most cutoff_len tokens. A last piece of a single token could train nothing (position 0 is
    never predicted), so it takes one token from the piece before it: every token of a document is trained."""
    pieces = [ids[i:i + cutoff_len] for i in range(0, len(ids), cutoff_len)]
    if len(pieces) > 1 and len(pieces[-1]) == 1 and cutoff_len > 2:
        pieces[-1] = pieces[-2][-1:] + pieces[-1]
        pieces[-2] = pieces[-2][:-1]
    return pieces


def encode_pretrain(examples: list[dict], tokenizer, template, data_args) -> list[list[dict]]:
    """Documents -> [BOS] text EOS, split into cutoff_len pieces (long documents are split, not cut)."""
    texts = [e["messages"][0]["content"] for e in examples]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id not in (None, tokenizer.eos_token_id) else None
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
        out.append([labelled(piece, np.ones(len(piece), dtype=bool), data_args.cutoff_len)
                    for piece in split_document(ids, data_args.cutoff_len)])
    return out


def llama_factory_budget(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """How LLaMA-Factory shares cutoff_len between a prompt and an answer (its infer_seqlen): a short answer keeps
    all of it, else a short prompt does, else both shrink in proportion. Returns (prompt, answer) lengths."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    target = min(max_target, target_len)
    return min(max(cutoff_len - target, 0), source_len), target


def prompt_and_answer(ids: list[int], trained: np.ndarray) -> tuple[list[int], list[int], np.ndarray]:
    """An encoded conversation -> (prompt ids, answer ids, the answer's trained mask): the answer runs from the first
    to the last trained token; what follows it (a template's suffix) goes, as in LLaMA-Factory, which budgets only
    the prompt and the answer."""
    first, last = int(np.argmax(trained)), len(trained) - int(np.argmax(trained[::-1]))
    return ids[:first], ids[first:last], trained[first:last]


def budgeted(prompt: list[int], answer: list[int], trained: np.ndarray, keep_prompt: int,
             keep_answer: int) -> tuple[list[int], list[int], int]:
    """The prompt cut to keep_prompt tokens and the answer to keep_answer, as one sequence: (ids, labels, trained
    tokens; position 0 is never predicted)."""
    prompt, answer, trained = prompt[:keep_prompt], answer[:keep_answer], trained[:keep_answer]
    labels = [IGNORE_INDEX] * len(prompt) + np.where(trained, np.asarray(answer, dtype=np.int64),
                                                     IGNORE_INDEX).tolist()
    return prompt + answer, labels, int(trained.sum()) if len(prompt) else int(trained[1:].sum())


def encode_pairwise(examples: list[dict], tokenizer, template: Template, data_args) -> list[list[dict]]:
    """Prompt + chosen and prompt + rejected, labels on each answer (its reply and stop token). One item per pair
    holding the two sequences end to end (`segments`: their lengths). As in LLaMA-Factory, the prompt and the
    longer answer share cutoff_len, so each sequence fits it; a pair left without a trained answer token is
    counted and dropped."""
    conversations = []
    for e in examples:
        for answer in (e["chosen"], e["rejected"]):
            conversations.append((e["messages"] + [{"role": "assistant", "content": answer}], e["system"],
                                  e.get("tools") or ""))
    encoded = template.encode_batch(tokenizer, conversations, oneturn=True)
    out = []
    for i in range(len(examples)):
        parts = [prompt_and_answer(ids, trained) for ids, trained in encoded[2 * i:2 * i + 2]]
        source = max(len(p) for p, _, _ in parts)
        keep_prompt, keep_answer = llama_factory_budget(source, max(len(a) for _, a, _ in parts),
                                                        data_args.cutoff_len)
        truncated = keep_prompt < source or any(len(a) > keep_answer for _, a, _ in parts)
        ids, labels, segments, counts = [], [], [], []
        for prompt, answer, trained in parts:
            seq, seq_labels, count = budgeted(prompt, answer, trained, keep_prompt, keep_answer)
            ids += seq
            labels += seq_labels
            segments.append(len(seq))
            counts.append(count)
        out.append([{"input_ids": ids, "labels": labels, "segments": segments, "trained": sum(counts),
                     "_truncated": truncated, "_no_labels": min(counts) == 0}])
    return out


DATA_KINDS.register("supervised")(DataKind("supervised", encode_supervised))
# pt reads plain documents: the 'text' column (or columns.prompt), split into cutoff_len pieces
DATA_KINDS.register("pretrain")(DataKind("pretrain", encode_pretrain, formatting="text", documents=True))
DATA_KINDS.register("pairwise")(DataKind("pairwise", encode_pairwise, convert=formats.pairwise, segmented=True,
                                         columns={"segments": ("int32 list", [])}))


def row_capacity(cutoff_len: int, segmented: bool) -> int:
    """Tokens a packed row holds: cutoff_len, or for preference pairs (each of the two sequences within cutoff_len)
    two cutoff_lens, so that every pair fits a row."""
    return cutoff_len * (2 if segmented else 1)


def check_rows(kind: DataKind, spec: registry.DatasetSpec, columns: list[str]) -> None:
    """Before any row is converted: the dataset is of a kind these rows can be, and its columns are there."""
    if kind.check is not None:
        kind.check(spec, columns)
    else:
        formats.check_rows(spec, columns, pairwise_kind=kind.segmented)


def process_rows(batch: dict[str, list], spec: registry.DatasetSpec, data_kind: str, tokenizer, template,
                 data_args, doc_offset: int = 0) -> dict[str, list]:
    """A batch of raw rows (with their `_row` numbers) -> one output row per example, and one per bad row."""
    kind = DATA_KINDS.lookup(data_kind)
    convert = (kind.convert or formats.FORMATTERS[spec.formatting])(spec)
    extra = kind.columns
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels") + OUTCOME_COLUMNS + tuple(extra)}
    names = list(batch)

    def bad_row(number: int, error: str) -> None:
        bad = {"input_ids": [], "labels": [], "length": 0, "trained": 0, "_row": number, "_doc": number + doc_offset,
               "_error": error, "_truncated": False, "_no_labels": False,
               **{k: default for k, (_, default) in extra.items()}}
        for k in out:
            out[k].append(bad[k])

    good, good_rows = [], []
    for i, number in enumerate(batch["_row"]):
        example = convert({k: batch[k][i] for k in names})
        if example["_error"]:
            bad_row(number, example["_error"])
        else:
            good.append(example)
            good_rows.append(number)
    if good:
        for number, pieces in zip(good_rows, _encode(kind, good, tokenizer, template, data_args)):
            if isinstance(pieces, str):
                bad_row(number, pieces)
                continue
            for piece in pieces:
                for k in ("input_ids", "labels", "trained", "_truncated", "_no_labels") + tuple(extra):
                    out[k].append(piece[k])
                out["length"].append(len(piece["input_ids"]))
                out["_row"].append(number)
                out["_doc"].append(number + doc_offset)
                out["_error"].append("")
    return out


def _encode(kind: DataKind, examples: list[dict], tokenizer, template, data_args) -> list:
    """A batch encoded in one go; when the template cannot write some example (tool JSON it cannot read, a call its
    tool format refuses: ValueError), each example alone, the failing ones becoming their reason (a bad row)."""
    try:
        return kind.encode(examples, tokenizer, template, data_args)
    except ValueError:
        pass
    out = []
    for example in examples:
        try:
            out += kind.encode([example], tokenizer, template, data_args)
        except ValueError as e:
            out.append(f"the template cannot write this row: {e}")
    return out


def column_values(data, name: str) -> list:
    """One column as a Python list, in one read (indexing a datasets Column costs ~30 us an element)."""
    return data.select_columns([name])[:][name]


def keep_reason(error: str, truncated: bool, no_labels: bool, cutoff_policy: str) -> str:
    """Why an output row of process_rows is not trained on ('' when it is): the one rule for cache and stream."""
    if error:
        return "bad"
    if truncated and cutoff_policy == "drop":
        return "dropped_long"
    if no_labels:
        return "no_labels"
    return ""


# ---- the cache ------------------------------------------------------------------------------------------------
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
        "version": 2,
        "datasets": [[asdict(s), _file_fingerprint(s)] for s in specs],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "template": repr(template),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    root = os.environ.get("ZEROTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zerotune")
    return Path(root) / "tokenized"


PARALLEL_FROM_ROWS = 20_000  # below this, starting worker processes costs more than it saves


def _num_proc(requested: int | None, rows: int) -> int | None:
    """Every core by default (preprocessing_num_workers caps it); one process for small data."""
    cores = os.cpu_count() or 1
    workers = cores if requested is None else min(requested, cores)
    if workers <= 1 or rows < PARALLEL_FROM_ROWS:
        return None
    return workers


def _features(data_kind: str):
    """Fixed column types: a batch of only bad rows still has int token lists, and int32 halves the cache."""
    from datasets import Features, Sequence, Value

    types = {"int32 list": Sequence(Value("int32")), "int8": Value("int8"), "string": Value("string")}
    extra = {k: types[tp] for k, (tp, _) in DATA_KINDS.lookup(data_kind).columns.items()}
    return Features({**extra, "input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "length": Value("int32"), "trained": Value("int32"), "_row": Value("int64"),
                     "_doc": Value("int64"), "_error": Value("string"), "_truncated": Value("bool"),
                     "_no_labels": Value("bool")})


def _tokenize_one(spec, data_args, data_kind: str, tokenizer, template: Template | None, doc_offset: int):
    report = DataReport()
    rows = registry.load_rows(spec)
    if data_args.max_samples is not None:
        rows = rows.select(range(min(data_args.max_samples, len(rows))))
    report.read = len(rows)
    kind = DATA_KINDS.lookup(data_kind)
    spec.formatting = kind.formatting or spec.formatting
    check_rows(kind, spec, rows.column_names)
    tokenized = rows.map(process_rows, batched=True, batch_size=data_args.preprocessing_batch_size,
                         remove_columns=rows.column_names, features=_features(data_kind), num_proc=_num_proc(data_args.preprocessing_num_workers,
                                                                              len(rows)),
                         fn_kwargs=dict(spec=spec, data_kind=data_kind, tokenizer=tokenizer, template=template,
                                        data_args=data_args, doc_offset=doc_offset),
                         desc=f"Tokenizing {spec.name}")
    outcome = tokenized.select_columns(["_error", "_row", "_truncated", "_no_labels", "length", "trained"]).to_dict()
    reasons = [keep_reason(e, t, n, data_args.cutoff_policy)
               for e, t, n in zip(outcome["_error"], outcome["_truncated"], outcome["_no_labels"])]
    bad = [(row, err) for row, err in zip(outcome["_row"], outcome["_error"]) if err]
    report.bad = len(bad)
    report.bad_samples = [f"{spec.name} ({spec.path}) row {r}: {why}" for r, why in bad[:5]]
    allowed = data_args.max_bad_rows * report.read if data_args.max_bad_rows < 1 else data_args.max_bad_rows
    if report.bad > allowed:
        raise ConfigError(
            f"dataset {spec.name!r} ({spec.path}): {report.bad} of {report.read} rows are malformed, more than "
            f"max_bad_rows={data_args.max_bad_rows} allows. First ones: " + "; ".join(report.bad_samples)
            + ". Fix the rows, map the right columns in dataset_info.json, or raise max_bad_rows.")
    report.dropped_long = reasons.count("dropped_long")
    report.no_labels = reasons.count("no_labels")
    keep = np.flatnonzero(np.array([not r for r in reasons], dtype=bool))
    truncated = np.asarray(outcome["_truncated"], dtype=bool)
    report.truncated = int(truncated[keep].sum()) if len(keep) else 0
    report.examples = len(keep)
    report.tokens = int(np.asarray(outcome["length"], dtype=np.int64)[keep].sum()) if len(keep) else 0
    report.label_tokens = int(np.asarray(outcome["trained"], dtype=np.int64)[keep].sum()) if len(keep) else 0
    if len(keep) < len(tokenized):
        tokenized = tokenized.select(keep)
    return tokenized.remove_columns(["_error", "_truncated", "_no_labels"]), report


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

    DATA_KINDS.lookup(data_kind)
    specs = [registry.get_spec(n, data_args.dataset_dir) for n in names]
    settings = {"data_kind": data_kind, "cutoff_len": data_args.cutoff_len, "train_on_prompt": data_args.train_on_prompt,
                "mask_history": data_args.mask_history, "max_samples": data_args.max_samples,
                "cutoff_policy": data_args.cutoff_policy, "max_bad_rows": data_args.max_bad_rows}
    key = cache_key(specs, tokenizer, template, settings)
    root = Path(data_args.tokenized_cache_dir) if data_args.tokenized_cache_dir else default_cache_dir()
    path = root / key
    if is_published(path) and not rebuild:
        logger.info("Reusing tokenized data for %s from %s (overwrite_cache: true rebuilds it).", ",".join(names), path)
        return load_published(path)

    parts, total = [], DataReport()
    for spec in specs:
        tokenized, report = _tokenize_one(spec, data_args, data_kind, tokenizer, template, doc_offset=total.read)
        _log_report(spec.name, report, data_args.cutoff_len)
        if report.examples == 0:
            raise ConfigError(f"dataset {spec.name!r} ({spec.path}) yields no usable examples: {report.read} rows read, "
                              f"{report.bad} malformed, {report.dropped_long} too long, {report.no_labels} without trained tokens. "
                              + ("; ".join(report.bad_samples)))
        parts.append(tokenized)
        total.merge(report)
    data = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    publish(data, total, path)
    return load_published(path)


def publish(data, report: DataReport, path: Path) -> None:
    """Write tokenized data and its report beside `path`, then rename: a killed run never leaves a half-written
    folder that looks complete, and a reader holding an older copy keeps its files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    data.save_to_disk(str(tmp / "data"))
    (tmp / "zerotune_report.json").write_text(json.dumps(asdict(report)))
    if path.exists():  # a rebuild: move the old copy aside first
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        try:
            os.replace(path, old)
        except OSError:
            pass
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process published the same data meanwhile: it is identical, use it
        shutil.rmtree(tmp, ignore_errors=True)


def is_published(path) -> bool:
    return (Path(path) / "zerotune_report.json").is_file() and (Path(path) / "data").is_dir()


def load_published(path) -> tuple[Any, DataReport]:
    import datasets

    report = DataReport(**json.loads((Path(path) / "zerotune_report.json").read_text()))
    return datasets.load_from_disk(str(Path(path) / "data")), report


def tokenized_path_dataset(path: str, names: list[str], data_args, data_kind: str, tokenizer, template,
                           rebuild: bool):
    """LLaMA-Factory's tokenized_path: load the tokenized data saved there, or tokenize and save it there first."""
    if is_published(path) and not rebuild:
        logger.info("Loading tokenized data from tokenized_path %s (the dataset settings are not read again).", path)
        return load_published(path)
    if Path(path).exists() and any(Path(path).iterdir()) and not is_published(path):
        raise ConfigError(f"tokenized_path: {path!r} exists but holds no data zerotune saved; choose an empty or new "
                          "folder.")
    data, report = tokenized_dataset(names, data_args, data_kind, tokenizer, template, rebuild)
    publish(data, report, Path(path))
    logger.info("Saved the tokenized data to tokenized_path %s; later runs load it from there.", path)
    return load_published(path)


def split_validation(data, val_size: float, seed: int, by_document: bool = False):
    """val_size < 1 is a fraction, >= 1 a count, as in LLaMA-Factory. by_document (pt): whole documents go to one
    side, so no piece of an eval document is trained on; val_size then counts documents."""
    if not val_size:
        return data, None
    if not by_document:
        size = int(val_size) if val_size >= 1 else val_size
        if isinstance(size, int) and size >= len(data):
            raise ConfigError(f"val_size: {val_size} leaves no training data ({len(data)} examples in all).")
        split = data.train_test_split(test_size=size, seed=seed)
        return split["train"], split["test"]
    docs = np.asarray(column_values(data, "_doc"))
    unique = np.unique(docs)
    n_eval = int(val_size) if val_size >= 1 else max(1, int(round(val_size * len(unique))))
    if n_eval >= len(unique):
        raise ConfigError(f"val_size: {val_size} leaves no training data ({len(unique)} documents in all).")
    held = np.random.default_rng(seed).permutation(unique)[:n_eval]
    in_eval = np.isin(docs, held)
    return data.select(np.flatnonzero(~in_eval)), data.select(np.flatnonzero(in_eval))
