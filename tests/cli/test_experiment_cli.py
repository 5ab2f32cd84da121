"""`python -m sft experiment`: the chapter's exercises queued from the command line, waited for, scored by a
(fake) judge and printed beside the book's figures; `summary` and `list` read what it recorded."""
import json

import pytest
from fake_servers import FakeOllama

from sft.cli import main
from sft.studio import exercises
from sft.studio.queue import queued_runs

TINY = ["--model", "tiny", "--limit", "20", "--seed", "7", "--batch-size", "2", "--max-steps", "2", "--eval-freq", "1",
        "--eval-iter", "1", "--allowed-max-length", "48", "--no-sample-each-epoch", "--response-tokens", "3",
        "--device", "cpu", "--precision", "fp32"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_chapter_exercises_queues_the_variants_and_says_how_to_watch(capsys, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(exercises, "ensure_runner", lambda root, key, env=None: started.append((str(root), key)))
    code, out, _ = run_cli(capsys, "experiment", "chapter-exercises", "--runs-root", str(tmp_path), "--name", "ex",
                           *TINY, "--judge-url", "http://127.0.0.1:9", "--judge-model", "judge3")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "Experiment ex: queued 5 runs on cpu, in this order:"
    assert lines[1] == "  1. ex-baseline  (chapter 7: the chapter: Alpaca prompts, loss on every response and prompt " \
                       "token, every weight)"
    assert lines[2] == "  2. ex-phi3  (exercise 7.1: the Phi-3 prompt style)"
    assert lines[4].startswith("  4. ex-lora  (exercise 7.4: LoRA, rank 16 and alpha 16")
    assert lines[5] == "  5. ex-dpo  (DPO notebook: DPO on top of the baseline)"
    assert "python -m sft experiment summary ex" in lines[6]
    assert started == [(str(tmp_path), "cpu")]  # the queue runner, started once for the whole line
    assert [r.name for r in queued_runs(tmp_path, "cpu")] == ["ex-baseline", "ex-phi3", "ex-masking", "ex-lora",
                                                                 "ex-dpo"]
    record = exercises.load_experiment(tmp_path, "ex")
    assert record["judge"] == {"backend": "ollama", "url": "http://127.0.0.1:9", "model": "judge3"}
    assert record["base_settings"]["limit"] == 20 and "prompt_style" not in record["base_settings"]

    code, out, _ = run_cli(capsys, "experiment", "list", "--runs-root", str(tmp_path))
    assert (code, out) == (0, "ex: ex-baseline (chapter 7), ex-phi3 (exercise 7.1), ex-masking (exercise 7.2), "
                              "ex-lora (exercise 7.4), ex-dpo (DPO notebook)\n")
    # The recorded judge answers nowhere: the summary says so, and still prints and writes the table.
    code, out, err = run_cli(capsys, "experiment", "summary", "ex", "--runs-root", str(tmp_path))
    assert code == 0 and "Not scored: No Ollama server answers at http://127.0.0.1:9" in err
    assert "| ex-masking | queued |" in out and "| dpo | DPO notebook | ex-dpo | queued |" in out
    assert "**not comparable with the book (tiny random model)**" in out
    assert (tmp_path / ".experiments" / "ex.md").read_text() in out
    assert json.loads((tmp_path / ".experiments" / "ex.summary.json").read_text())["experiment"] == "ex"


def test_bad_settings_and_missing_weights_are_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, "experiment", "chapter-exercises", "--runs-root", str(tmp_path), *TINY, "--lr", "0")
    assert code == 2 and "lr must be > 0" in err
    code, _, err = run_cli(capsys, "experiment", "chapter-exercises", "--runs-root", str(tmp_path), "--model", "124M",
                           "--models-dir", str(tmp_path / "models"))
    assert code == 1 and "gpt2-small (124M) (openai) is not downloaded" in err and "python -m sft download" in err
    code, _, err = run_cli(capsys, "experiment", "summary", "nope", "--runs-root", str(tmp_path))
    assert code == 1 and "no experiment 'nope'" in err
    assert list(tmp_path.iterdir()) == []  # refused before any folder was made


def test_prompt_style_and_masking_are_the_variants_own(capsys):
    with pytest.raises(SystemExit):  # argparse refuses them: each variant sets its own
        main(["experiment", "chapter-exercises", "--prompt-style", "phi3"])
    assert "unrecognized arguments: --prompt-style" in capsys.readouterr().err


@pytest.mark.slow
def test_wait_trains_answers_scores_and_prints_the_table(capsys, tmp_path):
    with FakeOllama(reply=lambda prompt, model: "60") as srv:
        code, out, err = run_cli(capsys, "experiment", "chapter-exercises", "--runs-root", str(tmp_path), "--name",
                                 "ex", *TINY, "--wait", "--judge-url", srv.base_url)
        assert len(srv.chat_requests) == 10  # 5 runs x 2 test answers
    assert code == 0, (out, err)
    assert "Runs ended: ex-baseline completed, ex-phi3 completed, ex-masking completed, ex-lora completed, " \
           "ex-dpo completed" in out
    assert "Judge ollama:llama3@" in out and ": 10 answers scored now in 5 run(s)" in out
    table = [line for line in out.splitlines() if line.startswith("| ex-") or line.startswith("| baseline")
             or line.startswith("| phi3") or line.startswith("| masking") or line.startswith("| lora")
             or line.startswith("| dpo")]
    assert [line.split(" | ")[2] for line in table] == ["ex-baseline", "ex-phi3", "ex-masking", "ex-lora",
                                                                 "ex-dpo"]
    assert all(" | completed | " in line and "60.0 (60.0-60.0), 2 scored" in line for line in table)
    assert [line.split(" | ")[8] for line in table] == ["49.45", "48.87", "47.73", "50.23", "–"]  # none for DPO
    summary = json.loads((tmp_path / ".experiments" / "ex.summary.json").read_text())
    assert [r["judge_mean"] for r in summary["rows"]] == [60.0] * 5
    assert f"Wrote {tmp_path}/.experiments/ex.summary.json and {tmp_path}/.experiments/ex.md" in out
    assert queued_runs(tmp_path) == []
