"""The Batches page for a class at a projector: -100 against padding explained from the batch itself, a
colour-blind-safe grid whose every class has a legend entry and a mark, a zoom that prints the tokens, one row
drawn input against target, the checks counted in examples by kind, and its settings kept across a reload."""
import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from sft.batching import get_batch
from sft.data import load_instruction_data, split_data
from sft.prompts import get_prompt_style
from sft.tokenizer import get_tokenizer

APP = str(Path(__file__).resolve().parents[2] / "app.py")


def open_batches():
    at = AppTest.from_file(APP, default_timeout=30).run()
    at.switch_page("pages/2_batches.py").run()
    assert not at.exception
    return at


def metrics(at):
    return {m.label: m.value for m in at.metric}


def chart(at, key):
    """The Plotly figure (as JSON) of the chart with widget key `key`."""
    charts = [c for c in at.get("plotly_chart") if key in c.proto.id]
    assert charts, f"no chart {key}"
    return json.loads(charts[0].proto.spec)


def heatmaps(fig):
    return [t for t in fig["data"] if t["type"] == "heatmap"]


def first_train_batch():
    train, _, _ = split_data(load_instruction_data())
    return get_batch(train, get_tokenizer(), batch_number=0, batch_size=8, seed=123)


def test_why_58_targets_are_minus_100_but_51_positions_are_padding_is_computed_from_the_batch():
    at = open_batches()
    m = metrics(at)
    assert (m["Shape (B, T)"], m["Targets set to -100"], m["Padding positions"]) == ("(8, 61)", "58", "51")
    batch = first_train_batch()  # the collate itself: rows shorter than the longest (61) each keep one 50256 target
    lengths = [int((row != 50256).sum()) for row in batch["inputs"]]  # each row's own tokens
    shorter = sum(n < 61 for n in lengths)
    assert shorter == 7 and int((batch["targets"] == -100).sum()) == 58
    text = next(md.value for md in at.markdown if md.value.startswith("**Why "))
    assert text.startswith("**Why 58 targets are -100 but only 51 positions are padding.**")
    assert ("Each of the 7 rows shorter than T = 61 positions thus has one -100 target more than it has "
            "padding positions: 51 + 7 = 58.") in text
    assert any("`-100` is the default `ignore_index` of PyTorch's `torch.nn.functional.cross_entropy`" in md.value
               for md in at.markdown)

    # Masking adds the prompt's targets; the sum is still taken from the batch.
    at.toggle(key="bat_mask").set_value(True).run()
    m = metrics(at)
    masked = int(m["Targets set to -100"]) - 58
    text = next(md.value for md in at.markdown if md.value.startswith("**Why "))
    assert masked > 0 and f"51 + 7 + {masked} masked prompt targets = {58 + masked}." in text


def test_the_grid_has_a_legend_entry_and_a_mark_for_every_class_and_one_end_of_text_per_row():
    at = open_batches()
    fig = chart(at, "bat_grid")
    legend = [(t["name"], t.get("legend", "legend")) for t in fig["data"] if t["type"] == "scatter"]
    assert legend == [("instruction", "legend"), ("input", "legend"), ("response", "legend"),
                      ("end-of-text", "legend"), ("padding", "legend"), ("trains (in the loss)", "legend2"),
                      ("E: the end-of-text the row learns", "legend2"), ("×: -100, ignored", "legend2")]
    colors = [t["marker"]["color"] for t in fig["data"] if t["type"] == "scatter"]
    assert colors[-3:] == ["#0072B2", "#D55E00", "#BDBDBD"]  # Okabe-Ito blue and vermillion, grey: no red/green
    inputs, targets = heatmaps(fig)
    assert targets["textfont"]["size"] >= 12 and all(text == "" for row in inputs["text"] for text in row)
    batch = first_train_batch()
    for row, marks in zip(batch["targets"].tolist(), targets["text"]):
        assert marks.count("E") == 1  # the one end-of-text target each row learns
        assert [j for j, mark in enumerate(marks) if mark == "×"] == [j for j, t in enumerate(row) if t == -100]
        assert marks.index("E") == row.index(50256)


def test_the_zoom_prints_tokens_and_targets_in_the_cells():
    at = open_batches()
    at.button(key="bat_zoom_end").click().run()  # the last 20 positions
    assert at.slider(key="bat_zoom_cols_61").value == (41, 60)
    at.slider(key="bat_zoom_rows_8").set_value((1, 2)).run()
    inputs, targets = heatmaps(chart(at, "bat_grid"))
    assert inputs["x"] == list(range(41, 61)) and inputs["y"] == [f"#{i}" for i in first_train_batch()["indices"][1:3]]
    anatomy_row = first_train_batch()["targets"][1].tolist()[41:]
    assert [t == -100 for t in anatomy_row] == [text == "× -100" for text in targets["text"][0]]
    assert targets["text"][0].count("E eot") == 1 and "eot" in inputs["text"][0] and "pad" in inputs["text"][0]
    assert all(text for row in inputs["text"] for text in row)  # every cell names its token


def test_one_row_is_drawn_input_against_target_with_arrows():
    at = open_batches()
    row = at.selectbox(key="bat_align_row").value
    assert row == 1  # the first row shorter than the longest
    fig = chart(at, "bat_align")
    (grid,) = heatmaps(fig)
    targets, inputs = grid["text"]
    assert targets.count("E eot") == 1 and "× -100" in targets
    for j in range(len(targets) - 1):  # target j is input j+1
        want = {"eot": "E eot", "pad": "× -100"}.get(inputs[j + 1], inputs[j + 1])
        assert targets[j] == want
    arrows = [a for a in fig["layout"]["annotations"] if a.get("showarrow")]
    assert len(arrows) == len(targets) - 1 and all(a["ax"] == a["x"] + 1 for a in arrows)


def test_allowed_max_length_48_with_masking_counts_examples_by_kind():
    at = open_batches()
    at.number_input(key="bat_maxlen").set_value(48).run()
    at.toggle(key="bat_mask").set_value(True).run()
    assert not at.exception
    assert at.warning[0].value.startswith("With these settings 793 of 935 train examples have problems")
    assert at.error[0].value == ("**793 of 935 examples have problem(s) in the train split** with "
                                 "allowed_max_length 48 and the instruction masked:")
    lines = next(md.value for md in at.markdown if md.value.startswith("- 81 of 935"))
    assert "- 81 of 935 examples are cut to 48 tokens before their response starts" in lines
    assert "every target is -100, so they add nothing to the loss." in lines
    assert "- 712 of 935 examples are cut to 48 tokens inside their response" in lines
    assert "(1667 problems in 793 examples)" in lines and "1667 problem(s)" not in lines
    assert "1667" not in at.error[0].value
    # The batch itself, cut to 48 and masked: the -100 targets still add up, and the cut rows are named.
    m = metrics(at)
    text = next(md.value for md in at.markdown if md.value.startswith("**Why "))
    assert (m["Targets set to -100"], m["Padding positions"]) == ("308", "3")
    assert "The 1 row shorter than T = 48 positions (#12) thus has one -100 target more" in text
    assert "3 + 1 + 304 masked prompt targets = 308." in text
    assert text.endswith("6 rows (#8, #639, #313, #769, #407, #173) learn no end-of-text: allowed_max_length "
                         "cut it off.")


def test_the_settings_are_kept_in_the_workspace_and_restored_by_a_reload(app_dirs):
    at = open_batches()
    at.selectbox(key="bat_split").set_value("val").run()
    at.number_input(key="bat_size").set_value(4).run()
    at.number_input(key="bat_seed").set_value(7).run()
    at.number_input(key="bat_maxlen").set_value(300).run()
    at.toggle(key="bat_mask").set_value(True).run()
    kept = json.loads((app_dirs["runs"].parent / "workspace" / "workspace.json").read_text())
    assert {k: kept[k] for k in ("batch_split", "batch_size", "batch_seed", "allowed_max_length",
                                 "mask_instruction")} == {"batch_split": "val", "batch_size": 4, "batch_seed": 7,
                                                          "allowed_max_length": 300, "mask_instruction": True}
    again = open_batches()  # a new AppTest is a new browser session: the workspace file restores the choices
    assert again.selectbox(key="bat_split").value == "val" and again.number_input(key="bat_size").value == 4
    assert again.number_input(key="bat_seed").value == 7 and again.number_input(key="bat_maxlen").value == 300
    assert again.toggle(key="bat_mask").value is True
    assert metrics(again)["Shape (B, T)"].startswith("(4, ")


def _warning_script(allowed_max_length, mask_instruction):
    import streamlit as st

    from ui import checks, state

    state.init_state()
    st.session_state.allowed_max_length = allowed_max_length
    st.session_state.mask_instruction = mask_instruction
    st.markdown(checks.settings_warning(st.session_state) or "NONE")


def test_settings_warning_names_the_train_examples_affected_by_kind():
    at = AppTest.from_function(_warning_script, args=(1024, False), default_timeout=30).run()
    assert not at.exception and at.markdown[0].value == "NONE"
    at = AppTest.from_function(_warning_script, args=(48, True), default_timeout=30).run()
    text = at.markdown[0].value
    assert text.startswith("**793 of 935 examples have problem(s) in the train split** with allowed_max_length 48 "
                           "and the instruction masked:")
    assert "- 81 of 935 examples are cut to 48 tokens before their response starts" in text
    assert "- 712 of 935 examples are cut to 48 tokens inside their response" in text
    style, tokenizer = get_prompt_style("alpaca"), get_tokenizer()
    longest = max(len(tokenizer.encode(style.format_example(e))) for e in split_data(load_instruction_data())[0])
    assert text.endswith(f"allowed_max_length {longest} (or more) keeps every train example whole.")


def test_the_data_pages_length_histogram_has_whole_number_ticks_and_bins():
    from ui.figures import length_histogram

    few = length_histogram([50, 51, 51, 53])  # Plotly alone would tick 50, 50.5, 51, ... and count 0.5 entries
    assert (few.layout.xaxis.dtick, few.layout.yaxis.dtick) == (1, 1)
    assert few.layout.xaxis.tickformat == few.layout.yaxis.tickformat == "d"
    assert (few.data[0].xbins.start, few.data[0].xbins.end, few.data[0].xbins.size) == (49.5, 53.5, 1)
    many = length_histogram(list(range(60, 300)) * 4)
    assert many.data[0].xbins.size == 4 and many.layout.xaxis.dtick is None  # Plotly's own steps, >= 5 here
    assert many.layout.yaxis.dtick == 2  # 16 entries a bin: ticks 0, 2, ..., 16
