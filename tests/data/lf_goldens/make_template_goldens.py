"""Golden token ids and labels from LLaMA-Factory 0.9.5 for every template zerotune shares with it.

Run once, from the repository root, with a Python that has LLaMA-Factory (not zerotune's .venv):
    python3 -m venv /tmp/lf && /tmp/lf/bin/pip install torch==2.13.0 llamafactory==0.9.5
    /tmp/lf/bin/pip uninstall -y torchvision torchaudio && /tmp/lf/bin/python benchmarks/peers_env.py
    /tmp/lf/bin/python tests/data/lf_goldens/make_template_goldens.py
It builds (or reuses) the test tokenizer in tests/data/lf_goldens/tokenizer (byte-level BPE from tests/tiny.py,
holding every special token the templates use, bos <s>, eos </s>), and writes templates.json.gz: per template and
conversation, the ids and labels LLaMA-Factory's own processors give (SupervisedDatasetProcessor for SFT, with and
without mask_history, thinking on and off; PairwiseDatasetProcessor for preference pairs; encode_oneturn with an
empty reply for generation prompts, as its chat does). LF ties gemma3, gemma4, llama4, qwen3_5*, ministral3 and
mistral_small to a multimodal plugin that wants the model's processor even for text; their text path is the base
plugin's, so that plugin is used here (marked in the output). The date in llama3's tool prompt is frozen.
"""

import copy
import gzip
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conversations import CONVERSATIONS, PAIRS  # noqa: E402  (tests/data/lf_goldens/conversations.py)

TOKENIZER = HERE / "tokenizer"


def special_tokens() -> list[str]:
    """Every special-looking marker of the template table, the thought and tool-call words."""
    from trainer.data.template_table import TABLE

    pattern = re.compile(r"<\|[^|<>]*\|>|<｜[^｜]*｜>|<[a-z_]+_of_(?:turn|sentence)>|<beginning_of_sentence>|<\|turn>|"
                         r"<turn\|>|<\|channel>|<channel\|>|<\|tool>|<tool\|>|\[/?[A-Z_]+\]|\[gMASK\]|<sop>|"
                         r"\[\|[a-z]+\|\]|\]~!b\[|\]~b\]|\[e~\[|</?think>|</?tool_call>|</?seed:think>")
    found = {"<s>", "</s>", "<eos>", "<bos>", "<|endoftext|>"}
    for entry in TABLE.values():
        for value in entry.values():
            for text in (value if isinstance(value, tuple) else (value,)):
                if isinstance(text, str):
                    found.update(pattern.findall(text))
    return sorted(found)


def tokenizer():
    from transformers import AutoTokenizer

    if not (TOKENIZER / "tokenizer.json").exists():
        from tiny import build_tokenizer

        TOKENIZER.mkdir(parents=True, exist_ok=True)
        tok = build_tokenizer(TOKENIZER, special=special_tokens(), eos="</s>")
        tok.bos_token = "<s>"
        tok.save_pretrained(TOKENIZER)
    return AutoTokenizer.from_pretrained(TOKENIZER)


def main() -> None:
    from datetime import datetime

    import llamafactory.data.tool_utils as tool_utils
    from dataclasses import replace

    from llamafactory.data.mm_plugin import BasePlugin, get_mm_plugin
    from llamafactory.data.processor.pairwise import PairwiseDatasetProcessor
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.data.template import TEMPLATES, ReasoningTemplate, get_template_and_fix_tokenizer
    from trainer.data.template_table import TABLE

    class FrozenDate(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 3)

    tool_utils.datetime = FrozenDate
    out = {"llamafactory": "0.9.5", "templates": {}}
    for name in sorted(TABLE):
        reasoning = isinstance(TEMPLATES[name], ReasoningTemplate)
        modes = [dict(enable_thinking=True, mask_history=False), dict(enable_thinking=True, mask_history=True)]
        if reasoning:
            modes += [dict(enable_thinking=False, mask_history=False), dict(enable_thinking=False, mask_history=True)]
        cases = []
        for mode in modes:
            tok = tokenizer()
            args = SimpleNamespace(template=name, tool_format=None, default_system=None, train_on_prompt=False,
                                   preserve_thinking=False, cutoff_len=100000, **mode)
            template = get_template_and_fix_tokenizer(tok, args)
            if type(template.mm_plugin) is not BasePlugin:  # LF wants the model's processor even for text: its
                template = replace(template, mm_plugin=get_mm_plugin("base"))  # text path is the base plugin's
            assert len(tok) == len(tokenizer()), f"{name}: LLaMA-Factory added tokens: the test tokenizer lacks some"
            sft = SupervisedDatasetProcessor(template=template, tokenizer=tok, processor=None, data_args=args)
            pairs = PairwiseDatasetProcessor(template=template, tokenizer=tok, processor=None, data_args=args)
            for key, conv in CONVERSATIONS.items():
                messages, system, tools = copy.deepcopy(conv["messages"]), conv["system"], conv["tools"]
                try:
                    ids, labels = sft._encode_data_example(messages[:-1], messages[-1:], system, tools, [], [], [])
                except (ValueError, RuntimeError) as e:  # e.g. GLM-4's tool format has no parallel calls
                    cases.append(dict(kind="sft", conversation=key, **mode, error=str(e)))
                    continue
                cases.append(dict(kind="sft", conversation=key, **mode, input_ids=ids, labels=labels))
                if not mode["mask_history"]:
                    prompt, _ = template.encode_oneturn(tok, messages[:-1] + [{"role": "assistant", "content": ""}],
                                                        system, tools)
                    cases.append(dict(kind="prompt", conversation=key, **mode, input_ids=prompt))
            if mode["mask_history"]:
                continue
            for key, pair in PAIRS.items():
                c_ids, c_labels, r_ids, r_labels = pairs._encode_data_example(
                    copy.deepcopy(pair["prompt"]), copy.deepcopy(pair["answers"]), pair["system"], "", [], [], [])
                cases.append(dict(kind="pair", conversation=key, **mode, input_ids=[c_ids, r_ids],
                                  labels=[c_labels, r_labels]))
        out["templates"][name] = cases
    with gzip.open(HERE / "templates.json.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {HERE / 'templates.json.gz'}: {sum(len(c) for c in out['templates'].values())} cases")


if __name__ == "__main__":
    main()
