from setuptools import find_packages, setup

setup(
    name="zerotune",
    version="0.1.0",
    description="Fast, exact fine-tuning of language models from one LLaMA-Factory style YAML.",
    packages=find_packages(include=["trainer", "trainer.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch.distributed.fsdp.fully_shard (FSDP2) is public from 2.6; SDPA's enable_gqa needs 2.5.
        "torch>=2.6",
        "deepspeed>=0.16",
        # The engine overrides private Trainer methods (trainer/engine/trainer.py, OVERRIDDEN): capped at the
        # releases it is tested with; tests/test_versions.py names any change.
        "transformers>=5.0,<5.25",
        "peft>=0.17",
        "datasets>=3.0",
        "accelerate>=1.4",
        "numpy",
        "pyyaml",
        "wandb",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["flash-attn", "liger-kernel>=0.8.5"],
        "metrics": ["jieba", "nltk", "rouge-chinese"],  # predict's BLEU-4 and ROUGE, as LLaMA-Factory computes them
        "dev": ["pytest", "pytest-timeout", "gguf", "jieba", "nltk", "rouge-chinese"],
    },
    entry_points={"console_scripts": ["zerotune=trainer.cli:main"]},
)
