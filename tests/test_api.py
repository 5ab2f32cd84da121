"""The chapter's names are importable from `sft` with the chapter's signatures."""
import inspect

import pytest

import sft

# name -> the chapter's parameter list (names and defaults), as a learner would call it.
CHAPTER_SIGNATURES = {
    "download_and_load_file": "(file_path, url)",
    "format_input": "(entry)",
    "custom_collate_draft_1": "(batch, pad_token_id=50256, device='cpu')",
    "custom_collate_draft_2": "(batch, pad_token_id=50256, device='cpu')",
    "custom_collate_fn": "(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, device='cpu')",
    "text_to_token_ids": "(text, tokenizer)",
    "token_ids_to_text": "(token_ids, tokenizer)",
    "generate": "(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None)",
    "calc_loss_batch": "(input_batch, target_batch, model, device)",
    "calc_loss_loader": "(data_loader, model, device, num_batches=None)",
    "evaluate_model": "(model, train_loader, val_loader, device, eval_iter)",
    "generate_and_print_sample": "(model, tokenizer, device, start_context)",
    "train_model_simple": "(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, "
    "eval_iter, start_context, tokenizer)",
    "plot_losses": "(epochs_seen, tokens_seen, train_losses, val_losses)",
    "load_weights_into_gpt": "(gpt, params)",
    "query_model": "(prompt, model='llama3', url='http://localhost:11434/api/chat')",
    "check_if_running": "(process_name)",
    "generate_model_scores": "(json_data, json_key, model='llama3')",
}


def _leading(sig, n):
    """The first n positional parameters of sig, rendered like the chapter's signature."""
    params = [p for p in sig.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:n]
    return "(" + ", ".join(str(p) for p in params) + ")"


@pytest.mark.parametrize("name", sorted(CHAPTER_SIGNATURES))
def test_chapter_function_signature(name):
    expected = CHAPTER_SIGNATURES[name]
    n = expected.count(",") + 1 if expected != "()" else 0
    sig = inspect.signature(getattr(sft, name))
    assert _leading(sig, n) == expected
    # Anything beyond the chapter's parameters is keyword-only or defaulted, so chapter calls still work.
    extra = list(sig.parameters.values())[n:]
    assert all(p.kind == p.KEYWORD_ONLY or p.default is not p.empty or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
               for p in extra), name


def test_chapter_classes_and_constants():
    import torch

    assert issubclass(sft.GPTModel, torch.nn.Module)
    assert issubclass(sft.InstructionDataset, torch.utils.data.Dataset)
    assert list(inspect.signature(sft.InstructionDataset).parameters)[:2] == ["data", "tokenizer"]
    assert sft.BASE_CONFIG == {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.0, "qkv_bias": True}
    assert sft.model_configs["gpt2-medium (355M)"] == {"emb_dim": 1024, "n_layers": 24, "n_heads": 16}
    assert sft.model_configs["gpt2-xl (1558M)"] == {"emb_dim": 1600, "n_layers": 48, "n_heads": 25}


def test_every_export_resolves():
    for name in sft.__all__:
        assert getattr(sft, name) is not None, name
    with pytest.raises(AttributeError):
        sft.not_a_name  # noqa: B018


def test_import_is_cheap():
    """`import sft` must not import torch or touch the network (names resolve lazily)."""
    import subprocess
    import sys

    code = "import sys, sft; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
