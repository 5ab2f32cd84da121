"""Each page's main interactions through streamlit's AppTest (no browser): no exceptions, the right values."""
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "app.py")


def open_page(page=None):
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    if page:
        at.switch_page(page).run()
        assert not at.exception
    return at


def metrics(at):
    return {m.label: m.value for m in at.metric}


def texts(elements):
    return "\n".join(str(e.value) for e in elements)


def test_home_shows_the_pipeline_and_this_machine():
    at = open_page()
    assert at.title[0].value == "SFT Studio"
    headers = [h.value for h in at.subheader]
    assert headers[:3] == ["Stage 1: preparing the dataset", "Stage 2: fine-tuning the LLM",
                           "Stage 3: evaluating the LLM"]
    links = {link.label for link in at.get("page_link")}
    assert {"Open Data", "Open Batches", "Open Fine-tune", "Open Compare", "Open Judge"} <= links
    md = texts(at.markdown)
    assert "`cpu`: CPU" in md
    assert "gpt2-medium (355M): not downloaded" in md  # the tests' models folder is empty
    assert "not reachable at `http://127.0.0.1:9`" in md


def test_home_lists_the_judge_models_when_ollama_answers(monkeypatch):
    from fake_servers import FakeOllama

    with FakeOllama(models=["llama3:latest", "phi3:mini"]) as srv:
        monkeypatch.setenv("SFT_OLLAMA_URL", srv.base_url)
        at = open_page()
    assert f"answers at `{srv.base_url}`: llama3:latest, phi3:mini" in texts(at.markdown)


def test_data_page_bundled_dataset_split_and_entry():
    at = open_page("pages/1_data.py")
    assert "1100 entries, all valid" in at.success[0].value
    m = metrics(at)
    assert (m["train entries"], m["val entries"], m["test entries"]) == ("935", "55", "110")
    assert at.number_input(key="data_entry").value == 50  # the chapter's example entry
    code = at.code[0].value
    assert "### Instruction:\nIdentify the correct spelling of the following word." in code
    assert "### Input:\nOcassion" in code and "### Response:\n" in code
    assert {b.label for b in at.get("download_button")} == {
        "Download train.json", "Download val.json", "Download test.json"}

    at.text_input(key="data_search").set_value("antonym").run()
    shown = [c.value for c in at.caption if " of 1100 entries" in c.value]
    assert shown and not shown[0].startswith("1100 of")

    at.radio(key="data_style").set_value("phi3").run()
    assert not at.exception
    assert at.code[0].value.startswith("<|user|>\nIdentify the correct spelling")
    assert at.session_state["prompt_style"] == "phi3"  # kept for the other pages


def test_data_page_upload_good_and_bad(tmp_path):
    at = open_page("pages/1_data.py")
    at.radio(key="data_source").set_value("Upload JSON / JSONL").run()
    good = "\n".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) for i in range(20))
    at.file_uploader(key="data_upload").set_value(("mine.jsonl", good.encode(), "application/json")).run()
    assert not at.exception
    assert "**mine.jsonl**: 20 entries" in at.success[0].value
    m = metrics(at)
    assert (m["train entries"], m["val entries"], m["test entries"]) == ("17", "1", "2")

    bad = json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]).encode()
    at.file_uploader(key="data_upload").set_value(("bad.json", bad, "application/json")).run()
    assert not at.exception
    assert "entry 1: missing 'output'" in at.error[0].value
    assert "**mine.jsonl**: 20 entries" in at.success[0].value  # the previous dataset stays

    # Duplicates are reported by default (naming both entries); the person can keep or drop them.
    dups = json.dumps([{"instruction": "Hi.", "output": "a"}, {"instruction": "Bye.", "output": "b"},
                       {"instruction": "Hi.", "output": "c"}]).encode()
    at.file_uploader(key="data_upload").set_value(("dups.json", dups, "application/json")).run()
    assert "entry 2: duplicate of entry 0" in at.error[0].value
    at.radio(key="data_duplicates").set_value("drop").run()
    assert not at.exception and not at.error
    assert "**dups.json**: 2 entries" in at.success[0].value
    at.radio(key="data_duplicates").set_value("keep").run()
    assert "**dups.json**: 3 entries" in at.success[0].value


@pytest.fixture
def served_file(tmp_path):
    """A tiny HTTP server on 127.0.0.1 serving tmp_path (for the URL source); yields the base URL."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_data_page_loads_a_url(tmp_path, served_file):
    (tmp_path / "alpaca-like.json").write_text(json.dumps(
        [{"instruction": f"Count to {i}.", "input": None, "output": " ".join(map(str, range(i + 1)))}
         for i in range(40)]))
    at = open_page("pages/1_data.py")
    at.radio(key="data_source").set_value("URL").run()
    at.text_input(key="data_url").set_value(served_file + "/alpaca-like.json").run()
    at.button(key="data_load_url").click().run()
    assert not at.exception and not at.error
    assert "alpaca-like.json**: 40 entries" in at.success[0].value
    m = metrics(at)
    assert (m["train entries"], m["val entries"], m["test entries"]) == ("34", "2", "4")

    at.text_input(key="data_url").set_value(served_file + "/missing.json").run()
    at.button(key="data_load_url").click().run()
    assert "404" in at.error[0].value
    assert "40 entries" in at.success[0].value


def test_batches_page_first_train_batch_and_toy_batch():
    at = open_page("pages/2_batches.py")
    m = metrics(at)
    assert m["Shape (B, T)"] == "(8, 61)"  # listing 7.6: the first train batch is [8, 61]
    assert int(m["Targets that train"]) + int(m["Targets set to -100"]) == 8 * 61
    final = next(c.value for c in at.code if c.value.startswith("targets") and "-100" in c.value)  # custom_collate_fn's
    code = next(c.value for c in at.code if c.language == "python")  # the code behind the page: this batch
    assert "batch_number=0, batch_size=8" in code and "seed=123, allowed_max_length=1024" in code
    assert "[    6, 50256,  -100,  -100,  -100]" in final and "[    8,     9, 50256,  -100,  -100]" in final
    assert m["cross_entropy(logits, targets, ignore_index)"] == "1.1269"
    assert "All 935 train examples look right" in at.success[0].value

    at.number_input(key="bat_toy_pad").set_value(0).run()
    assert "[5, 6, 0, 0, 0]" in next(c.value for c in at.code if c.value.startswith("inputs")).replace(" ", "").replace(",", ", ")
    at.toggle(key="bat_mask").set_value(True).run()
    assert not at.exception
    assert int(metrics(at)["Targets that train"]) < int(m["Targets that train"])

    # The chapter's second example: a third row with target 1 instead of -100 gives 0.7936.
    rows = [dict(r) for r in at.session_state["bat_ce_rows"]]
    rows[2]["target"] = 1
    at.session_state["bat_ce_rows"] = rows
    at.run()
    assert metrics(at)["cross_entropy(logits, targets, ignore_index)"] == "0.7936"


def test_batches_page_truncation_is_reported():
    at = open_page("pages/2_batches.py")
    at.number_input(key="bat_maxlen").set_value(40).run()
    assert not at.exception
    assert "problem(s) in the train split" in at.error[0].value
    assert "examples are cut to 40 tokens" in texts(at.markdown)
    assert "do not keep exactly one end-of-text target" in texts(at.markdown)
    assert metrics(at)["Shape (B, T)"] == "(8, 40)"


def test_finetune_page_offers_tiny_when_weights_are_missing():
    at = open_page("pages/3_finetune.py")
    assert "gpt2-medium (355M) (openai) is not downloaded yet" in at.warning[0].value
    assert at.button(key="ft_start").disabled
    at.button(key="ft_use_tiny").click().run()
    assert at.selectbox(key="ft_model").value == "tiny (random)"
    assert not at.button(key="ft_start").disabled
    assert "No runs yet" in texts(at.info)


def download_job(app_dirs, model, source):
    from sft.studio.jobs import Job, download_job_folder

    return Job(download_job_folder(app_dirs["models"], model, source))


def test_finetune_page_download_failure_says_why(monkeypatch, app_dirs, serve):
    server = serve({})  # answers 404 to everything
    monkeypatch.setenv("SFT_WEIGHTS_BASE_URL", server.url)
    at = open_page("pages/3_finetune.py")
    at.radio(key="ft_source").set_value("hf").run()
    at.button(key="ft_download").click().run()
    assert not at.exception
    assert download_job(app_dirs, "gpt2-medium (355M)", "hf").wait(timeout=120)["state"] == "failed"
    at.run()
    msg = at.error[0].value
    assert msg.startswith("Failed at 0 MiB downloaded: ") and "openai-community/gpt2-medium" in msg and "404" in msg
    assert "Download gpt2-medium (355M) resumes it." in msg
    assert at.button(key="ft_use_tiny").label == "Use the tiny random model instead"
    assert at.button(key="ft_start").disabled


def test_finetune_page_downloads_in_a_background_job(monkeypatch, app_dirs, serve):
    from sft import weights

    server = serve({f"/124M/{name}": b"x" * 1000 for name in weights.OPENAI_FILES})
    monkeypatch.setenv("SFT_WEIGHTS_BASE_URL", server.url)
    at = open_page("pages/3_finetune.py")
    at.selectbox(key="ft_model").set_value("gpt2-small (124M)").run()
    at.button(key="ft_download").click().run()
    assert not at.exception and not at.error
    status = download_job(app_dirs, "gpt2-small (124M)", "openai").wait(timeout=120)
    assert status["state"] == "completed" and status["result"]["path"] == str(app_dirs["models"] / "124M")
    assert sorted(p.name for p in (app_dirs["models"] / "124M").iterdir()) == sorted(weights.OPENAI_FILES)
    at.run()
    assert not at.warning  # downloaded: no more "not downloaded yet"
    assert not at.button(key="ft_start").disabled


@pytest.mark.slow
def test_finetune_page_one_training_per_device(app_dirs):
    from sft.studio.runs import Run

    at = open_page("pages/3_finetune.py")
    at.button(key="ft_use_tiny").click().run()
    at.text_input(key="ft_run_name").set_value("first").run()
    at.button(key="ft_start").click().run()
    run = Run.open("first", root=app_dirs["runs"])
    try:
        at.run()
        assert "`cpu` is busy: run `first` is training on it" in texts(at.info)
        assert at.button(key="ft_start").disabled
        at.button(key="ft_stop").click().run()
        assert not at.exception
    finally:
        run.request_stop()
        status = run.wait(timeout=180)
    assert status["state"] == "stopped", run.tail_log(30)
    at.run()
    assert "is busy" not in texts(at.info) and not at.button(key="ft_start").disabled


def tiny_finetune_page(response_tokens):
    """The Fine-tune page set for a short run of the tiny model: 60 entries, 2 steps."""
    at = open_page("pages/3_finetune.py")
    at.button(key="ft_use_tiny").click().run()
    at.number_input(key="ft_limit").set_value(60)
    at.number_input(key="ft_max_steps").set_value(2)
    at.number_input(key="ft_response_tokens").set_value(response_tokens)
    return at


@pytest.mark.slow
def test_finetune_page_chapter_path_switch_and_memory_settings(app_dirs):
    from sft.studio.runs import Run

    at = tiny_finetune_page(response_tokens=2)
    at.toggle(key="ft_chapter_path").set_value(True).run()
    assert at.number_input(key="ft_accum").disabled and at.checkbox(key="ft_ckpt").disabled
    assert at.selectbox(key="ft_precision").disabled
    at.text_input(key="ft_run_name").set_value("chapter").run()
    at.button(key="ft_start").click().run()
    assert not at.exception and not at.error
    chapter = Run.open("chapter", root=app_dirs["runs"])
    assert chapter.config.is_chapter_path()
    assert chapter.wait(timeout=180)["state"] == "completed", chapter.tail_log(30)

    at.toggle(key="ft_chapter_path").set_value(False).run()
    at.number_input(key="ft_accum").set_value(2)
    at.checkbox(key="ft_ckpt").check()
    at.checkbox(key="ft_grouped").check()
    at.text_input(key="ft_run_name").set_value("lean").run()
    at.button(key="ft_start").click().run()
    assert not at.exception and not at.error
    lean = Run.open("lean", root=app_dirs["runs"])
    c = lean.config
    assert (c.grad_accum_steps, c.activation_checkpointing, c.group_by_length, c.compile) == (2, True, True, False)
    assert not c.is_chapter_path() and c.masked_head_loss
    assert lean.wait(timeout=180)["state"] == "completed", lean.tail_log(30)
    at.run()
    table = at.dataframe[-1].value
    assert dict(zip(table["name"], table["path"])) == {"chapter": "chapter", "lean": "fast"}


@pytest.mark.slow
def test_finetune_page_trains_the_tiny_model(app_dirs):
    from sft.studio.runs import Run

    at = tiny_finetune_page(response_tokens=4)
    at.text_input(key="ft_run_name").set_value("apptest").run()
    at.button(key="ft_start").click().run()
    assert not at.exception and not at.error
    run = Run.open("apptest", root=app_dirs["runs"])
    assert run.config.model == "tiny (random)" and run.config.weights == "random"
    assert run.wait(timeout=180)["state"] == "completed", run.tail_log(30)
    at.run()
    assert not at.exception
    assert "Done. Weights:" in at.success[0].value
    assert metrics(at)["Train loss"] != "–"
    assert float(metrics(at)["Tokens/s"].replace(",", "")) > 0
    assert at.get("plotly_chart")
    assert at.dataframe[-1].value["state"].tolist() == ["completed"]


@pytest.mark.slow
def test_finetune_page_shows_why_a_run_failed(app_dirs):
    from sft.studio.runs import Run
    from sft.studio.config import TrainConfig

    missing = app_dirs["runs"] / "no-such-data.json"
    run = Run.create(TrainConfig(model="tiny", weights="random", data=str(missing)), root=app_dirs["runs"],
                     name="broken")
    from sft.studio.worker import launch_worker

    proc = launch_worker(run)
    assert run.wait(timeout=180, proc=proc)["state"] == "failed"
    at = open_page("pages/3_finetune.py")
    assert at.selectbox(key="ft_run").value == "broken"
    assert "Failed: FileNotFoundError" in at.error[0].value and "no-such-data.json" in at.error[0].value
    assert "no-such-data.json" in at.code[-1].value  # the tail of the worker's log


@pytest.fixture
def trained_run(app_dirs):
    """A finished tiny run, trained in this process (2 steps, 6 test entries)."""
    from sft.studio.runs import Run
    from sft.studio.worker import execute_run
    from sft.studio.config import TrainConfig

    config = TrainConfig(model="tiny", weights="random", limit=60, max_steps=2, response_tokens=4,
                         sample_each_epoch=False)
    run = Run.create(config, root=app_dirs["runs"], name="trained")
    execute_run(run)
    return run


@pytest.mark.slow
def test_compare_page_answers_side_by_side_and_the_whole_split(trained_run):
    at = open_page("pages/4_compare.py")
    assert at.selectbox(key="cmp_run").value == "trained"
    assert at.selectbox(key="cmp_base").value == "tiny (random)"
    assert at.multiselect(key="cmp_entries").value == [0, 1, 2]
    at.number_input(key="cmp_max_new").set_value(5)
    at.button(key="cmp_go").click().run()
    assert not at.exception
    md = texts(at.markdown)
    assert md.count("*Reference*") == 3 and "*Base: tiny (random)*" in md and "*Fine-tuned: trained*" in md
    # Answers are plain text, as the model wrote them: a "### Response" in one is no heading.
    shown = [t.value for t in at.text]
    results = at.session_state["cmp_results"]
    assert all(r["tuned"] in shown and r["output"] in shown for r in results), shown

    from sft.studio.jobs import Job

    trained_run.responses_path.unlink()
    at.button(key="cmp_all").click().run()  # a background job: the page watches it, nothing stale is shown
    assert not at.exception
    assert at.button(key="cmp_all").disabled and at.button(key="cmp_job_stop").label == "Stop"
    assert not at.success and at.progress[0].value < 100
    job = Job(trained_run.path / "jobs" / "answers")
    assert job.params["max_new_tokens"] == 5 and job.params["run"] == str(trained_run.path)
    assert job.wait(timeout=120)["state"] == "completed", job.tail_log()
    at.run()  # a later rerun (the watching fragment's, or a reload) shows the result
    assert not at.exception and not at.progress
    answers = json.loads(trained_run.responses_path.read_text())
    assert len(answers) == 6 and all("model_response" in a for a in answers)
    assert "6 answers in" in at.success[0].value
    assert at.download_button(key="cmp_dl").label == "Download instruction-data-with-response.json"
    assert list(at.dataframe[0].value.columns[:3]) == ["instruction", "model_response", "output"]
    assert at.dataframe[0].value["model_response"].tolist() == [a["model_response"] for a in answers]


@pytest.mark.slow
def test_compare_page_precision_fp32_gives_the_chapters_greedy_answers(trained_run):
    from sft.fast.decode import generate_responses
    from sft.studio.hardware import cpu_has_fast_bf16
    from sft.tokenizer import get_tokenizer
    from sft.studio.finetuned import load_finetuned

    at = open_page("pages/4_compare.py")
    assert at.selectbox(key="cmp_precision").value == ("bf16" if cpu_has_fast_bf16() else "fp32")
    at.number_input(key="cmp_max_new").set_value(6)
    test = json.loads(trained_run.test_data_path.read_text())[:3]
    model = load_finetuned(trained_run.model_path).eval()
    expected = [r["model_response"] for r in generate_responses(model, test, get_tokenizer(), max_new_tokens=6)]
    for precision in ("fp32", "bf16"):
        at.selectbox(key="cmp_precision").set_value(precision).run()
        at.button(key="cmp_go").click().run()
        assert not at.exception
        tuned = [r["tuned"] for r in at.session_state["cmp_results"]]
        assert len(tuned) == 3 and all(isinstance(t, str) for t in tuned)
        if precision == "fp32":
            assert tuned == expected


def test_compare_page_without_runs_says_what_to_do():
    at = open_page("pages/4_compare.py")
    assert "fine-tune one on the Fine-tune page" in at.info[0].value


def test_judge_page_has_its_place():
    at = open_page("pages/5_judge.py")
    assert not at.exception


def test_compare_page_answers_with_a_stopped_runs_checkpoint(app_dirs):
    from sft.studio.runs import Run
    from sft.studio.worker import execute_run
    from sft.studio.config import TrainConfig

    run = Run.create(TrainConfig(model="tiny", weights="random", limit=60), root=app_dirs["runs"], name="halted")
    # A stop asked after the first step: the trainer checkpoints and stops, no final weights.
    execute_run(run, callbacks=[lambda event: event["type"] == "step" and run.request_stop()])
    assert run.state == "stopped" and run.has_checkpoint and not run.model_path.exists()
    at = open_page("pages/4_compare.py")
    assert "checkpoints/last.pt" in at.caption[1].value
    at.radio(key="cmp_mode").set_value("My own instruction").run()
    at.number_input(key="cmp_max_new").set_value(4)
    at.button(key="cmp_go").click().run()
    assert not at.exception
    md = texts(at.markdown)
    assert "**Rewrite the sentence using a simile.**" in md and "*Fine-tuned: halted*" in md
    assert "(none: your own instruction)" in [t.value for t in at.text]


@pytest.mark.slow
def test_finetune_page_trains_a_lora_run(app_dirs):
    from sft.studio.runs import Run

    at = tiny_finetune_page(response_tokens=2)
    assert "6,549,376 trainable" in texts(at.caption)  # full fine-tuning: every weight of the tiny model
    at.radio(key="ft_method").set_value("LoRA").run()
    assert "**842,000 trainable** of 7,391,376 parameters (11.39%)" in texts(at.caption)  # rank 16, every Linear
    at.number_input(key="ft_lora_rank").set_value(4).run()
    at.multiselect(key="ft_lora_targets").set_value(["query", "value"]).run()
    cap = texts(at.caption)
    assert "**2,048 trainable** of 6,551,424 parameters (0.03%)" in cap, cap  # 2 layers x 2 x rank 4 x (64 + 64)
    at.text_input(key="ft_run_name").set_value("lora").run()
    at.button(key="ft_start").click().run()
    assert not at.exception and not at.error
    run = Run.open("lora", root=app_dirs["runs"])
    c = run.config
    assert (c.lora_rank, c.lora_alpha, c.lora_targets, c.method) == (4, 16.0, "query,value", "LoRA")
    assert run.wait(timeout=180)["state"] == "completed", run.tail_log(30)
    assert run.adapter_path.is_file()
    at.run()
    table = at.dataframe[-1].value
    assert dict(zip(table["name"], table["method"])) == {"lora": "LoRA"}
