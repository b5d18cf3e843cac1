"""TRL's SFTTrainer on the benchmark set, for benchmarks/throughput.py (runs inside .venv-peers).

The tokenizer gets the same ChatML rendering zerotune uses (no default system prompt), so both tools
process the same tokens; LoRA r=8, alpha=16 on all linear layers, as in the zerotune runs.
"""

import argparse
import json
from pathlib import Path

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--cutoff", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    root = Path(__file__).resolve().parents[1]
    rows = json.loads((root / "examples/data/alpaca_en_demo.json").read_text())[: a.samples]
    data = Dataset.from_list([{"messages": [
        {"role": "user", "content": "\n".join(x for x in (r["instruction"], r["input"]) if x)},
        {"role": "assistant", "content": r["output"]}]} for r in rows])
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.chat_template = CHATML
    config = SFTConfig(output_dir=a.out, max_length=a.cutoff, packing=a.packing, per_device_train_batch_size=a.batch,
                       num_train_epochs=1, learning_rate=a.lr, bf16=a.bf16, use_cpu=True, report_to="none",
                       save_strategy="no", logging_steps=1000, gradient_checkpointing=True)
    trainer = SFTTrainer(model=a.model, args=config, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    result = trainer.train()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "train_results.json").write_text(json.dumps(result.metrics))


if __name__ == "__main__":
    main()
