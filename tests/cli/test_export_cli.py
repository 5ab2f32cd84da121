"""`python -m sft export`: a run's model (or a base model) as a Hugging Face folder and GGUF with a Modelfile,
with where it came from recorded beside the files."""
import json

import pytest
import torch

from sft.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_export_a_run_for_transformers_and_ollama(capsys, tmp_path):
    import transformers

    from sft.studio.config import TrainConfig
    from sft.studio.runs import Run
    from sft.studio.worker import execute_run

    run = Run.create(TrainConfig(model="tiny", weights="random", limit=40, max_steps=2, sample_each_epoch=False,
                                 prompt_style="phi3"), root=tmp_path / "runs", name="tuned")
    execute_run(run, responses=False)
    out = tmp_path / "exports" / "tuned"
    code = main(["export", "--run-dir", str(run.path), "--out", str(out), "--gguf-dtypes", "f32,q8_0"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "ollama create tuned -f Modelfile" in text and "ollama run tuned" in text
    record = json.loads((out / "hf" / "sft-export.json").read_text())
    provenance = record["provenance"]
    assert (provenance["run"], provenance["base_model"], provenance["prompt_style"]) == ("tuned", "tiny (random)",
                                                                                          "phi3")
    assert provenance["settings"]["max_steps"] == 2 and provenance["weights_file"].endswith("tinyrandom-sft.pth")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    model = run.load_model()
    ids = torch.tensor([[464, 3290, 318, 257, 1332]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)
    assert sorted(p.name for p in (out / "gguf").iterdir()) == ["Modelfile", "sft-export.json", "tuned-f32.gguf",
                                                                "tuned-q8_0.gguf"]
    modelfile = (out / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tuned-f32.gguf") and 'PARAMETER stop "<|user|>"' in modelfile


def test_export_needs_a_run_or_a_model(capsys, tmp_path):
    assert main(["export", "--out", str(tmp_path / "x")]) == 1
    assert "give a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("stopped", [False, True])
def test_export_of_a_lora_run_is_its_base_with_the_adapters_merged(capsys, tmp_path, stopped):
    import transformers

    from sft.lora import load_lora_state_dict
    from sft.studio.adapters import read_adapter
    from sft.studio.checkpoint import load_checkpoint
    from sft.studio.config import TrainConfig
    from sft.studio.models import build_model
    from sft.studio.runs import Run
    from sft.studio.worker import execute_run

    config = TrainConfig(model="tiny", weights="random", limit=40, max_steps=3, sample_each_epoch=False,
                         lora_rank=4, lora_alpha=8.0, lr=1e-2)
    run = Run.create(config, root=tmp_path / "runs", name="lora")
    execute_run(run, responses=False)
    if stopped:  # a run stopped before the end has no final weights: its checkpoint's adapters are merged
        run.model_path.unlink()
        run.adapter_path.unlink()
        adapters = load_checkpoint(run.checkpoint_path)["model"]["tensors"]
    else:
        adapters = read_adapter(run.adapter_path)["tensors"]
    out = tmp_path / "exports" / "lora"
    code = main(["export", "--run-dir", str(run.path), "--out", str(out), "--formats", "hf"])
    assert code == 0, capsys.readouterr()
    provenance = json.loads((out / "hf" / "sft-export.json").read_text())["provenance"]
    assert provenance["settings"]["lora_rank"] == 4
    wrapped = load_lora_state_dict(build_model(config), adapters).eval()  # base + adapters, never merged
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    ids = torch.tensor([[464, 3290, 318, 257, 1332]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, wrapped(ids), atol=1e-4, rtol=0)
        assert not torch.allclose(wrapped(ids), build_model(config.__class__(**{**config.to_dict(),
                                                                               "lora_rank": 0})).eval()(ids))
