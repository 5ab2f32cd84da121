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
    "save_finetuned": "weights",
    "load_finetuned": "weights",
    # training.py
    "calc_loss_batch": "training",
    "calc_loss_loader": "training",
    "evaluate_model": "training",
    "generate_and_print_sample": "training",
    "train_model_simple": "training",
    "plot_losses": "training",
    "TrainConfig": "training",
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
    "OllamaClient": "judge",
    # runs.py
    "Run": "runs",
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
