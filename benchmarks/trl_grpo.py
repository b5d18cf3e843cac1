"""TRL's GRPOTrainer on the GRPO benchmark set, for benchmarks/grpo.py (runs inside .venv-trl).

The same prompts (examples/data/arithmetic_demo.json, as user turns rendered with the same ChatML zerotune's
`template: chatml` writes), the same reward function (examples/grpo_rewards.py:exact_sum, which TRL calls with the
row's `answer` column), LoRA r=16, alpha=32 on all linear layers; TRL's defaults otherwise. The log history goes to
<out>/log_history.json.
"""

import argparse
import importlib.util
import json
from pathlib import Path

from trl_sft import CHATML  # run as a script: its folder is on sys.path; one ChatML for both TRL runs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)  # completions a step
    p.add_argument("--generations", type=int, required=True)
    p.add_argument("--completion", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--beta", type=float, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bf16", action="store_true", help="GRPOConfig's own default; off: fp32")
    a = p.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("grpo_rewards", root / "examples/grpo_rewards.py")
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)
    rows = json.loads((root / "examples/data/arithmetic_demo.json").read_text())[: a.prompts]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}], "answer": r["answer"]}
                              for r in rows])
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.chat_template = CHATML
    config = GRPOConfig(output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                        num_generations=a.generations, max_completion_length=a.completion, beta=a.beta,
                        learning_rate=a.lr, max_steps=a.steps, logging_steps=1, use_cpu=True, report_to="none",
                        save_strategy="no", bf16=a.bf16, seed=a.seed)
    trainer = GRPOTrainer(model=a.model, reward_funcs=rewards.exact_sum, args=config, train_dataset=data,
                          processing_class=tok,
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    result = trainer.train()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_results.json").write_text(json.dumps(result.metrics))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    main()
