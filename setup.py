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
        # zerotune overrides or relies on internals of these four (trainer/upstream.py lists each one): each is capped
        # at the releases it is tested with, the ranges of upstream.TESTED (tests/test_versions.py checks both agree;
        # tests/test_upstream.py names any changed internal). 0.x packages change internals between minor releases,
        # so they are capped after the minor series tested (deepspeed 0.19, peft 0.21), accelerate after its major.
        "deepspeed>=0.16,<0.20",
        "transformers>=5.0,<5.25",
        "peft>=0.17,<0.22",
        "datasets>=3.0",
        "accelerate>=1.4,<2",
        "numpy",
        "pyyaml",
        "wandb",
        "matplotlib",
    ],
    extras_require={
        # liger-kernel: the 0.8 series from 0.8.5 (the newest release; it needs CUDA, so the CPU tests cannot run it).
        "gpu": ["flash-attn", "liger-kernel>=0.8.5,<0.9"],
        "metrics": ["jieba", "nltk", "rouge-chinese"],  # predict's BLEU-4 and ROUGE, as LLaMA-Factory computes them
        # use_adam_mini, use_apollo, use_galore, use_badam and the 8-bit `optim` values (engine/optimizers.py); each
        # capped after the release tested (bitsandbytes 0.50 has the CPU backend the tests run on).
        "optimizers": ["adam-mini>=1.1.1,<1.2", "apollo-torch>=1.0.3,<1.1", "galore-torch>=1.0,<1.1",
                       "badam>=1.4,<1.5", "bitsandbytes>=0.50,<0.51"],
        # QLoRA (quantization_bit): 0.50 is the first series tested, on CUDA and on its CPU backend; capped after it,
        # as upstream.TESTED is (zerotune reads its 4-bit weights' quant_state and turns off a CPU repacking).
        "qlora": ["bitsandbytes>=0.50,<0.51"],
        "dev": ["pytest", "pytest-timeout", "gguf", "jieba", "nltk", "rouge-chinese", "adam-mini>=1.1.1,<1.2",
                "apollo-torch>=1.0.3,<1.1", "galore-torch>=1.0,<1.1", "badam>=1.4,<1.5", "bitsandbytes>=0.50,<0.51"],
    },
    entry_points={"console_scripts": ["zerotune=trainer.cli:main"]},
)
