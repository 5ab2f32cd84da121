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


def test_a_bad_config_beside_the_weights_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    torch.manual_seed(3)
    paths = save_finetuned(GPTModel(SMALL), tmp_path / "m.pth")
    good = json.loads((tmp_path / "m.json").read_text())
    built = []
    import sft.studio.finetuned as finetuned

    real = finetuned.GPTModel
    monkeypatch.setattr(finetuned, "GPTModel",
                        lambda cfg: built.append((cfg, torch.get_default_device().type)) or real(cfg))
    cases = [
        ({k: v for k, v in SMALL.items() if k != "n_heads"}, "n_heads is None"),        # a KeyError before
        ({**SMALL, "n_heads": 0}, "n_heads=0 is outside"),                               # a ZeroDivisionError
        ({**SMALL, "n_heads": 5}, "not divisible by n_heads=5"),
        ({**SMALL, "emb_dim": 9600, "n_heads": 96, "vocab_size": 50257, "n_layers": 96}, "does not fit"),
        ({**SMALL, "qkv_bias": "yes"}, "qkv_bias is 'yes'"),
    ]
    for cfg, message in cases:
        (tmp_path / "m.json").write_text(json.dumps({**good, "config": cfg}))  # a few hundred bytes
        with pytest.raises(ValueError, match=message):
            load_finetuned(paths["pth"])
    # 9600 x 96 layers would be a ~107 GB model: checked on the meta device, never allocated
    assert ((cases[3][0], "meta") in built) and all(cfg["emb_dim"] != 9600 for cfg, device in built if device != "meta")
    (tmp_path / "m.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="Bad fine-tuned model config"):
        load_finetuned(paths["pth"])


@pytest.mark.parametrize("change, message", [
    (lambda t: t.half(), "is torch.float16, expected torch.float32"),
    (lambda t: t.long(), "is torch.int64, expected torch.float32"),
    (lambda t: t.clone().fill_(float("nan")), "holds NaN or infinite values"),
])
def test_weights_of_the_wrong_kind_are_refused(tmp_path, change, message):
    torch.manual_seed(4)
    model = GPTModel(SMALL)
    save_finetuned(model, tmp_path / "m.pth")
    state = model.state_dict()
    state["out_head.weight"] = change(state["out_head.weight"])
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=rf"odd\.pth: tensor out_head.weight {message}" if "NaN" not in message
                       else r"odd\.pth: tensor out_head.weight holds NaN"):
        load_finetuned(tmp_path / "odd.pth", cfg=SMALL)


def test_each_weights_file_is_checked_against_its_recorded_sha256(tmp_path):
    from sft.studio.finetuned import file_sha256

    torch.manual_seed(5)
    paths = save_finetuned(GPTModel(SMALL), tmp_path / "m.pth")
    info = json.loads((tmp_path / "m.json").read_text())
    assert info["sha256"] == {"pth": file_sha256(paths["pth"]), "safetensors": file_sha256(paths["safetensors"])}
    load_finetuned(paths["safetensors"])  # intact: loads
    other = GPTModel(SMALL)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, paths["safetensors"])  # replaced
    with pytest.raises(ValueError, match=r"m\.safetensors has changed since it was saved"):
        load_finetuned(paths["safetensors"])
    assert load_finetuned(paths["pth"]) is not None  # the .pth still matches its own hash
