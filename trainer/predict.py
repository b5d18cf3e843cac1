"""do_predict with predict_with_generate (stage sft, as in LLaMA-Factory): every eval example's last answer is
generated from its prompt with the one generation function, then scored.

The prompt is the example's tokens before its last trained span and the label is that span (the reply), both
from the same tokenized data training and eval read. Writes, in output_dir, generated_predictions.jsonl (prompt,
predict, label per line, in eval order) and predict_results.json with LLaMA-Factory's metric names
(predict_bleu-4, predict_rouge-1, predict_rouge-2, predict_rouge-l). The examples are split over the processes
(each running the same number of generate calls, so ZeRO-3 and FSDP can gather weights) and the answers shared.
"""

from __future__ import annotations

import json
import logging
import os
import time

from trainer.data.collators import last_trained_span

logger = logging.getLogger("trainer")


def prompt_and_label(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, label ids): the label is the last run of trained tokens (the last reply and its stop token)."""
    start, end = last_trained_span(list(labels))
    if start == end:
        return list(input_ids), []
    return list(input_ids[:start]), list(input_ids[start:end])


def predict(trainer, config, data, tokenizer, template) -> dict:
    from tqdm import tqdm

    from trainer.engine import similarity
    from trainer.engine.shards import gathered, my_rounds
    from trainer.generation import generate

    similarity.check_available()
    t = config.training
    examples = [prompt_and_label(ids, lab) for ids, lab in zip(data["input_ids"], data["labels"])]
    stops = template.stop_token_ids(tokenizer)
    world, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
    size = t.per_device_eval_batch_size
    rounds = list(my_rounds(len(examples), size, world, rank))
    answers: dict[int, list[int]] = {}
    start = time.perf_counter()
    model = trainer.model
    for indices, counts in tqdm(rounds, desc="predict", disable=t.disable_tqdm or not trainer.is_world_process_zero()):
        out = generate(model, [examples[i][0] for i in indices], stops, tokenizer.pad_token_id, config.generation,
                       batch_size=size)
        if counts:
            answers.update(zip(indices, out))
    answers = gathered(answers, world)
    runtime = time.perf_counter() - start
    skip = config.inference.skip_special_tokens
    predictions = [tokenizer.decode(answers[i], skip_special_tokens=skip).strip() for i in range(len(examples))]
    label_texts = [tokenizer.decode(label, skip_special_tokens=skip).strip() for _, label in examples]
    metrics = {f"predict_{k}": v for k, v in similarity.mean_scores(predictions, label_texts).items()}
    metrics.update({"predict_runtime": round(runtime, 4), "predict_samples": len(examples),
                    "predict_samples_per_second": round(len(examples) / max(runtime, 1e-9), 3)})
    if trainer.is_world_process_zero():
        os.makedirs(t.output_dir, exist_ok=True)
        path = os.path.join(t.output_dir, "generated_predictions.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for (prompt, _), predict_text, label in zip(examples, predictions, label_texts):
                f.write(json.dumps({"prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                                    "predict": predict_text, "label": label}, ensure_ascii=False) + "\n")
        logger.info("Wrote %d predictions to %s.", len(examples), path)
    trainer.log_metrics("predict", metrics)
    trainer.save_metrics("predict", metrics)
    return metrics
