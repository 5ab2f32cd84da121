"""Not in the book: the model a run trains, built from its config.

The base is GPT-2's downloaded weights (``sft.weights.load_pretrained``) or, for "random",
a seeded ``GPTModel``, so the same config always gives the same starting weights: a LoRA run's
checkpoints keep only its adapters and rebuild the base from here.
"""
import torch

from ..model import GPTModel, model_config
from ..weights import load_pretrained
from .adapters import apply_lora
from .finetuned import load_finetuned


def build_base_model(config):
    """A GPTModel: GPT-2 weights from ``config.weights``, or random (seeded) for "random".

    "random" works for every size (the chapter's gpt2 sizes too): for benchmarks and offline
    demos; such a model is labelled RANDOM wherever a run shows it. A DPO run with ``from_run``
    starts from that run's final weights.
    """
    if getattr(config, "from_run", None):  # a DPO run: the weights its instruction run ended with
        return load_finetuned(config.start_weights_path())
    if config.weights == "random":
        torch.manual_seed(config.seed)
        return GPTModel(model_config(config.model))
    return load_pretrained(config.model, config.models_dir, source=config.weights)


def build_model(config):
    """The model a run trains: the base model, with LoRA adapters (and frozen) if ``lora_rank`` is set."""
    return apply_lora(build_base_model(config), config)
