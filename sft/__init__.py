"""SFT Studio's engine: instruction fine-tuning of GPT-2, the workflow of chapter 7 of
*Build a Large Language Model (From Scratch)*.

Every name the chapter defines or imports is importable from here with the chapter's
signature and behaviour, e.g. ``from sft import format_input, GPTModel, train_model_simple``.
Richer paths (the Trainer, batched KV-cache generation, the judge client) sit beside them.

Names resolve lazily (PEP 562) so ``import sft`` stays cheap: torch is imported only
when a name that needs it is first used.
"""
from importlib import import_module

__version__ = "0.1.0"

# name -> module that defines it, grouped by pipeline stage.
_EXPORTS = {
    # tokenizer.py
    "get_tokenizer": "tokenizer",
    "text_to_token_ids": "tokenizer",
    "token_ids_to_text": "tokenizer",
    # data.py
    "download_and_load_file": "data",
    "load_instruction_data": "data",
    "validate_entries": "data",
    "DataValidationError": "data",
    "split_data": "data",
    "length_stats": "data",
    # prompts.py
    "format_input": "prompts",
    "PromptStyle": "prompts",
    "Alpaca": "prompts",
    "Phi3": "prompts",
    "get_prompt_style": "prompts",
    "PROMPT_STYLES": "prompts",
    # batching.py
    "InstructionDataset": "batching",
    "custom_collate_draft_1": "batching",
    "custom_collate_draft_2": "batching",
    "custom_collate_fn": "batching",
    "create_data_loaders": "batching",
    "batch_anatomy": "batching",
    "pretraining_checks": "batching",
    # model.py
    "GPTModel": "model",
    "MultiHeadAttention": "model",
    "LayerNorm": "model",
    "GELU": "model",
    "FeedForward": "model",
    "TransformerBlock": "model",
    "BASE_CONFIG": "model",
    "model_configs": "model",
    "model_config": "model",
    # weights.py
    "download_and_load_gpt2": "weights",
    "load_gpt2_params_from_tf_ckpt": "weights",
    "load_weights_into_gpt": "weights",
    "download_hf_gpt2": "weights",
    "load_hf_safetensors_into_gpt": "weights",
    "save_finetuned": "finetuned",
    "load_finetuned": "finetuned",
    # training.py
    "calc_loss_batch": "training",
    "calc_loss_loader": "training",
    "evaluate_model": "training",
    "generate_and_print_sample": "training",
    "train_model_simple": "training",
    "plot_losses": "training",
    "TrainConfig": "config",
    "Trainer": "training",
    # generation.py
    "generate": "generation",
    "generate_text_simple": "generation",
    "extract_response": "generation",
    "generate_batch": "generation",
    "generate_responses": "generation",
    # judge.py
    "query_model": "judge",
    "check_if_running": "judge",
    "generate_model_scores": "judge",
    "parse_score": "judge",
    "OllamaClient": "judge_client",
    # runs.py
    "Run": "runs",
    # data.py (more)
    "parse_records": "data",
    "CHAPTER_URL": "data",
    "ALPACA_52K_URL": "data",
    # prompts.py (more)
    "split_ids": "prompts",
    "register_prompt_style": "prompts",
    "prompt_token_count": "prompts",
    # batching.py (more)
    "get_batch": "batching",
    "LengthGroupedBatchSampler": "batching",
    # model.py (more)
    "KVCache": "model",
    "MODEL_NAMES": "model",
    "count_parameters": "model",
    "TINY_NAME": "model",
    # weights.py (more)
    "load_pretrained": "weights",
    "download_weights": "weights",
    "weights_available": "weights",
    "finetuned_filename": "finetuned",
    "finetuned_info": "finetuned",
    "load_gpt2_params_from_safetensors": "weights",
    "download_file": "download",
    "assign": "weights",
    "DownloadError": "download",
    # training.py (more)
    "ConfigError": "config",
    "TrainingError": "config",
    "oom_advice": "config",
    # generation.py (more)
    "generate_stream": "generation",
    # judge.py (more)
    "score_responses": "judge",
    "judge_prompt": "judge",
    "load_entries": "judge",
    "response_keys": "judge",
    "scored_records": "judge",
    "default_scores_path": "judge",
    # judge_client.py (more)
    "OpenAIClient": "judge_client",
    "make_client": "judge_client",
    "ollama_status": "judge_client",
    "model_available": "judge_client",
    "ServerStatus": "judge_client",
    "JudgeError": "judge_client",
    "ServerUnavailableError": "judge_client",
    "ModelNotFoundError": "judge_client",
    "JudgeTimeoutError": "judge_client",
    "MalformedResponseError": "judge_client",
    "JudgeHTTPError": "judge_client",
    # judge_stats.py (more)
    "ScoreStore": "judge_stats",
    "summarize_scores": "judge_stats",
    "compare_scores": "judge_stats",
    "judge_agreement": "judge_stats",
    "bootstrap_mean_interval": "judge_stats",
    # runs.py (more)
    "list_runs": "runs",
    "RunError": "runs",
    "DeviceBusyError": "runs",
    # hardware.py (more)
    "resolve_device": "hardware",
    "resolve_precision": "hardware",
    "bf16_is_fast": "hardware",
    "device_summary": "hardware",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sft' has no attribute {name!r}")
    value = getattr(import_module(f"sft.{module}"), name)
    globals()[name] = value  # resolve once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
