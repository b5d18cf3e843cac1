"""LLaMA-Factory's YAML keys that zerotune does not take as they are: features it refuses by name, keys it ignores
out loud, and keys it maps. config.py consults this before calling anything an unknown key, so a LLaMA-Factory user
reads "image_max_pixels: multimodal inputs are not supported" rather than "Unknown key 'image_max_pixels'".

Taken from LLaMA-Factory's hparams and its own example YAMLs (train, merge, inference, extras). The README's
"Coming from LLaMA-Factory" section lists the same features.
"""

from __future__ import annotations

from trainer.errors import ConfigError

# feature -> (the keys that ask for it, why / what to do instead)
REFUSED: dict[str, tuple[tuple[str, ...], str]] = {
    "multimodal inputs": (
        ("image_max_pixels", "image_min_pixels", "video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen",
         "audio_sampling_rate", "use_audio_in_video", "crop_to_patches", "image_do_pan_and_scan", "media_dir",
         "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model"),
        "multimodal inputs are not supported; zerotune trains text-only causal language models"),
    "DFT / ASFT / EAFT losses": (("use_dft_loss", "use_asft_loss", "asft_alpha", "use_eaft_loss", "eaft_alpha"),
                                 "these loss variants are not supported; sft trains plain cross-entropy"),
    "OFT": (("oft_rank", "oft_block_size", "oft_target", "module_dropout"),
            "OFT is not supported; use finetuning_type lora, freeze or full"),
    "LLaMA Pro": (("use_llama_pro",), "LLaMA Pro block expansion is not supported"),
    "mixture of depths": (("mixture_of_depths",), "mixture-of-depths conversion is not supported"),
    "shift short attention": (("shift_attn",), "S^2-Attn (shift_attn) is not supported"),
    "Unsloth": (("use_unsloth", "use_unsloth_gc"),
                "Unsloth is not supported; zerotune's own kernels and Liger (enable_liger_kernel) are used"),
    "vocabulary changes": (("resize_vocab", "add_tokens", "add_special_tokens", "new_special_tokens_config",
                            "init_special_tokens", "split_special_tokens"), "changing the vocabulary is not supported"),
    "pure bf16": (("pure_bf16",), "pure bf16 training is not supported; bf16: true trains with fp32 master weights"),
    "FP8": (("fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather"), "FP8 training is not supported"),
    "Ray": (("ray_num_workers", "ray_init_kwargs", "ray_run_name", "ray_storage_path", "resources_per_worker",
             "placement_strategy"), "Ray is not supported; launch with zerotune train, torchrun or deepspeed"),
    "KTransformers": (("use_kt", "kt_config", "kt_cpu_activation", "kt_weight_path", "kt_non_expert_weight_path",
                       "kt_expert_checkpoint_path", "kt_lora_expert_intermediate_size", "kt_lora_expert_num",
                       "kt_use_lora_experts"), "KTransformers is not supported"),
    "Megatron": (("tensor_model_parallel_size", "pipeline_model_parallel_size", "sequence_parallel",
                  "context_parallel_size", "expert_model_parallel_size", "use_distributed_optimizer",
                  "overlap_grad_reduce", "overlap_param_gather", "apply_rope_fusion", "bias_activation_fusion",
                  "moe_grouped_gemm", "moe_token_dispatcher_type", "recompute_granularity", "export_hf_on_finish",
                  "mixed_precision", "use_packed_sequences", "use_mca", "use_megatron_bridge"),
                 "Megatron tensor/pipeline parallelism is not supported; ZeRO-3 or FSDP shard the model"),
    "hyper-parallel": (("use_hyper_parallel", "hyper_parallel_args", "hyper_parallel_cp_size"),
                       "hyper-parallel training is not supported"),
    "SwanLab": (("use_swanlab", "swanlab_project", "swanlab_workspace", "swanlab_run_name", "swanlab_mode",
                 "swanlab_api_key", "swanlab_logdir", "swanlab_lark_webhook_url", "swanlab_lark_secret"),
                "SwanLab's own keys are not supported; report_to: wandb (or any transformers integration) logs"),
    "the torch profiler": (("enable_torch_profiler", "profile_modules", "profiler_active_steps", "profiler_output_dir",
                            "profiler_profile_memory", "profiler_record_shapes", "profiler_repeat",
                            "profiler_wait_steps", "profiler_warmup_steps", "profiler_with_stack"),
                           "LLaMA-Factory's profiler keys are not supported"),
    "preference and RL stages": (
        ("pref_bco_weight", "ld_alpha", "ref_model_quantization_bit", "reward_model_quantization_bit"),
        "BCO, LD-DPO and a quantized ref_model or reward_model are not implemented yet"),
    "export to the hub and quantized export": (
        ("export_hub_model_id", "export_quantization_bit", "export_quantization_dataset", "export_quantization_maxlen",
         "export_quantization_nsamples"),
        "zerotune export writes export_dir (16-bit or fp32 safetensors); push it with `huggingface-cli upload`, "
        "and quantize it with your serving tool"),
    "generation metrics": (("eval_num_beams", "compute_accuracy"),
                           "do_eval computes eval_loss; do_predict with predict_with_generate generates and scores"),
    "vLLM and SGLang backends": (("vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank",
                                  "vllm_config", "sglang_maxlen", "sglang_mem_fraction", "sglang_tp_size",
                                  "sglang_config", "sglang_lora_backend"),
                                 "zerotune generates with transformers (infer_backend: huggingface); to serve with "
                                 "vLLM or SGLang, export the model (zerotune export) and point them at export_dir"),
    "the evaluation harness": (("task", "task_dir", "n_shot", "lang", "save_dir", "download_mode"),
                               "llamafactory-cli eval's benchmark harness is not supported"),
    "dataset mixing and sharing": (("mix_strategy", "interleave_probs", "buffer_size", "data_shared_file_system"),
                                   "datasets are concatenated in the order given; interleaving is not supported"),
}

# Keys that change nothing in zerotune: accepted so that an LF YAML runs unchanged, with a log line saying so.
IGNORED: dict[str, str] = {
    "print_param_status": "diagnostic only",
    "disable_shuffling": "not supported; the train set is shuffled each epoch",
    "ddp_find_unused_parameters": "zerotune chooses this itself",
    "use_reentrant_gc": "gradient checkpointing is always non-reentrant (it composes with ZeRO-3 and FSDP)",
    "use_v1_kernels": "zerotune applies its own kernels, and Liger's with enable_liger_kernel: true",
    "upcast_layernorm": "norms compute in fp32 inside zerotune's kernels",
    "upcast_lmhead_output": "the loss head computes its softmax in fp32",
    "low_cpu_mem_usage": "weights load lazily anyway",
    "include_effective_tokens_per_second": "real (non-pad) tokens/s is always logged",
    "ignore_pad_token_for_loss": "padding never carries a label",
    "use_kv_cache": "generation always uses the KV cache",
    "max_length": "max_new_tokens bounds each answer",
}

_KEY_TO_FEATURE = {key: feature for feature, (keys, _) in REFUSED.items() for key in keys}

# finetuning_type values LF has and zerotune refuses by name.
REFUSED_VALUES = {("finetuning_type", "oft"): "OFT is not supported; use finetuning_type lora, freeze or full"}


def refusal(key: str) -> str | None:
    """The message for a LLaMA-Factory key whose feature zerotune does not support (None: not such a key)."""
    feature = _KEY_TO_FEATURE.get(key)
    if feature is None:
        return None
    return f"{key}: {REFUSED[feature][1]} (LLaMA-Factory feature: {feature})."


def check_values(raw: dict) -> None:
    for (key, value), why in REFUSED_VALUES.items():
        if str(raw.get(key, "")).lower() == value:
            raise ConfigError(f"{key}: {value}: {why}.")
