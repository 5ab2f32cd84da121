"""`python -m sft`: help for each command, data checks, and a tiny train -> generate round trip."""
import json
import re
import subprocess
import sys

import pytest
import torch

from sft.cli import COMMANDS, main


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_for_each_command(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: python -m sft {command}" in text
    assert COMMANDS[command].split(" (")[0] in " ".join(text.split())  # the description, re-wrapped


def test_train_help_shows_the_chapters_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("(default: gpt2-medium (355M))", "--epochs EPOCHS passes over the training split (default: 2)",
                     "AdamW learning rate (default: 5e-05)", "(default: 0.1)", "examples per batch (default: 8)",
                     "evaluate every N steps (default: 5)", "batches per evaluation (default: 5)",
                     "RANDOMLY initialised", "--resume", "--max-steps"):
        assert expected in text, expected


def test_python_dash_m_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "sft", "--help"], capture_output=True, text=True, check=True).stdout
    for command in COMMANDS:
        assert command in out


def test_data_summarises_and_writes_the_split(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "data", "--out-dir", str(tmp_path))
    assert code == 0
    assert "1100 valid entries" in out and "train 935, test 110, val 55" in out
    sizes = {name: len(json.loads((tmp_path / f"{name}.json").read_text())) for name in ("train", "test", "val")}
    assert sizes == {"train": 935, "test": 110, "val": 55}


def test_data_names_the_bad_entry(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "x"}]))
    code, _, err = run_cli(capsys, "data", str(bad))
    assert code == 1 and "entry 1" in err and "output" in err


def test_train_reports_every_bad_setting(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--model", "tiny", "--epochs", "0", "--lr", "-1", "--batch-size", "0",
                           "--runs-root", str(tmp_path))
    assert code == 2
    assert "epochs must be" in err and "lr must be" in err and "batch_size must be" in err
    assert list(tmp_path.iterdir()) == []  # no run folder for a config that cannot train


def test_generate_without_a_model_says_what_to_give(capsys):
    code, _, err = run_cli(capsys, "generate")
    assert code == 1 and "--run-dir" in err and "--model" in err


def test_download_tiny_needs_nothing(capsys):
    code, out, _ = run_cli(capsys, "download", "--model", "tiny")
    assert code == 0 and "nothing to download" in out


@pytest.mark.slow
def test_tiny_train_then_generate(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "train", "--model", "tiny", "--limit", "20", "--batch-size", "2", "--max-steps", "3",
        "--eval-freq", "2", "--eval-iter", "1", "--allowed-max-length", "32", "--response-tokens", "4",
        "--runs-root", str(tmp_path), "--name", "cli", "--progress", "plain")
    assert code == 0, err
    assert "tiny (random) with RANDOM weights" in out
    assert "Ep 1 (Step 000000): Train loss" in out and "Ep 1 (Step 000002): Train loss" in out
    assert re.search(r"Training done: 3 steps in \d+\.\d\d minutes, [\d,]+ tokens/s", out), out
    assert "Run state: completed" in out
    run = tmp_path / "cli"
    config = json.loads((run / "config.json").read_text())
    # the flags given, then the tiny model's preset (random weights, its demo learning rate)
    assert (config["model"], config["weights"], config["max_steps"], config["lr"]) == ("tiny", "random", 3, 5e-3)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "step"] == [0, 1, 2]
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["global_step"] == 2
    answers = json.loads((run / "instruction-data-with-response.json").read_text())
    assert len(answers) == 2 and all(isinstance(a["model_response"], str) for a in answers)
    assert (run / "tinyrandom-sft.pth").is_file() and (run / "tinyrandom-sft.safetensors").is_file()

    out_path = tmp_path / "val-answers.json"
    code, out, err = run_cli(capsys, "generate", "--run-dir", str(run), "--split", "val", "--max-new-tokens", "3",
                             "--out", str(out_path), "--device", "cpu")
    assert code == 0, err
    answers = json.loads(out_path.read_text())
    assert len(answers) == 1 and "model_response" in answers[0] and f"Wrote 1 answers to {out_path}" in out


def test_a_flag_that_contradicts_chapter_path_is_an_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--model", "tiny", "--chapter-path", "--precision", "bf16",
                           "--group-by-length", "--runs-root", str(tmp_path))
    assert code == 2
    assert "precision='bf16' contradicts the chapter's exact computation" in err
    assert "group_by_length=True contradicts" in err
    assert list(tmp_path.iterdir()) == []


def test_settings_given_with_an_existing_run_dir_are_refused(capsys, tmp_path):
    from sft.studio.config import TrainConfig
    from sft.studio.runs import Run

    run = Run.create(TrainConfig(model="tiny", weights="random"), root=tmp_path, name="r")
    code, _, err = run_cli(capsys, "train", "--run-dir", str(run.path), "--epochs", "5")
    assert code == 2 and "already has its settings" in err and "--epochs" in err
    assert run.config.epochs == 2


def test_a_registered_prompt_style_is_accepted_by_the_cli(capsys, tmp_path):
    from sft.prompts import PROMPT_STYLES, Alpaca, register_prompt_style

    @register_prompt_style
    class Terse(Alpaca):
        name = "terse"

    try:
        with pytest.raises(SystemExit):
            main(["train", "--help"])
        assert "terse" in capsys.readouterr().out
        from sft.cli.train import config_from_args
        from sft.cli import build_parser

        args = build_parser(["train"]).parse_args(["train", "--model", "tiny", "--prompt-style", "terse"])
        assert config_from_args(args).validate().prompt_style == "terse"
    finally:
        PROMPT_STYLES.pop("terse")


def test_train_flags_come_from_the_config_fields(capsys):
    from dataclasses import fields

    from sft.studio.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--mask-instruction, --no-mask-instruction" in text  # booleans both ways


def test_lora_train_then_merge(capsys, tmp_path):
    from sft.studio.finetuned import load_finetuned
    from sft.studio.runs import Run

    code, out, err = run_cli(
        capsys, "train", "--model", "tiny", "--limit", "20", "--batch-size", "2", "--max-steps", "3",
        "--eval-freq", "2", "--eval-iter", "1", "--allowed-max-length", "32", "--no-responses", "--lr", "0.01",
        "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "query,value,head",
        "--runs-root", str(tmp_path), "--name", "lora", "--progress", "plain")
    assert code == 0, err
    assert "LoRA rank 4" in out and "trainable" in out
    run = Run(tmp_path / "lora")
    cfg = run.config
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.method) == (4, 8.0, "query,value,head", "LoRA")
    assert run.adapter_path.is_file()
    code, out, err = run_cli(capsys, "merge", "--run-dir", str(run.path))
    assert code == 0, err
    merged = load_finetuned(run.path / "tinyrandom-merged.pth")
    final = load_finetuned(run.model_path)  # the run's own final weights are the same merge
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), final.state_dict().values()))
    code, _, err = run_cli(capsys, "train", "--model", "tiny", "--lora-targets", "mlp", "--runs-root", str(tmp_path))
    assert code != 0 and "lora_targets: unknown LoRA target(s) 'mlp'" in err
