"""The Chat page: a reply streams in pieces, Stop keeps what was written, two models answer at once,
and a reply can be saved as a test case."""
import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from sft.model import GPTModel, model_config
from sft.studio.chat import chat_prompt, stop_markers, stream_reply
from sft.tokenizer import get_tokenizer


ROOT = Path(__file__).resolve().parents[2]


def open_page():
    """The app, then the Chat page, as a person reaches it (app.py frames every page)."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30).run()
    at.switch_page("pages/6_chat.py").run()
    assert not at.exception, at.exception
    return at


def test_stream_reply_gives_the_greedy_answer_in_pieces():
    from sft.fast.decode import generate_batch

    torch.manual_seed(123)
    model = GPTModel(model_config("tiny")).eval()
    tokenizer = get_tokenizer()
    prompt = chat_prompt("Name a primary colour.", "", "alpaca")
    assert prompt.endswith("### Instruction:\nName a primary colour.\n\n### Response:\n")
    pieces = list(stream_reply(model, tokenizer, prompt, max_new_tokens=12))
    assert len(pieces) > 1  # it streams: more than one piece
    expected = tokenizer.decode(generate_batch(model, [tokenizer.encode(prompt)], max_new_tokens=12)[0])
    assert "".join(pieces) == expected  # and the pieces are exactly the greedy answer


def test_a_reply_stops_before_the_next_instruction_header():
    assert stop_markers("alpaca") == ["### Instruction:"] and stop_markers("phi3") == ["<|user|>"]

    class Echo:  # a fake tokenizer over characters, to script what the "model" writes
        def encode(self, text, **kw):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(map(chr, ids))

    import sft.studio.chat as chat

    script = "Red.\n\n### Instruction:\nmore"
    original = chat.generate_stream
    chat.generate_stream = lambda model, ids, **kw: iter(map(ord, script))
    try:
        text = "".join(stream_reply(None, Echo(), "p", stops=["### Instruction:"]))
    finally:
        chat.generate_stream = original
    assert text == "Red.\n\n"


def test_the_page_streams_a_reply_and_keeps_it(app_dirs):
    at = open_page()
    assert "single-turn" in at.caption[0].value
    at.selectbox(key="chat_model").set_value("base: tiny (random) (random weights)")
    at.number_input(key="chat_max_new").set_value(6)
    at.text_area(key="chat_instruction").set_value("Rewrite the sentence using a simile.")
    at.text_input(key="chat_input").set_value("The car is very fast.")
    at.button(key="chat_send").click().run()  # Send (the form's submit button)
    assert not at.exception, at.exception
    history = at.session_state["chat_history"]
    assert len(history) == 1 and history[0]["replies"][0]["state"] == "done"
    reply = history[0]["replies"][0]["text"]
    assert reply and reply in [c.value for c in at.code]
    prompt = history[0]["prompt"]
    assert prompt.endswith("### Input:\nThe car is very fast.\n\n### Response:\n")
    assert prompt.rstrip("\n") in [c.value for c in at.code]  # the exact prompt, one click away (st.code drops the last newline)
    at.button(key="chat_save_0_0").click().run()
    saved = json.loads((app_dirs["runs"] / ".chat" / "test-cases.json").read_text())
    assert saved == [{"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
                      "output": reply, "source": "chat: base: tiny (random) (random weights)"}]


def test_two_models_answer_the_same_message(app_dirs):
    from sft.studio.config import TrainConfig
    from sft.studio.runs import Run
    from sft.studio.worker import execute_run

    run = Run.create(TrainConfig(model="tiny", weights="random", limit=40, max_steps=2, response_tokens=2,
                                 sample_each_epoch=False), root=app_dirs["runs"], name="chatty")
    execute_run(run, responses=False)
    at = open_page()
    assert at.selectbox(key="chat_model").value == "run: chatty"
    at.toggle(key="chat_two").set_value(True).run()
    at.selectbox(key="chat_model_2").set_value("base: tiny (random) (random weights)")
    at.number_input(key="chat_max_new").set_value(5)
    at.text_area(key="chat_instruction").set_value("Name a primary colour.")
    at.button(key="chat_send").click().run()
    assert not at.exception, at.exception
    replies = at.session_state["chat_history"][0]["replies"]
    assert [r["model"] for r in replies] == ["run: chatty", "base: tiny (random) (random weights)"]
    assert all(r["state"] == "done" and r["text"] for r in replies)


def test_export_from_the_page_writes_hf_gguf_and_the_ollama_commands(app_dirs, tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setenv("SFT_EXPORTS_DIR", str(tmp_path / "exports"))
    at = open_page()
    at.selectbox(key="chat_model").set_value("base: tiny (random) (random weights)").run()
    at.text_input(key="export_name").set_value("my-tiny").run()
    at.button(key="export_go").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)
    out = tmp_path / "exports" / "tiny-random"
    status = export_job(tmp_path).wait(timeout=120)  # a background job: the page only started it
    assert status["state"] == "completed", export_job(tmp_path).tail_log(30)
    at.run()  # the page again, as its watcher reruns it once the job has ended
    assert not at.exception and not at.error, (at.exception, at.error)
    result = status["result"]
    assert result["out"] == str(out) and result["name"] == "my-tiny"
    gguf = out / "gguf" / "my-tiny-f32.gguf"
    assert gguf.is_file() and (out / "gguf" / "Modelfile").is_file()
    tensors = safetensors.torch.load_file(out / "hf" / "model.safetensors")
    assert tensors["transformer.wte.weight"].shape == (50257, model_config("tiny")["emb_dim"])
    codes = [c.value for c in at.code]
    assert "ollama create my-tiny -f Modelfile\nollama run my-tiny" in "\n".join(codes)
    assert any(c.startswith("FROM ./my-tiny-f32.gguf") for c in codes)  # the Modelfile, shown
    assert any(f"from_pretrained({str(out / 'hf')!r})" in c for c in codes)
    at.button(key="export_use_judge").click().run()  # the Judge page then asks the exported model
    assert at.session_state["judge_model"] == "my-tiny" and at.session_state["judge_backend"] == "ollama"
    at.switch_page("pages/5_judge.py").run()
    assert not at.exception and at.text_input(key="judge_model_text").value == "my-tiny"
    at.switch_page("pages/6_chat.py").run()
    # Exporting again into the same folder is fine (it is the app's own earlier export).
    at.button(key="export_go").click().run()
    assert not at.exception and not at.error
    assert export_job(tmp_path).wait(timeout=120)["state"] == "completed"


def export_job(tmp_path):
    from sft.studio.exports import export_job_folder
    from sft.studio.jobs import Job

    return Job(export_job_folder(tmp_path / "exports", "tiny-random"))


def test_a_stopped_export_says_so_and_keeps_what_it_wrote(app_dirs, tmp_path, monkeypatch):
    from sft.studio import jobs
    from sft.studio.exports import export_job as real  # and so registers the "export" kind
    from sft.studio.jobs import create_job, run_job

    monkeypatch.setenv("SFT_EXPORTS_DIR", str(tmp_path / "exports"))
    out = tmp_path / "exports" / "tiny-random"
    job = create_job(export_job(tmp_path).path, "export",
                     {"model": "tiny", "weights": "random", "models_dir": str(app_dirs["models"]), "out": str(out),
                      "formats": ["hf", "gguf"], "gguf_dtypes": ["f32"]})
    calls = []

    def stop_after_the_first_step(params, progress):  # the real kind, with a stop requested once it has begun
        def watched(done, total, what):
            calls.append(what)
            if done == 1:
                job.request_stop()
            progress(done, total, what)
        return real(params, watched)

    monkeypatch.setitem(jobs.KINDS, "export", stop_after_the_first_step)
    status = run_job(job.path)
    assert status["state"] == "stopped" and status["done"] == 1 and calls == ["Hugging Face folder", "GGUF f32"]
    assert (out / "hf" / "model.safetensors").is_file() and not (out / "gguf").exists()
    at = open_page()
    at.selectbox(key="chat_model").set_value("base: tiny (random) (random weights)").run()
    assert not at.exception, at.exception
    assert any("Stopped at 1 of 2 steps" in i.value for i in at.info), [i.value for i in at.info]
