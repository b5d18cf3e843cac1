"""transformers.TrainingArguments from the training group's keys: LLaMA-Factory's spellings mapped, the CPU settings
transformers needs, the report_to check, and each per-device batch split into passes (forward_batch_size)."""

from __future__ import annotations

import logging
import os

from trainer.engine.hardware import cpu_supports_bf16
from trainer.engine.options import EngineArguments, deepspeed_dict
from trainer.errors import ConfigError
from trainer.options import did_you_mean

logger = logging.getLogger(__name__)


# report_to names -> the package each integration needs (transformers' integrations, 5.x).
INTEGRATION_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "mlflow": "mlflow", "neptune": "neptune",
                        "tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb",
                        "codecarbon": "codecarbon", "clearml": "clearml", "dagshub": "dagshub", "flyte": "flytekit",
                        "dvclive": "dvclive", "swanlab": "swanlab", "kubeflow": "kubeflow"}


def check_report_to(value) -> None:
    """Unknown integrations with did-you-mean; known ones whose package is missing with the pip command to run."""
    if value is None:
        return
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    if names in (["none"], ["all"]):
        return
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, \
        get_available_reporting_integrations

    known = list(INTEGRATION_TO_CALLBACK)
    available = set(get_available_reporting_integrations())
    for name in names:
        if name not in known:
            raise ConfigError(f"report_to: {name!r} is not an integration.{did_you_mean(name, known, n=2)} Known: "
                              f"{', '.join(known)}, none.")
        if name not in available:
            package = INTEGRATION_PACKAGES.get(name, name)
            raise ConfigError(f"report_to: {name} needs the {package} package, which is not installed: "
                              f"pip install {package}")


def training_arguments(values: dict, engine: EngineArguments, streaming: bool = False,
                       split_rows: bool = True):
    import torch

    values = dict(values)
    values.setdefault("output_dir", "saves/zerotune")
    # Our collators read columns the model never sees; the Trainer must not drop them.
    values["remove_unused_columns"] = False
    cuda = torch.cuda.is_available()
    if not cuda:
        # Without a GPU, transformers (and DeepSpeed through it) only run with use_cpu=True.
        values.setdefault("use_cpu", True)
        if values.get("bf16") and not cpu_supports_bf16():
            logger.warning("bf16: true, but this CPU has no native bf16; training in fp32 instead.")
            values["bf16"] = False
        if values.get("fp16"):
            logger.warning("fp16: true has no effect without a GPU; training in fp32 (or set bf16: true).")
            values["fp16"] = False
    # LLaMA-Factory says gradient_checkpointing; transformers 5 renamed it activation_checkpointing.
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in values:
            values.setdefault(new, values.pop(old))
    if values.get("activation_checkpointing") is None and engine.disable_gradient_checkpointing:
        values["activation_checkpointing"] = False
    # Left unset, it is decided from the memory estimate once the model is known (plan.decide_checkpointing).
    values.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    values.setdefault("ddp_find_unused_parameters", False)
    if values.get("report_to") is None:
        values["report_to"] = "none"
    check_report_to(values["report_to"])
    if streaming:
        # accelerate would read a stream on the main process only and split each batch along its rows; padding-free
        # batches are one row, so every process reads the stream and keeps its own share of the items instead.
        values.setdefault("accelerator_config", {"dispatch_batches": False})
    split_batch(values, engine.forward_batch_size, cuda or not split_rows)
    if engine.sequence_parallel_size > 1:
        from trainer.engine.sequence_parallel import configure

        configure(values, engine.sequence_parallel_size)
    if values.get("deepspeed"):
        # Only now, with a config that passed every check: the process-wide environment it sets would otherwise
        # outlive a refused config in the same process.
        single_process_rendezvous()
    from transformers import TrainingArguments

    try:
        return TrainingArguments(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"Invalid training arguments: {err}") from None


def split_batch(values: dict, forward_batch_size: str, whole: bool) -> None:
    """Run per_device_train_batch_size as passes of forward_batch_size rows, accumulating gradients (auto: the
    whole batch when `whole`, one row a pass otherwise).

    The engine normalises the loss by the tokens of the whole accumulated batch, so the optimizer sees the
    same gradient either way; only the activations held at once shrink. Done here, before TrainingArguments
    exist, so DeepSpeed's "auto" batch values and accelerate's accumulation are filled from the split.
    """
    per = int(values.get("per_device_train_batch_size", 8))  # TrainingArguments' default
    text = str(forward_batch_size).strip().lower()
    if text == "auto":
        rows, explicit = (per if whole else 1), False
    elif text.isdigit() and int(text) > 0:
        rows, explicit = int(text), True
    else:
        raise ConfigError(f"forward_batch_size: {forward_batch_size!r} is neither auto nor a positive integer.")
    if rows >= per:
        return
    if per % rows:
        raise ConfigError(f"forward_batch_size: {rows} does not divide per_device_train_batch_size: {per}; "
                          "pick a divisor so every pass holds the same number of rows.")
    ds = deepspeed_dict(values.get("deepspeed"))
    fixed = [k for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
             if ds.get(k, "auto") != "auto"]
    if fixed:
        if explicit:
            raise ConfigError(f"forward_batch_size: {rows} needs the DeepSpeed config's {', '.join(fixed)} set to "
                              '"auto" (zerotune fills them from the split batch).')
        return  # the user's DeepSpeed config fixes the batch shape: leave it as written
    values["per_device_train_batch_size"] = rows
    values["gradient_accumulation_steps"] = int(values.get("gradient_accumulation_steps", 1)) * (per // rows)


def single_process_rendezvous() -> None:
    """DeepSpeed without a launcher looks for MPI; TrainingArguments set it up as they are built: give it a
    one-process torch rendezvous instead. Launched runs (torchrun, deepspeed) keep theirs."""
    if "WORLD_SIZE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
