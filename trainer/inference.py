"""zerotune chat and zerotune export: the trained model out of zerotune, through the one template and the one
generation function (trainer/generation.py).

Both load the base model with its adapters merged (adapter_name_or_path, a comma list merged in order), the
tokenizer, and the template training used. chat talks to it in the terminal, streaming tokens as they come;
export writes a model any tool loads: sharded weights, the tokenizer with the template as its chat_template (so
apply_chat_template reproduces the training format token for token), and a generation_config that stops at the
template's stop tokens.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from typing import TextIO

import torch

from trainer.errors import ConfigError

logger = logging.getLogger("trainer")


def inference_dtype(choice: str, model_dtype) -> torch.dtype:
    """infer_dtype: auto keeps the checkpoint's 16-bit dtype where this machine computes in it (bf16 on a GPU or a
    bf16 CPU, fp16 on a GPU), else fp32."""
    if choice != "auto":
        return getattr(torch, choice)
    from trainer.engine.hardware import cpu_supports_bf16

    if model_dtype == torch.bfloat16 and (torch.cuda.is_available() or cpu_supports_bf16()):
        return torch.bfloat16
    if model_dtype == torch.float16 and torch.cuda.is_available():
        return torch.float16
    return torch.float32


def load(config, device: str | None = None, dtype_choice: str | None = None, refuse_untrained: bool = False,
         exporting: bool = False):
    """(model with adapters merged, tokenizer, template), ready to generate. A template stop token whose rows are
    new to the base model and untouched by the adapters is refused (refuse_untrained) or warned about. With
    quantization_bit, chat runs the quantized base with the adapter beside it (unmerged, as trained), and export
    merges the adapter into the 16-bit base instead (_quantizes)."""
    from transformers import AutoConfig

    from trainer.data.templates import get_template
    from trainer.model.adapters import attach_adapter, merge_adapter, untrained_rows
    from trainer.model.loading import _check_local, load_causal_lm, load_tokenizer

    m = config.model
    _check_local(m.model_name_or_path)
    tokenizer = load_tokenizer(m)
    template = get_template(config.template, tokenizer, config)
    common = dict(trust_remote_code=m.trust_remote_code, cache_dir=m.cache_dir, revision=m.model_revision,
                  token=m.hf_hub_token)
    model_config = AutoConfig.from_pretrained(m.model_name_or_path, **common)
    dtype = inference_dtype(dtype_choice or config.inference.infer_dtype, getattr(model_config, "dtype", None))
    quantize = _quantizes(config, model_config, exporting)
    model = load_causal_lm(m, dtype=dtype, quantize=quantize)
    stops = template.stop_token_ids(tokenizer)
    base_rows = untrained_rows(model, stops)  # judged on the base, before the adapters: see _check_stop_rows
    for adapter in m.adapters:
        model = attach_adapter(model, adapter) if quantize else merge_adapter(model, adapter)
    _check_stop_rows(model, base_rows, tokenizer, template, config, refuse_untrained)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if quantize:  # bitsandbytes loaded it where it stays (quantization_device_map; a quantized model cannot move)
        device = str(next(model.parameters()).device)
        model.eval()
    else:
        model.to(device).eval()
    model.generation_config.eos_token_id = sorted(set(stops + [tokenizer.eos_token_id]))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("Generating on %s%s.", device, "" if not m.adapters else " with the adapter beside the quantized base"
                if quantize else " with the adapters merged")
    return model, tokenizer, template


def _quantizes(config, model_config, exporting: bool) -> bool:
    """Does quantization_bit apply to this load? To chat, yes (the model as trained). Export merges the adapter into
    the 16-bit weights the quantized ones were made from: the model trained was base(4-bit) + adapter, and the
    merged one computes that up to the 4-bit rounding of the base, in 16-bit weights any tool serves (LLaMA-Factory
    asks the user to drop quantization_bit for that: it refuses to merge into a quantized model). A checkpoint
    quantized ahead (GPTQ, AWQ, ...) has no 16-bit weights to merge into: its adapter cannot be exported merged."""
    from trainer.model.options import FinetuningArguments, check_quantization
    from trainer.model.quantization import prequantized_method

    m = config.model
    method = prequantized_method(model_config)
    if exporting and method and m.adapters:
        raise ConfigError(f"model_name_or_path {m.model_name_or_path!r} is quantized with {method}: an adapter cannot "
                          "be merged into its packed weights. Export from the model's 16-bit checkpoint (the adapter "
                          "applies to it), or serve the quantized model with the adapter beside it.")
    if m.quantization_bit is None:
        return False
    if exporting:
        logger.info("quantization_bit: %d applies to training and chat; export merges %s into the 16-bit weights of "
                    "%s, loaded unquantized (the merged model computes what training computed up to the %d-bit "
                    "rounding of the base weights).", m.quantization_bit, ", ".join(m.adapters) or "no adapter",
                    m.model_name_or_path, m.quantization_bit)
        return False
    check_quantization(m, FinetuningArguments(finetuning_type=config.finetuning_type), do_train=False, sharded=False)
    return True


def _check_stop_rows(model, base_rows: dict, tokenizer, template, config, refuse: bool) -> None:
    """A stop token whose embedding or head row looks untrained in the base model (new tokens) and that the adapters
    left exactly as it was: the model would not stop. A row the adapters changed at all was trained, however
    little (judging the trained row by its look alone refused rows that a few steps had trained)."""
    from trainer.model.adapters import rows_left_as_they_were

    left = rows_left_as_they_were(model, base_rows)
    if not left:
        return
    names = ", ".join(tokenizer.convert_ids_to_tokens(left))
    adapters = "the adapters" if config.model.adapters else "any adapter"
    why = (f"template {template.name!r} stops at {names}, whose embedding rows in {config.model.model_name_or_path} "
           f"look never trained (new tokens) and are unchanged by {adapters}: "
           "the model would not stop. Train them (LoRA trains them unless train_new_token_rows: false; or "
           "additional_target: embed_tokens,lm_head; or finetuning_type: full), or use the template the model was "
           "trained with")
    if refuse:
        raise ConfigError(why + "; export_untrained_stop_tokens: true exports anyway.")
    logger.warning("STOP TOKEN NOT TRAINED: %s.", why)


# ---- chat -------------------------------------------------------------------------------------------------------
class _Printer:
    """Streams the answer's text to `out` as tokens arrive (transformers' streamer protocol: put, end)."""

    def __init__(self, tokenizer, out: TextIO, skip_special_tokens: bool):
        from transformers import TextStreamer

        printer = self

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                printer.out.write(text + ("\n" if stream_end else ""))
                printer.out.flush()

        self.out = out
        self.streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=skip_special_tokens)


def answer(model, tokenizer, template, messages: list[dict], settings, out: TextIO | None = None,
           skip_special_tokens: bool = True) -> str:
    """The model's reply to a conversation ending with a user turn (streamed to `out` when given)."""
    from trainer.generation import generate

    prompt = template.encode_prompt(tokenizer, messages)
    streamer = _Printer(tokenizer, out, skip_special_tokens).streamer if out is not None else None
    [ids] = generate(model, [prompt], template.stop_token_ids(tokenizer), tokenizer.pad_token_id, settings,
                     batch_size=1, streamer=streamer)
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).strip()


HELP = "Type a message; /clear starts a new conversation, /exit quits."


def chat(config, message: str | None = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    model, tokenizer, template = load(config)
    skip = config.inference.skip_special_tokens
    if message is not None:  # one answer, for scripts
        stdout.write(answer(model, tokenizer, template, [{"role": "user", "content": message}], config.generation,
                            skip_special_tokens=skip) + "\n")
        return 0
    stdout.write(HELP + "\n")
    history: list[dict] = []
    while True:
        stdout.write("\nUser: ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            stdout.write("\n")
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/clear":
            history = []
            stdout.write("History cleared.\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        stdout.write("Assistant: ")
        reply = answer(model, tokenizer, template, history, config.generation, out=stdout, skip_special_tokens=skip)
        history.append({"role": "assistant", "content": reply})


# ---- export -----------------------------------------------------------------------------------------------------
def export(config) -> str:
    from trainer.model import value_head

    e = config.export
    if not e.export_dir:
        raise ConfigError("export_dir is required: the folder the merged model is written to.")
    if e.export_size <= 0:
        raise ConfigError(f"export_size: {e.export_size} must be a positive number of GB per shard.")
    device = "cpu" if e.export_device == "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, template = load(config, device=device, dtype_choice=e.export_dtype,
                                      refuse_untrained=not e.export_untrained_stop_tokens, exporting=True)
    out = e.export_dir
    os.makedirs(out, exist_ok=True)
    model.config.use_cache = True  # a served model generates with its cache
    model.save_pretrained(out, max_shard_size=f"{e.export_size}GB", safe_serialization=not e.export_legacy_format)
    tokenizer.chat_template = template.chat_template()
    tokenizer.save_pretrained(out)
    for folder in [*reversed(config.model.adapters), config.model.model_name_or_path]:  # a reward model's value head
        head = os.path.join(folder, value_head.FILE)
        if os.path.isfile(head):
            if value_head.saved_role(head) == "critic":  # ppo's value estimates: no part of a served model
                logger.info("Left out %s: a ppo run's critic, not a reward model.", head)
            else:
                shutil.copyfile(head, os.path.join(out, value_head.FILE))
            break
    logger.info("Exported to %s: weights in %s (shards of at most %d GB), the tokenizer with template %r as its "
                "chat_template, generation stopping at %s.", out, next(model.parameters()).dtype, e.export_size,
                template.name, tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id))
    return out
