"""The tiny random model's demo settings (issue 12): its preset learns the chapter's data visibly, and
answering after training keeps to the run's own limits."""
import re

import pytest

from sft.cli import build_parser
from sft.cli.train import config_from_args
from sft.studio.answers import RESPONSE_BATCH
from sft.studio.config import QUICK_RUN_ANSWERS, TINY_DEMO_VAL_LOSS, ConfigError, TrainConfig
from sft.studio.files import read_json
from sft.studio.runs import Run
from sft.studio.worker import execute_run, load_splits

WORD = re.compile(r"[A-Za-z]+")


def test_the_tiny_model_brings_demo_settings_and_gpt2_keeps_the_chapters():
    chapter = TrainConfig()
    tiny = TrainConfig.defaults_for("tiny")
    assert (tiny.lr, tiny.epochs, tiny.eval_freq, tiny.response_tokens) == (5e-3, 3, 10, 64)
    assert (tiny.weight_decay, tiny.batch_size, tiny.eval_iter) == (chapter.weight_decay, 8, 5)
    for name in ("gpt2-small (124M)", "gpt2-medium (355M)", "gpt2-xl (1558M)"):
        real = TrainConfig.defaults_for(name)
        assert (real.lr, real.epochs, real.eval_freq, real.response_tokens) == (5e-5, 2, 5, 256)
        assert TrainConfig.preset_note(name) is None
    # What is given wins over the preset, as for the preset's other settings.
    assert TrainConfig.from_settings(model="tiny", lr=5e-5, epochs=2).lr == 5e-5
    note = TrainConfig.preset_note("tiny")
    for part in ("tiny (random) trains with demo settings of its own", "learning rate 5e-3 (the chapter: 5e-5)",
                 "3 epochs (the chapter: 2)", "evaluation every 10 steps (the chapter: 5)",
                 "at most 64 tokens per test answer (the chapter: 256)", f"below {TINY_DEMO_VAL_LOSS:g}"):
        assert part in note, note
    assert TrainConfig.preset_note("no such model") is None


def test_how_many_test_entries_a_run_answers():
    assert TrainConfig().answers_after_training(110) == 110  # the chapter: all of them
    assert TrainConfig(max_steps=20).answers_after_training(110) == QUICK_RUN_ANSWERS == RESPONSE_BATCH  # one batch
    assert TrainConfig(max_steps=20).answers_after_training(110, cut_short=False) == 110  # max_steps never bit
    assert TrainConfig(max_steps=20).answers_after_training(12) == 12
    assert TrainConfig(answer_limit=5).answers_after_training(110) == 5
    assert TrainConfig(answer_limit=50, max_steps=3).answers_after_training(110, cut_short=True) == 50
    assert TrainConfig(answer_limit=500).answers_after_training(110) == 110
    with pytest.raises(ConfigError) as bad:
        TrainConfig(answer_limit=0).validate()
    assert bad.value.problems == ["answer_limit must be >= 1 or None, got 0"]
    args = build_parser(["train"]).parse_args(["train", "--model", "tiny", "--answer-limit", "7"])
    assert config_from_args(args).answer_limit == 7


def quick(tmp_path, name, **settings):
    config = TrainConfig.from_settings(model="tiny", device="cpu", eval_iter=1, sample_each_epoch=False,
                                       response_tokens=3, **settings)
    run = Run.create(config, root=tmp_path, name=name)
    execute_run(run)
    assert run.status()["state"] == "completed", run.tail_log(20)
    test = read_json(run.test_data_path)
    return [a["instruction"] for a in read_json(run.responses_path)], [t["instruction"] for t in test]


@pytest.mark.slow
def test_answering_after_training_follows_the_runs_limits(tmp_path):
    # Stop after 2 steps: one batch of the 110 test entries, the first ones, not all (issue 12: ~90 s).
    answered, test = quick(tmp_path, "steps", max_steps=2)
    assert len(test) == 110 and answered == test[:QUICK_RUN_ANSWERS]
    answered, test = quick(tmp_path, "steps-limit", max_steps=2, answer_limit=3)
    assert answered == test[:3]
    # A limit on the data bounds its test split (10 % of it); a run that ends with its epochs answers all.
    answered, test = quick(tmp_path, "limit", limit=60, epochs=1)
    assert len(test) == 6 and answered == test


@pytest.mark.slow
def test_the_tiny_demo_learns_the_alpaca_answers(tmp_path):
    """The Fine-tune page's tiny run, headless: the preset as it is, on the whole bundled dataset."""
    config = TrainConfig.from_settings(model="tiny")
    run = Run.create(config, root=tmp_path, name="demo")
    execute_run(run)
    assert run.status()["state"] == "completed", run.tail_log(20)
    val = [e["val_loss"] for e in run.read_metrics("eval")]
    assert len(val) == 35 and val[0] > 9.5  # every 10 steps of 348, from a random start...
    assert val[-1] < TINY_DEMO_VAL_LOSS  # ...far down (measured: 2.12; the chapter's lr 5e-5 ends at 8.99)
    assert val[-1] < val[len(val) // 2] < val[3]  # still falling in the third epoch

    answers = [a["model_response"] for a in read_json(run.responses_path)]
    assert len(answers) == 110
    train, _, _ = load_splits(config)
    vocabulary = {w for entry in train for w in WORD.findall(entry["output"])}
    words = [w for a in answers for w in WORD.findall(a)]
    # Alpaca-shaped: sentences (not "."), of the dataset's words, many different ones.
    assert sum(bool(a.strip()) for a in answers) >= 100
    assert sum(a[:1].isupper() for a in answers) >= 80
    assert len(words) >= 5 * len(answers)
    assert sum(w in vocabulary for w in words) >= 0.9 * len(words)
    assert len(set(words)) >= 40, sorted(set(words))
