"""The code behind each page (ui/snippets.py): each snippet runs and gives what the page computes;
each command line builds the same settings."""
import shlex

import pytest
import torch

from ui import snippets

pytestmark = pytest.mark.usefixtures("one_thread")


def run(code):
    namespace = {}
    exec(compile(code, "<snippet>", "exec"), namespace)  # noqa: S102 - our own generated code, in a test
    return namespace["result"]


def test_the_data_snippet_gives_the_split_and_the_prompt(capsys):
    from sft.prompts import get_prompt_style

    code, cli = snippets.data(prompt_style="phi3", entry=50)
    result = run(code)
    assert (result["entries"], result["train"], result["val"], result["test"]) == (1100, 935, 55, 110)
    assert result["example"].startswith("<|user|>\nIdentify the correct spelling of the following word.\nOcassion")
    assert cli == "python -m sft data --prompt-style phi3"
    assert get_prompt_style("phi3").format_example is not None


def test_the_batches_snippet_gives_listing_7_6s_first_batch(capsys):
    code, _ = snippets.batches(split="train", batch_number=0, batch_size=8, seed=123)
    result = run(code)
    assert result["shape"] == (8, 61)  # the chapter's first training batch


def test_the_finetune_snippet_and_command_build_the_pages_settings(tmp_path, monkeypatch):
    import sft
    from sft.cli import build_parser
    from sft.cli.train import config_from_args
    from sft.studio.config import TrainConfig

    started = []
    monkeypatch.setattr(sft, "launch_worker", started.append, raising=False)  # the snippet's run is not trained
    for i, config in enumerate((TrainConfig.from_settings(model="tiny", epochs=3, lr=1e-3, mask_instruction=True,
                                                          limit=60),
                                TrainConfig.chapter_path(model="tiny", weights="random", max_steps=4),
                                TrainConfig(model="gpt2-small (124M)", weights="hf", precision="fp32"))):
        code, cli = snippets.finetune(config, name=f"x{i}", root=tmp_path)
        assert run(code) == config and started[-1].config == config and started[-1].name == f"x{i}"
        argv = shlex.split(cli)[3:]
        args = build_parser(argv).parse_args(argv)  # argv: "train", then the flags
        assert config_from_args(args) == config, cli


def test_the_compare_snippet_gives_the_runs_answers(tmp_path):
    from sft.fast.decode import generate_responses
    from sft.studio.config import TrainConfig
    from sft.studio.files import read_json
    from sft.studio.runs import Run
    from sft.studio.worker import execute_run
    from sft.tokenizer import get_tokenizer

    run_ = Run.create(TrainConfig(model="tiny", weights="random", limit=40, max_steps=1, sample_each_epoch=False),
                      root=tmp_path, name="r")
    execute_run(run_, responses=False)
    code, cli = snippets.compare(run_.path, count=2, max_new_tokens=5)
    entries = read_json(run_.test_data_path)[:2]
    expected = [a["model_response"] for a in generate_responses(run_.load_model(), entries, get_tokenizer(),
                                                                max_new_tokens=5)]
    assert run(code) == expected
    assert cli.startswith("python -m sft generate --run-dir ")


def test_the_judge_snippet_scores_against_a_server(tmp_path):
    import json

    from fake_servers import FakeOllama

    from sft.data import ASSETS

    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(json.loads((ASSETS / "instruction-data-with-response.json").read_text())[:3]))
    with FakeOllama(reply=lambda prompt, model: "80") as srv:
        code, cli = snippets.judge(answers, url=srv.url)
        assert run(code) == 80.0
    assert cli.startswith("python -m sft judge ")


def test_the_chat_snippet_gives_the_pages_reply(app_dirs):
    from streamlit.testing.v1 import AppTest

    from ui.state import ROOT

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30).run()
    at.switch_page("pages/6_chat.py").run()
    at.number_input(key="chat_max_new").set_value(7)
    at.text_area(key="chat_instruction").set_value("Name a primary colour.")
    at.button(key="chat_send").click().run()
    assert not at.exception, at.exception
    shown = at.session_state["chat_history"][-1]["replies"][0]["text"]
    code = next(c.value for c in at.code if "stream_reply(" in c.value)
    assert "'Name a primary colour.'" in code and "max_new_tokens=7" in code
    assert run(code) == shown and shown


def _tiny_run(root, name, **settings):
    from sft.studio.config import TrainConfig
    from sft.studio.runs import Run
    from sft.studio.worker import execute_run

    run_ = Run.create(TrainConfig(model="tiny", weights="random", limit=40, max_steps=1, sample_each_epoch=False,
                                  snapshot_every=0, **settings), root=root, name=name)
    execute_run(run_, responses=False)
    return run_


def test_the_learn_snippet_gives_the_pages_mean_loss(app_dirs):
    from streamlit.testing.v1 import AppTest

    from ui.state import ROOT

    _tiny_run(app_dirs["runs"], "masked", mask_instruction=True, allowed_max_length=128)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.switch_page("pages/9_learn.py").run()
    at.number_input(key="learn_index").set_value(3).run()
    assert not at.exception, at.exception
    code = next(c.value for c in at.code if "explain_example(" in c.value)
    assert "val[3]" in code and "mask_instruction=True" in code and "allowed_max_length=128" in code
    result = run(code)
    assert at.metric[0].value == f"{result['mean_loss']:.3f}" and at.metric[1].value == str(result["targets"])


def test_the_experiments_snippet_gives_the_pages_tables(app_dirs):
    from streamlit.testing.v1 import AppTest

    from ui import experiments
    from ui.state import ROOT

    for name, lr in (("a", 1e-3), ("b", 2e-3)):
        _tiny_run(app_dirs["runs"], name, lr=lr)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.switch_page("pages/8_experiments.py").run()
    assert not at.exception, at.exception
    code = next(c.value for c in at.code if "compare_runs(" in c.value)
    result = run(code)
    assert [row["run"] for row in result["rows"]] == at.multiselect(key="exp_runs").value and result["differs"]["lr"]
    results, differs = at.dataframe[0].value, at.dataframe[1].value  # the page's two tables, in order
    assert experiments.results_frame(result["rows"]).equals(results)
    assert experiments.differs_frame(result["differs"], [r["run"] for r in result["rows"]]).equals(differs)
    assert f"--runs-root {app_dirs['runs']}" in next(c.value for c in at.code if c.value.startswith("python -m sft"))


def test_the_preference_snippet_gives_the_pages_collated_pairs_and_its_command_the_dpo_run(app_dirs):
    from streamlit.testing.v1 import AppTest

    from sft.cli import build_parser
    from sft.cli.settings import given_settings
    from sft.studio.dpo_config import DPOConfig
    from ui.state import ROOT

    source = _tiny_run(app_dirs["runs"], "sft-start")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.switch_page("pages/7_preference.py").run()
    at.number_input(key="pref_pair").set_value(5).run()
    at.number_input(key="pref_count").set_value(3).run()
    at.number_input(key="pref_beta").set_value(0.2).run()
    at.number_input(key="pref_max_steps").set_value(7).run()
    assert not at.exception, at.exception
    code = next(c.value for c in at.code if "custom_collate_fn(" in c.value)
    assert "data[4:7]" in code and "mask_prompt_tokens=True" in code
    result = run(code)
    caption = next(c.value for c in at.caption if c.value.startswith("Chosen and rejected rows share one length"))
    assert f"share one length, {result['cols']} positions" in caption
    kept = [int(part.rsplit(" ", 1)[1]) for part in caption.split("Kept per row: ")[1].rstrip(".").split(", ")]
    assert kept == result["kept"] and len(kept) == 6  # 3 pairs: a chosen and a rejected row each

    cli = next(c.value for c in at.code if c.value.startswith("python -m sft dpo"))
    argv = shlex.split(cli)[3:]
    args = build_parser(argv).parse_args(argv)
    config = DPOConfig.from_settings(given_settings(args, DPOConfig))
    page = DPOConfig.from_settings({"beta": 0.2, "lr": 5e-6, "epochs": 1, "max_steps": 7}, from_run=str(source.path),
                                   identical="keep")
    assert config == page and config.from_run == str(source.path) and config.beta == 0.2
