"""SFT Studio's engine: instruction fine-tuning of GPT-2, the workflow of chapter 7 of
*Build a Large Language Model (From Scratch)*.

Every name the chapter defines or imports is importable from here with the chapter's
signature and behaviour, e.g. ``from sft import format_input, GPTModel, train_model_simple``,
and so are the exercises' names as the book's solutions spell them (``format_input_phi``,
``InstructionDatasetWithMasking``, ...). A few entry points to the machinery beside the book
follow them (the Trainer, its settings, run folders, batched answering, the judge's client);
everything else is imported from its module (see docs/ARCHITECTURE.md).

Names resolve lazily (PEP 562) so ``import sft`` stays cheap: torch is imported only when a
name that needs it is first used.
"""
from importlib import import_module

__version__ = "0.1.0"

# name -> module that defines it, in pipeline order.
_EXPORTS = {
    # 1. tokenizer (chapter 2/5): GPT-2's BPE, built offline from bundled files
    "get_tokenizer": "tokenizer",
    "text_to_token_ids": "tokenizer",
    "token_ids_to_text": "tokenizer",
    # 2. instruction data (7.2): download, load and check, split 85/10/5
    "download_and_load_file": "data",
    "load_instruction_data": "data",
    "split_data": "data",
    "DataValidationError": "data",
    # 3. prompts (7.2; exercise 7.1 for Phi-3)
    "format_input": "prompts",
    "format_input_phi": "prompts",
    "PromptStyle": "prompts",
    "PROMPT_STYLES": "prompts",
    "get_prompt_style": "prompts",
    "register_prompt_style": "prompts",
    # 4. batching (7.3-7.4; exercise 7.2 for instruction masking)
    "InstructionDataset": "batching",
    "InstructionDatasetPhi": "batching",
    "InstructionDatasetWithMasking": "batching",
    "custom_collate_draft_1": "batching",
    "custom_collate_draft_2": "batching",
    "custom_collate_fn": "batching",
    "custom_collate_with_masking_fn": "batching",
    "create_data_loaders": "batching",
    # 5. the model (chapter 4) and its configs
    "GPTModel": "model",
    "MultiHeadAttention": "model",
    "LayerNorm": "model",
    "GELU": "model",
    "FeedForward": "model",
    "TransformerBlock": "model",
    "BASE_CONFIG": "model",
    "model_configs": "model",
    "model_config": "model",
    "count_parameters": "model",
    # 6. pretrained weights (chapter 5: gpt_download.py)
    "download_file": "download",
    "download_and_load_gpt2": "weights",
    "load_gpt2_params_from_tf_ckpt": "weights",
    "assign": "weights",
    "load_weights_into_gpt": "weights",
    "load_pretrained": "weights",
    # 7. training (chapter 5, used in 7.6)
    "calc_loss_batch": "training",
    "calc_loss_loader": "training",
    "evaluate_model": "training",
    "generate_and_print_sample": "training",
    "train_model_simple": "training",
    "plot_losses": "training",
    # 8. generation and responses (chapter 5, 7.7)
    "generate_text_simple": "generation",
    "generate": "generation",
    "extract_response": "generation",
    # 9. the judge (7.8)
    "query_model": "judge",
    "check_if_running": "judge",
    "generate_model_scores": "judge",
    # Entry points to the machinery beside the book (not in the book)
    "TrainConfig": "studio.config",
    "Trainer": "studio.trainer",
    "Run": "studio.runs",
    "list_runs": "studio.runs",
    "launch_worker": "studio.worker",
    "generate_batch": "fast.decode",
    "generate_stream": "fast.decode",
    "generate_responses": "fast.decode",
    "OllamaClient": "judge",
    "score_responses": "judge",
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
