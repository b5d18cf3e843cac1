from setuptools import find_packages, setup

setup(
    name="zerotune",
    version="0.1.0",
    description="Fast, exact fine-tuning of language models from one LLaMA-Factory style YAML.",
    packages=find_packages(include=["trainer", "trainer.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=5.0",
        "peft>=0.17",
        "datasets>=3.0",
        "accelerate>=1.4",
        "pyyaml",
        "wandb",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["flash-attn", "liger-kernel>=0.8.5"],
        "dev": ["pytest", "pytest-timeout", "gguf"],
    },
    entry_points={"console_scripts": ["zerotune=trainer.cli:main"]},
)
