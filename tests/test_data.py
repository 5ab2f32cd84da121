"""Loading, validation, the chapter's split and length statistics. No test touches the network."""
import json

import pytest

import sft.data as data_mod
from sft.data import (
    DataValidationError, download_and_load_file, length_stats, load_instruction_data, split_data,
    validate_entries,
)

GOOD = [
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour."},
    {"instruction": "What is 2+2?", "output": "4"},  # Alpaca-52K entries may lack `input`
]


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def problems_of(source, **kwargs):
    with pytest.raises(DataValidationError) as info:
        load_instruction_data(source, **kwargs)
    return info.value.problems, str(info.value)


# ---------------------------------------------------------------- the chapter's functions

def test_download_and_load_file_downloads_once(tmp_path, serve, instruction_data):
    server = serve({"/ch07/instruction-data.json": json.dumps(instruction_data).encode("utf-8")})
    url = server.url + "/ch07/instruction-data.json"
    path = tmp_path / "instruction-data.json"
    data = download_and_load_file(str(path), url)
    assert len(data) == 1100 and data == instruction_data
    assert [p for p, _ in server.requests] == ["/ch07/instruction-data.json"] and path.exists()
    assert download_and_load_file(str(path), url) == instruction_data
    assert len(server.requests) == 1  # the second call reads the file
    assert list(tmp_path.iterdir()) == [path]  # no temp or .part files left behind


def test_split_sizes_and_order(instruction_data):
    train, test, val = split_data(instruction_data)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train == instruction_data[:935]
    assert test == instruction_data[935:1045]
    assert val == instruction_data[1045:]


def test_split_truncates_like_the_chapter():
    train, test, val = split_data(list(range(99)))
    assert (len(train), len(test), len(val)) == (84, 9, 6)  # int(84.15), int(9.9), the rest


# ---------------------------------------------------------------- loading from anywhere

def test_bundled_data(instruction_data):
    data = load_instruction_data()
    assert data == instruction_data  # same entries; the chapter's 25 duplicates are kept
    assert data[50]["input"] == "Ocassion"
    assert data[999]["instruction"] == "What is an antonym of 'complicated'?"


def test_path_bytes_upload_and_url_agree(tmp_path, monkeypatch):
    expected = [dict(e, input=e.get("input", "")) for e in GOOD]
    path = write(tmp_path, "data.json", GOOD)
    assert load_instruction_data(path) == expected
    assert load_instruction_data(str(path)) == expected
    assert load_instruction_data(path.read_bytes()) == expected
    with open(path, "rb") as f:  # a file-like upload
        assert load_instruction_data(f) == expected
    monkeypatch.setattr(data_mod, "_fetch_text", lambda url, timeout=60: path.read_bytes())
    assert load_instruction_data("https://example.org/alpaca_data.json") == expected


def test_jsonl_and_bom(tmp_path):
    expected = [dict(e, input=e.get("input", "")) for e in GOOD]
    lines = "\n".join(json.dumps(e) for e in GOOD) + "\n\n"
    assert load_instruction_data(write(tmp_path, "data.jsonl", lines)) == expected
    assert load_instruction_data(write(tmp_path, "noext", lines)) == expected  # detected without a suffix
    assert load_instruction_data(lines.encode("utf-8")) == expected
    assert load_instruction_data(json.dumps(GOOD[0]).encode()) == expected[:1]  # one-line JSONL
    assert load_instruction_data(b"\xef\xbb\xbf" + json.dumps(GOOD).encode()) == expected


def test_alpaca_52k_shape_and_extra_keys():
    data = load_instruction_data(json.dumps([
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."},
        {"instruction": "Rate it.", "input": None, "output": "5", "model_response": "4"},
    ]).encode())
    assert data[1] == {"instruction": "Rate it.", "input": "", "output": "5", "model_response": "4"}


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_instruction_data(tmp_path / "nope.json")


# ---------------------------------------------------------------- validation on crafted bad files

def test_top_level_object(tmp_path):
    path = write(tmp_path, "obj.json", '{\n "data": [\n  {"instruction": "a", "output": "b"}\n ]\n}')
    problems, message = problems_of(path)
    assert problems == ["top level is a JSON object; expected a list of entries "
                        "(a JSON array, or JSONL with one object per line)"]
    assert str(path) in message and "nothing loaded" in message


def test_top_level_not_a_list(tmp_path):
    assert problems_of(write(tmp_path, "num.json", "42"))[0] == ["top level is int; expected a list of entries"]
    with pytest.raises(DataValidationError, match="top level is str"):
        validate_entries("not a list")


def test_an_empty_list_is_nothing_to_train_on(tmp_path):
    for source in (write(tmp_path, "empty.json", "[]"), b"[ ]"):
        assert problems_of(source)[0] == ["the file holds no entries (an empty list): nothing to train on"]
    assert "empty.json" in problems_of(write(tmp_path, "empty.json", "[]"))[1]
    assert problems_of(write(tmp_path, "blank.jsonl", "\n\n"))[0] == ["the file is empty"]


def test_one_object_in_a_json_file_must_be_a_list(tmp_path):
    path = write(tmp_path, "one.json", json.dumps(GOOD[0]))  # one object on one line
    problems, message = problems_of(path)
    assert problems == ["top level is one JSON object, but a .json file must hold a list of entries "
                        "([{...}, {...}]); for one object per line, name the file .jsonl"]
    assert str(path) in message
    lines = write(tmp_path, "lines.json", "\n".join(json.dumps(e) for e in GOOD))  # JSONL named .json
    assert "name the file .jsonl" in problems_of(lines)[0][0]
    assert len(load_instruction_data(write(tmp_path, "one.jsonl", json.dumps(GOOD[0])))) == 1


def test_json_nested_too_deeply_is_bad_json_not_a_crash(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    problems, _ = problems_of(write(tmp_path, "deep.json", deep))
    assert problems[0].startswith("bad JSON at line 1, column 1: nested too deeply")
    problems, _ = problems_of(write(tmp_path, "deep.jsonl", deep + "\n"))
    assert problems[0].startswith("line 1, column 1: bad JSON: nested too deeply")


def test_entry_not_an_object(tmp_path):
    problems, _ = problems_of(write(tmp_path, "bad.json", [GOOD[0], "just text", [1, 2]]))
    assert problems == [
        "entry 1: is str, expected an object with instruction/input/output",
        "entry 2: is list, expected an object with instruction/input/output",
    ]


def test_missing_and_non_string_fields(tmp_path):
    bad = [
        {"input": "", "output": "x"},
        {"instruction": "a", "input": ""},
        {"instruction": 7, "input": "", "output": "x"},
        {"instruction": "b", "input": ["list"], "output": "x"},
        {"instruction": "c", "input": "", "output": {"text": "x"}},
    ]
    problems, _ = problems_of(write(tmp_path, "fields.json", bad))
    assert problems == [
        "entry 0: missing 'instruction'",
        "entry 1: missing 'output'",
        "entry 2: 'instruction' is int, expected a string",
        "entry 3: 'input' is list, expected a string",
        "entry 4: 'output' is dict, expected a string",
    ]


def test_empty_output_and_instruction(tmp_path):
    bad = [GOOD[0], {"instruction": "a", "input": "", "output": "  \n"}, {"instruction": "", "output": "x"}]
    problems, _ = problems_of(write(tmp_path, "empty.json", bad))
    assert problems == ["entry 1: 'output' is empty", "entry 2: 'instruction' is empty"]


def test_special_token_text(tmp_path):
    bad = [{"instruction": "a", "input": "", "output": "x <|endoftext|> y"}]
    problems, _ = problems_of(write(tmp_path, "eot.json", bad))
    assert problems == ["entry 0: 'output' contains the special token text <|endoftext|>"]


def test_unreadable_encoding_names_the_file(tmp_path):
    path = write(tmp_path, "latin1.json", '[{"instruction": "café", "output": "x"}]'.encode("latin-1"))
    problems, message = problems_of(path)
    assert problems == ["not UTF-8 text: cannot decode byte 0xe9 at offset 21 (invalid continuation byte)"]
    assert message.startswith(str(path))


def test_bad_json_line_and_column(tmp_path):
    path = write(tmp_path, "broken.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]')
    problems, message = problems_of(path)
    assert problems == ["bad JSON at line 3, column 23: Expecting ',' delimiter"]
    assert str(path) in message


def test_bad_jsonl_names_every_bad_line(tmp_path):
    lines = [json.dumps(GOOD[0]), '{"instruction": "x", "output": }', json.dumps(GOOD[1]), "{oops"]
    problems, _ = problems_of(write(tmp_path, "broken.jsonl", "\n".join(lines)))
    assert problems == [
        "line 2, column 32: bad JSON: Expecting value",
        "line 4, column 2: bad JSON: Expecting property name enclosed in double quotes",
    ]


def test_empty_file(tmp_path):
    assert problems_of(write(tmp_path, "empty.json", "  \n"))[0] == ["the file is empty"]


def test_duplicates(tmp_path):
    dup = [GOOD[0], GOOD[1], dict(GOOD[0], output="Blue."), dict(GOOD[1], input="Goodbye")]
    path = write(tmp_path, "dup.json", dup)
    problems, message = problems_of(path)
    assert problems == ["entry 2: duplicate of entry 0 (same instruction and input)"]
    assert "duplicates='keep'" in message
    assert len(load_instruction_data(path, duplicates="keep")) == 4
    assert [e["output"] for e in load_instruction_data(path, duplicates="drop")] == ["Red.", "Bonjour.", "Bonjour."]
    with pytest.raises(ValueError, match="duplicates must be"):
        load_instruction_data(path, duplicates="sometimes")


def test_bundled_duplicates_are_reported_when_asked(instruction_data):
    with pytest.raises(DataValidationError) as info:
        validate_entries(instruction_data, duplicates="error")
    assert len(info.value.problems) == 25
    assert info.value.problems[0] == "entry 323: duplicate of entry 125 (same instruction and input)"
    assert len(validate_entries(instruction_data, duplicates="drop")) == 1075


def test_all_problems_in_one_error_with_a_capped_message(tmp_path):
    bad = [{"instruction": f"task {i}", "input": "", "output": ""} for i in range(30)] + [5]
    problems, message = problems_of(write(tmp_path, "many.json", bad))
    assert len(problems) == 31
    assert problems[-1] == "entry 30: is int, expected an object with instruction/input/output"
    assert "31 problems found" in message
    assert "entry 19: 'output' is empty" in message and "entry 20:" not in message
    assert "... and 11 more" in message


# ---------------------------------------------------------------- length statistics

def test_length_stats_match_the_dataset(instruction_data, tokenizer):
    from sft.batching import InstructionDataset

    subset = instruction_data[:40]
    stats = length_stats(subset, tokenizer)
    dataset = InstructionDataset(subset, tokenizer)
    assert stats["lengths"] == [len(ids) for ids in dataset.encoded_texts]
    assert stats["prompt_lengths"] == dataset.prompt_lengths
    assert [p + r for p, r in zip(stats["prompt_lengths"], stats["response_lengths"])] == stats["lengths"]
    summary = stats["summary"]
    assert summary["count"] == 40 and summary["min"] == min(stats["lengths"]) and summary["max"] == max(stats["lengths"])
    assert summary["over_max_length"] == 0
    assert length_stats(subset, tokenizer, allowed_max_length=50)["summary"]["over_max_length"] == sum(
        n > 50 for n in stats["lengths"])
    assert length_stats(subset, tokenizer, prompt_style="phi3")["lengths"] != stats["lengths"]


def test_length_stats_whole_chapter_dataset(instruction_data, tokenizer):
    summary = length_stats(instruction_data, tokenizer)["summary"]
    assert (summary["count"], summary["min"], summary["max"], summary["over_max_length"]) == (1100, 40, 91, 0)


# ---------------------------------------------------------------- a URL that cannot be fetched, in words

@pytest.fixture
def no_proxy(monkeypatch):
    """Requests go straight to the host (a proxy in the environment would answer for it)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def fetch_error(url):
    with pytest.raises(data_mod.DataFetchError) as info:
        load_instruction_data(url)
    return info.value


def test_an_unresolvable_host_says_no_network_and_what_to_do(no_proxy):
    url = "http://nonexistent.invalid/x.json"  # .invalid never resolves (RFC 2606)
    err = fetch_error(url)
    assert err.url == url
    assert err.reason == "no network, or no such host: the name nonexistent.invalid could not be resolved"
    assert str(err) == f"{url}: {err.reason}. {data_mod.OFFLINE_ADVICE}"
    assert "download the file on a machine that has network access" in str(err)
    assert "NameResolutionError" not in str(err) and "Max retries" not in str(err)
    assert isinstance(err, OSError)


def test_a_closed_port_says_refused(no_proxy):
    import socket

    with socket.socket() as s:  # a port nothing listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = fetch_error(f"http://127.0.0.1:{port}/data.json")
    assert err.reason == f"127.0.0.1:{port} refused the connection (nothing serves files there)"
    assert err.advice == "Check the address and port, or start the server."


def test_a_silent_server_times_out_in_words(no_proxy):
    import socket

    with socket.socket() as server:  # accepts the connection (the kernel's backlog) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with pytest.raises(data_mod.DataFetchError) as info:
            data_mod._fetch_text(f"http://127.0.0.1:{port}/slow.json", timeout=0.3)
    assert info.value.reason == (f"no answer from 127.0.0.1:{port} within 0.3 s "
                                 "(a slow or lost network, or the server is down)")


def test_http_errors_name_the_status(serve, no_proxy):
    server = serve({"/there.json": json.dumps(GOOD).encode()})
    assert load_instruction_data(server.url + "/there.json") == validate_entries(GOOD)
    err = fetch_error(server.url + "/missing.json")
    assert err.reason == "HTTP 404 Not Found"
    assert err.advice == "The server has no file for this address: check it."
