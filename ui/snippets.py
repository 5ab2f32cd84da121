"""The code behind each page: the few lines of ``sft`` Python (and the ``python -m sft`` command where one
exists) that redo what the page just did with its current settings, so a learner can redo it in a
notebook. Each snippet ends by setting ``result``, which the tests compare with what the page shows.
"""
import shlex
from dataclasses import fields
from pathlib import Path

from sft.studio.config import TrainConfig, field_type


def _lit(value):
    return repr(value)


def data(source=None, duplicates=None, prompt_style="alpaca", entry=50):
    """Data page: load and check the dataset, the chapter's split, one entry formatted as a prompt."""
    code = f"""from sft import get_prompt_style, load_instruction_data, split_data

data = load_instruction_data({_lit(source)}, duplicates={_lit(duplicates)})  # every entry checked
train, test, val = split_data(data)  # the chapter's 85% / 10% / 5%
example = get_prompt_style({_lit(prompt_style)}).format_example(data[{entry}])
print(example)
result = {{"entries": len(data), "train": len(train), "val": len(val), "test": len(test), "example": example}}"""
    cli = ["python", "-m", "sft", "data"] + ([str(source)] if source else []) + \
        (["--duplicates", duplicates] if duplicates else []) + ["--prompt-style", prompt_style]
    return code, shlex.join(cli)


def batches(split="train", batch_number=0, batch_size=8, seed=123, allowed_max_length=1024,
            mask_instruction=False, prompt_style="alpaca", source=None, duplicates=None):
    """Batches page: one batch exactly as the training loader builds it (listing 7.6's loader)."""
    code = f"""from sft import get_tokenizer, load_instruction_data, split_data
from sft.batching import get_batch

train, test, val = split_data(load_instruction_data({_lit(source)}, duplicates={_lit(duplicates)}))
batch = get_batch({split}, get_tokenizer(), batch_number={batch_number}, batch_size={batch_size},
                  shuffle={split == "train"}, seed={seed}, allowed_max_length={allowed_max_length},
                  prompt_style={_lit(prompt_style)}, mask_instruction={mask_instruction})
inputs, targets = batch["inputs"], batch["targets"]  # padded with 50256; targets shifted, -100 masked
print(inputs.shape, (targets == -100).sum().item(), "targets ignored by the loss")
result = {{"shape": tuple(inputs.shape), "ignored": int((targets == -100).sum()), "rows": batch["indices"]}}"""
    return code, None


def _given(config):
    """The settings of ``config`` that differ from the defaults of its model (what a person chose)."""
    defaults = TrainConfig.defaults_for(config.model)
    return {f.name: getattr(config, f.name) for f in fields(config)
            if getattr(config, f.name) != getattr(defaults, f.name) or f.name == "model"}


def finetune(config, name=None, root="runs"):
    """Fine-tune page: the run's settings, a run folder, the worker. And the same from the command line."""
    given = _given(config)
    chapter = config.is_chapter_path()
    args = ", ".join(f"{k}={_lit(v)}" for k, v in given.items() if not (chapter and k in _chapter_keys()))
    make = f"TrainConfig.from_settings({args}{', ' if args else ''}chapter_path=True)" if chapter else \
        f"TrainConfig.from_settings({args})"
    code = f"""from sft import Run, TrainConfig, launch_worker

config = {make}.validate()
run = Run.create(config, root={_lit(str(root))}{f", name={_lit(name)}" if name else ""})
launch_worker(run)  # trains in its own process; run.status() and run.read_metrics() follow it
result = config"""
    cli = ["python", "-m", "sft", "train"] + (["--chapter-path"] if chapter else [])
    for key, value in given.items():
        if chapter and key in _chapter_keys():
            continue
        flag = "--" + key.replace("_", "-")
        kind, _ = field_type(next(f for f in fields(TrainConfig) if f.name == key))
        if kind is bool:
            cli.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            cli += [flag, ",".join(map(str, value))]
        else:
            cli += [flag, "none" if value is None else str(value)]
    cli += ["--runs-root", str(root)] + (["--name", name] if name else [])
    return code, shlex.join(cli)


def _chapter_keys():
    from sft.studio.config import CHAPTER_SETTINGS

    return set(CHAPTER_SETTINGS)


def compare(run_dir, entries_from="test", count=3, max_new_tokens=256, temperature=0.0, top_k=None, seed=123,
            prompt_style="alpaca", indices=None, own=None):
    """Compare page: a run's model answers test entries (the chapter's section 7.7, batched): the first
    ``count``, those at ``indices``, or ``own``, a list of {"instruction", "input"} typed on the page."""
    if own is not None:
        pick = f"entries = {_lit([dict(e) for e in own])}"
    elif indices is not None:
        pick = f"test = read_json(run.test_data_path)\nentries = [test[i] for i in {_lit(list(indices))}]"
    else:
        pick = f"entries = read_json(run.test_data_path)[:{count}]"
    code = f"""import torch
from sft import Run, generate_responses, get_tokenizer
from sft.studio.files import read_json

run = Run({_lit(str(run_dir))})
model = run.load_model()  # its final weights (or its last checkpoint)
{pick}
torch.manual_seed({seed})
answers = generate_responses(model, entries, get_tokenizer(), prompt_style={_lit(prompt_style)},
                             max_new_tokens={max_new_tokens}, temperature={temperature}, top_k={_lit(top_k)})
result = [a["model_response"] for a in answers]"""
    cli = ["python", "-m", "sft", "generate", "--run-dir", str(run_dir), "--max-new-tokens", str(max_new_tokens)]
    return code, shlex.join(cli)


def judge(answers_path, key="model_response", backend="ollama", model="llama3", url=None, count=None,
          store_beside=None):
    """Judge page: the chapter's scoring (its prompt, seed 123, temperature 0), resumable. The scores file
    sits beside ``store_beside`` (default: the answers file), as the page keeps it."""
    store_beside = answers_path if store_beside is None else store_beside
    code = f"""from sft.judge import default_scores_path, load_entries, make_client, score_responses
from sft.judge.stats import summarize_scores

entries = load_entries({_lit(str(answers_path))}){f"[:{count}]" if count else ""}
client = make_client({_lit(backend)}, {_lit(model)}, {_lit(url)})
records = score_responses(entries, {_lit(key)}, client=client,
                          store=default_scores_path({_lit(str(store_beside))}, {_lit(key)}))
summary = summarize_scores([r["score"] for r in records])
result = summary["mean"]"""
    cli = ["python", "-m", "sft", "judge", str(answers_path), "--key", key, "--model", model, "--backend", backend]
    cli += ["--url", url] if url else []
    if str(store_beside) != str(answers_path):
        from sft.judge import default_scores_path

        cli += ["--out", str(default_scores_path(store_beside, key))]
    return code, shlex.join(cli)


def _load_model(choice, models_dir):
    """The lines that load a model the way the Chat and Learn pages do: ("run", run folder) or
    ("base", model name, weights source)."""
    if choice[0] == "run":
        return f"from sft import Run\n\nmodel = Run({_lit(str(choice[1]))}).load_model()  # its final weights"
    return (f"from sft.weights import load_pretrained\n\n"
            f"model = load_pretrained({_lit(choice[1])}, {_lit(str(models_dir))}, source={_lit(choice[2])}).eval()")


def chat(choice, instruction, input_text="", prompt_style="alpaca", max_new_tokens=200, temperature=0.0, top_k=None,
         models_dir="models"):
    """Chat page: one message answered by the first model, as the page streams it (pieces joined here).
    ``choice``: ("run", run folder) or ("base", model name, weights source)."""
    code = f"""import torch
{_load_model(choice, models_dir)}
from sft.studio.chat import chat_prompt, stop_markers, stream_reply
from sft.tokenizer import get_tokenizer

prompt = chat_prompt({_lit(instruction)}, {_lit(input_text)}, {_lit(prompt_style)})
torch.manual_seed(123)
pieces = stream_reply(model, get_tokenizer(), prompt, stops=stop_markers({_lit(prompt_style)}),
                      max_new_tokens={max_new_tokens}, temperature={temperature}, top_k={_lit(top_k)})
result = "".join(pieces).lstrip()  # the page shows each piece as it comes"""
    return code, None


def learn(choice, split="val", index=0, prompt_style="alpaca", mask_instruction=False, allowed_max_length=1024,
          source=None, duplicates=None, models_dir="models"):
    """Learn page: one entry through the training's collate and masks, each target's loss under the model;
    their mean over the targets that are not -100 is the chapter's loss of this example."""
    code = f"""{_load_model(choice, models_dir)}
from sft import get_tokenizer, load_instruction_data, split_data
from sft.studio.token_loss import explain_example

train, test, val = split_data(load_instruction_data({_lit(source)}, duplicates={_lit(duplicates)}))
cells = explain_example(model, {split}[{index}], get_tokenizer(), prompt_style={_lit(prompt_style)},
                        mask_instruction={mask_instruction}, allowed_max_length={allowed_max_length})
trained = [c["loss"] for c in cells if c["in_loss"]]  # targets that are not -100
for c in cells[:8]:
    print(repr(c["token_text"]), "->", repr(c["target_text"]), c["loss"], c["top"][:2])
result = {{"mean_loss": sum(trained) / len(trained), "targets": len(trained)}}"""
    return code, None


def experiments(run_dirs):
    """Experiments page: the runs picked, what each achieved and the settings that differ between them."""
    code = f"""from sft import Run
from sft.studio.experiments import compare_runs

runs = [Run(path) for path in {_lit([str(p) for p in run_dirs])}]
table = compare_runs(runs)  # {{"rows": what each run achieved, "differs": {{setting: [value per run]}}}}
for row in table["rows"]:
    print(row["run"], row["state"], row.get("val_loss"))
print(table["differs"])
result = table"""
    return code, shlex.join(["python", "-m", "sft", "runs", "list", "--runs-root", str(Path(run_dirs[0]).parent)]
                            if run_dirs else ["python", "-m", "sft", "runs", "list"])


def preference(first=0, count=2, mask_prompt_tokens=True, identical="keep", from_run=None, settings=None):
    """Preference page: the pairs collated as the page draws them, with the DPO notebook's functions; and the
    DPO run the page would start, from a terminal."""
    code = f"""from sft import get_tokenizer
from sft.dpo import PreferenceDataset, custom_collate_fn, load_preference_data

data = load_preference_data(identical={_lit(identical)})  # the book's 1100 pairs, every entry checked
pairs = PreferenceDataset(data[{first}:{first + count}], get_tokenizer())
batch = custom_collate_fn([pairs[i] for i in range(len(pairs))], mask_prompt_tokens={mask_prompt_tokens})
# chosen and rejected padded to one length with 50256; the masks keep only the answers' tokens
print(batch["chosen"].shape, batch["chosen_mask"].sum(dim=1), batch["rejected_mask"].sum(dim=1))
result = {{"cols": batch["chosen"].shape[1],
          "kept": [int(n) for pair in zip(batch["chosen_mask"].sum(dim=1), batch["rejected_mask"].sum(dim=1))
                   for n in pair]}}"""
    cli = None
    if from_run:
        cli = ["python", "-m", "sft", "dpo", "--from-run", str(from_run), "--identical", identical]
        for key, value in (settings or {}).items():
            if value is not None:
                cli += ["--" + key.replace("_", "-"), str(value)]
        cli = shlex.join(cli)
    return code, cli
