"""Fine-tuned files (sft.finetuned): the chapter's .pth, safetensors and a config .json, written
atomically and read back without unpickling; clear errors for bad files."""
import json

import pytest
import torch

from sft.studio.finetuned import finetuned_filename, finetuned_info, load_finetuned, save_finetuned
from sft.model import GPTModel

SMALL = {"vocab_size": 64, "context_length": 16, "emb_dim": 12, "n_heads": 2, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}
IDS = torch.tensor([[1, 5, 9, 2, 63, 0, 7], [3, 3, 3, 8, 40, 11, 12]])  # (B=2, T=7)


class NotATensor:
    pass


def test_save_and_load_finetuned_round_trip(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(2)
    model = GPTModel(SMALL).eval()
    name = finetuned_filename("gpt2-medium (355M)")
    assert name == "gpt2-medium355M-sft.pth"
    paths = save_finetuned(model, tmp_path / "out" / name, extra={"prompt_style": "alpaca"})
    stem = str(tmp_path / "out" / "gpt2-medium355M-sft")
    assert paths == {"pth": stem + ".pth", "safetensors": stem + ".safetensors", "json": stem + ".json"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gpt2-medium355M-sft.json", "gpt2-medium355M-sft.pth", "gpt2-medium355M-sft.safetensors"]

    # the .pth is the chapter's plain state_dict, readable with weights_only=True
    state = torch.load(paths["pth"], weights_only=True)
    assert state.keys() == model.state_dict().keys()
    with safe_open(paths["safetensors"], framework="pt") as f:
        assert {"out_head.weight", "tok_emb.weight"} <= set(f.keys())
    info = finetuned_info(paths["pth"])
    assert info["config"] == SMALL and info["extra"] == {"prompt_style": "alpaca"}

    with torch.no_grad():
        expected = model(IDS)
        for path in (paths["pth"], paths["safetensors"], stem):
            loaded = load_finetuned(path)
            assert not loaded.training
            assert torch.equal(loaded(IDS), expected)


def test_save_finetuned_of_a_tied_head_keeps_head_and_embedding_apart(tmp_path):
    torch.manual_seed(1)
    model = GPTModel(SMALL).eval()
    model.out_head.weight = model.tok_emb.weight  # GPT-2's own tying: saves (as two tensors) all the same
    paths = save_finetuned(model, tmp_path / "tied", cfg=SMALL)
    with torch.no_grad():
        assert torch.equal(load_finetuned(paths["safetensors"])(IDS), model(IDS))


def test_load_finetuned_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_finetuned(tmp_path / "nothing-here.pth")

    pickled = tmp_path / "evil.pth"
    torch.save({"x": NotATensor()}, pickled)
    with pytest.raises(ValueError, match=r"Could not read .*evil\.pth"):  # weights_only refuses it
        load_finetuned(pickled)

    torch.manual_seed(0)
    model = GPTModel(SMALL)
    bare = tmp_path / "bare.pth"  # a chapter-style .pth with no JSON beside it
    torch.save(model.state_dict(), bare)
    with pytest.raises(ValueError, match="cannot tell n_heads for emb_dim=12"):
        load_finetuned(bare)
    with torch.no_grad():
        assert torch.equal(load_finetuned(bare, cfg=SMALL)(IDS), model(IDS))

    paths = save_finetuned(model, tmp_path / "m.pth")
    (tmp_path / "m.json").write_text(json.dumps({"config": {**SMALL, "n_layers": 3}}))
    with pytest.raises(ValueError, match=r"m\.(safetensors|pth) does not fit a GPTModel"):
        load_finetuned(paths["pth"])
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"Bad fine-tuned model config .*m\.json"):
        load_finetuned(paths["pth"])
    with pytest.raises(TypeError):  # unserialisable extra: refused before any file is written
        save_finetuned(model, tmp_path / "x.pth", extra={"f": NotATensor()})
    assert not list(tmp_path.glob("x.*"))
