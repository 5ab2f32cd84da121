"""The Learn page: each token with its loss, -100 greyed, the end-of-text target marked, top-5 guesses on hover,
the change fine-tuning made, and the mean loss by role."""
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]


def open_page():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.switch_page("pages/9_learn.py").run()
    assert not at.exception, at.exception
    return at


@pytest.mark.slow
def test_tokens_losses_and_roles_for_a_masked_run(app_dirs):
    from sft.studio.config import TrainConfig
    from sft.studio.runs import Run
    from sft.studio.token_loss import explain_example
    from sft.studio.worker import execute_run
    from sft.tokenizer import get_tokenizer

    run = Run.create(TrainConfig(model="tiny", weights="random", limit=60, max_steps=3, mask_instruction=True,
                                 sample_each_epoch=False), root=app_dirs["runs"], name="masked")
    execute_run(run, responses=False)
    at = open_page()
    assert at.selectbox(key="learn_tuned").value == "run: masked"
    assert "instruction masking on" in " ".join(c.value for c in at.caption)
    html = [h.proto.body for h in at.get("html")]
    tokens = html[1]
    assert "2px solid #d55e00" in tokens  # the one end-of-text target, outlined
    assert "#e0e0e0" in tokens and "not trained (-100)" in tokens  # masked prompt targets, greyed
    assert "top guesses:" in tokens
    from sft.data import load_instruction_data, split_data

    _, _, val = split_data(load_instruction_data())
    cells = explain_example(run.load_model(), val[0], get_tokenizer(), mask_instruction=True, allowed_max_length=256)
    trained = [c["loss"] for c in cells if c["in_loss"]]
    assert at.metric[0].value == f"{sum(trained) / len(trained):.3f}" and at.metric[1].value == str(len(trained))
    at.selectbox(key="learn_base").set_value("base: tiny (random) (random weights)").run()
    assert not at.exception and "What fine-tuning changed" in [s.value for s in at.subheader]
    side = [h.proto.body for h in at.get("html")][-2:]  # the base's losses beside the run's
    assert side[1] == tokens and side[0] != tokens and side[0].count("<span") == tokens.count("<span")
    at.button(key="learn_roles").click().run()
    summary = at.session_state["learn_summary"]["run: masked"]
    assert summary["instruction"]["trained"] == 0 and summary["instruction"]["targets"] > 0
    assert summary["response"]["trained"] == summary["response"]["targets"] > 0
