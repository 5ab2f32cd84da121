"""Weights: OpenAI's TF checkpoint and HF safetensors both load into GPTModel with the logits of
transformers' GPT2LMHeadModel; downloads (progress, resume, size/sha checks, offline) against a local
HTTP server; clear errors for bad files."""
import hashlib
import json
import re
import socket
import sys

import numpy as np
import pytest
import torch

import sft.model
from sft.download import DownloadError, download_file
from sft.model import GPTModel
from sft.weights import (
    OPENAI_FILES,
    assign,
    download_and_load_gpt2,
    download_weights,
    download_hf_gpt2,
    load_gpt2_params_from_safetensors,
    load_gpt2_params_from_tf_ckpt,
    load_hf_safetensors_into_gpt,
    load_pretrained,
    load_weights_into_gpt,
    weights_available,
)

# A two-block GPT-2 in miniature: every code path of the real sizes, in milliseconds.
SMALL = {"vocab_size": 64, "context_length": 16, "emb_dim": 12, "n_heads": 2, "n_layers": 2,
         "drop_rate": 0.0, "qkv_bias": True}
IDS = torch.tensor([[1, 5, 9, 2, 63, 0, 7], [3, 3, 3, 8, 40, 11, 12]])  # (B=2, T=7)


def _tf():
    try:
        import tensorflow as tf
    except ImportError:  # CI installs it (requirements-dev.txt); a skip would hide a broken loader
        pytest.fail("tensorflow is needed for the OpenAI-checkpoint tests: pip install tensorflow-cpu")
    return tf


def hparams_of(cfg):
    return {"n_vocab": cfg["vocab_size"], "n_ctx": cfg["context_length"], "n_embd": cfg["emb_dim"],
            "n_head": cfg["n_heads"], "n_layer": cfg["n_layers"]}


def openai_arrays(cfg, seed=0):
    """Random variables named and shaped as in OpenAI's checkpoint (conv1d weights are [1, nx, nf])."""
    rng = np.random.default_rng(seed)

    def r(*shape, mean=0.0):
        return (mean + 0.2 * rng.standard_normal(shape)).astype(np.float32)

    C = cfg["emb_dim"]
    a = {"model/wte": r(cfg["vocab_size"], C), "model/wpe": r(cfg["context_length"], C),
         "model/ln_f/g": r(C, mean=1.0), "model/ln_f/b": r(C)}
    for i in range(cfg["n_layers"]):
        h = f"model/h{i}"
        a.update({f"{h}/ln_1/g": r(C, mean=1.0), f"{h}/ln_1/b": r(C),
                  f"{h}/attn/c_attn/w": r(1, C, 3 * C), f"{h}/attn/c_attn/b": r(3 * C),
                  f"{h}/attn/c_proj/w": r(1, C, C), f"{h}/attn/c_proj/b": r(C),
                  f"{h}/ln_2/g": r(C, mean=1.0), f"{h}/ln_2/b": r(C),
                  f"{h}/mlp/c_fc/w": r(1, C, 4 * C), f"{h}/mlp/c_fc/b": r(4 * C),
                  f"{h}/mlp/c_proj/w": r(1, 4 * C, C), f"{h}/mlp/c_proj/b": r(C)})
    return a


def write_openai_checkpoint(folder, cfg, arrays):
    """OpenAI's folder layout, the checkpoint written by TensorFlow's v1 Saver in graph mode."""
    tf = _tf()
    tf1 = tf.compat.v1
    folder.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        for name, value in arrays.items():
            scope, leaf = name.rsplit("/", 1)
            with tf1.variable_scope(scope):
                tf1.get_variable(leaf, initializer=value)
        saver = tf1.train.Saver(save_relative_paths=True)
        with tf1.Session(graph=graph) as sess:
            sess.run(tf1.global_variables_initializer())
            saver.save(sess, str(folder / "model.ckpt"))  # .index, .data-00000-of-00001, .meta, checkpoint
    (folder / "hparams.json").write_text(json.dumps(hparams_of(cfg)))
    (folder / "encoder.json").write_text("{}")  # stand-ins: the loader never reads these two
    (folder / "vocab.bpe").write_text("#version: 0.2\n")
    return folder


def hf_model(cfg, state=None, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"],
                        n_embd=cfg["emb_dim"], n_layer=cfg["n_layers"], n_head=cfg["n_heads"],
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def hf_state_from_openai(arrays, cfg):
    """The same values under transformers' names (its Conv1D keeps OpenAI's (in, out) orientation)."""
    t = {k.removeprefix("model/"): torch.from_numpy(np.squeeze(v)) for k, v in arrays.items()}
    sd = {"transformer.wte.weight": t["wte"], "transformer.wpe.weight": t["wpe"], "lm_head.weight": t["wte"],
          "transformer.ln_f.weight": t["ln_f/g"], "transformer.ln_f.bias": t["ln_f/b"]}
    for i in range(cfg["n_layers"]):
        for part in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            key = f"transformer.h.{i}.{part.replace('/', '.')}"
            sd[f"{key}.weight"], sd[f"{key}.bias"] = t[f"h{i}/{part}/w"], t[f"h{i}/{part}/b"]
        for ln in ("ln_1", "ln_2"):
            sd[f"transformer.h.{i}.{ln}.weight"] = t[f"h{i}/{ln}/g"]
            sd[f"transformer.h.{i}.{ln}.bias"] = t[f"h{i}/{ln}/b"]
    return sd


def assert_same_logits(model, reference):
    with torch.no_grad():
        ours, theirs = model(IDS), reference(IDS).logits
    assert ours.shape == theirs.shape == (2, 7, reference.config.vocab_size)
    assert (ours - theirs).abs().max().item() < 1e-4


def write_hf_safetensors(path, cfg, *, prefix="transformer.", seed=1):
    """A Hugging Face-layout model.safetensors from a random GPT2LMHeadModel; returns that model."""
    from safetensors.torch import save_file

    ref = hf_model(cfg, seed=seed)
    tensors = {}
    for k, v in ref.state_dict().items():
        if k == "lm_head.weight" and not prefix:
            continue  # the hub's GPT-2 files hold no lm_head (it is tied to wte)
        tensors[prefix + k.removeprefix("transformer.")] = v.detach().clone().contiguous()
    if not prefix:  # the hub's files also carry each block's causal-mask buffer
        tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, cfg["context_length"], cfg["context_length"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return ref


@pytest.fixture(scope="module")
def openai_dir(tmp_path_factory):
    arrays = openai_arrays(SMALL)
    return write_openai_checkpoint(tmp_path_factory.mktemp("openai") / "124M", SMALL, arrays), arrays


# ----------------------------------------------------------------------------- the two readers

@pytest.mark.slow
def test_openai_tf_checkpoint_gives_transformers_logits(openai_dir):
    folder, arrays = openai_dir
    params = load_gpt2_params_from_tf_ckpt(str(folder / "model.ckpt"), hparams_of(SMALL))
    assert sorted(params) == ["b", "blocks", "g", "wpe", "wte"]
    assert len(params["blocks"]) == 2
    assert params["blocks"][1]["attn"]["c_attn"]["w"].shape == (12, 36)  # squeezed from (1, 12, 36)
    assert sorted(params["blocks"][0]) == ["attn", "ln_1", "ln_2", "mlp"]
    np.testing.assert_array_equal(params["blocks"][1]["mlp"]["c_fc"]["b"], arrays["model/h1/mlp/c_fc/b"])

    model = load_weights_into_gpt(GPTModel(SMALL), params).eval()
    assert_same_logits(model, hf_model(SMALL, hf_state_from_openai(arrays, SMALL)))
    # the head is tied by value, not by storage, so the two train (and save) separately
    assert torch.equal(model.out_head.weight, model.tok_emb.weight)
    assert model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_hf_safetensors_gives_transformers_logits(tmp_path, prefix):
    path = tmp_path / "model.safetensors"
    ref = write_hf_safetensors(path, SMALL, prefix=prefix)
    model = load_hf_safetensors_into_gpt(GPTModel(SMALL), str(path)).eval()
    assert_same_logits(model, ref)


def test_load_weights_keeps_parameters_in_place():
    model = GPTModel(SMALL)
    before = model.trf_blocks[0].att.W_query.weight
    arrays = openai_arrays(SMALL, seed=3)
    params = _params_from_arrays(arrays, SMALL)
    load_weights_into_gpt(model, params)
    assert model.trf_blocks[0].att.W_query.weight is before  # an optimizer built earlier still sees it
    q_w = arrays["model/h0/attn/c_attn/w"][0][:, :12]  # first third of (C, 3C) is the query
    assert torch.equal(before, torch.from_numpy(q_w.T.copy()))


def _params_from_arrays(arrays, cfg):
    params = {"blocks": [{} for _ in range(cfg["n_layers"])]}
    for name, value in arrays.items():
        parts = name.split("/")[1:]  # "h0/attn/c_attn/w" -> blocks[0]; "ln_f/g" -> params["g"]
        node = params["blocks"][int(parts[0][1:])] if re.fullmatch(r"h\d+", parts[0]) else params
        for key in parts[1:-1]:
            node = node.setdefault(key, {})
        node[parts[-1]] = np.squeeze(value)
    return params


# ----------------------------------------------------------------------------- bad params and files

def test_wrong_shapes_name_the_parameter_and_both_shapes():
    params = _params_from_arrays(openai_arrays(SMALL), SMALL)
    bigger = {**SMALL, "emb_dim": 16}
    msg = r"pos_emb\.weight: model has \(16, 16\), checkpoint wpe gives \(16, 12\)"
    with pytest.raises(ValueError, match=msg):
        load_weights_into_gpt(GPTModel(bigger), params)
    with pytest.raises(ValueError, match=r"Shape mismatch\. Left: \(2, 3\), Right: \(3, 2\)"):
        assign(torch.nn.Parameter(torch.zeros(2, 3)), np.zeros((3, 2)))


def test_missing_keys_and_layer_count_are_named():
    params = _params_from_arrays(openai_arrays(SMALL), SMALL)
    del params["blocks"][1]["mlp"]["c_fc"]["b"]
    with pytest.raises(ValueError, match=r"params\['blocks'\]\[1\]\['mlp'\]\['c_fc'\]\['b'\]"):
        load_weights_into_gpt(GPTModel(SMALL), params)
    params = _params_from_arrays(openai_arrays(SMALL), SMALL)
    with pytest.raises(ValueError, match="Checkpoint has 2 transformer blocks, model has 3"):
        load_weights_into_gpt(GPTModel({**SMALL, "n_layers": 3}), params)
    with pytest.raises(ValueError, match="qkv_bias=True"):
        load_weights_into_gpt(GPTModel({**SMALL, "qkv_bias": False}), params)


def test_bad_safetensors_files_name_file_and_key(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        load_gpt2_params_from_safetensors(str(garbage))
    with pytest.raises(ValueError, match="Could not read safetensors file .*missing.safetensors"):
        load_gpt2_params_from_safetensors(str(tmp_path / "missing.safetensors"))

    from safetensors.torch import load_file, save_file

    good = tmp_path / "good.safetensors"
    write_hf_safetensors(good, SMALL)
    tensors = load_file(str(good))
    del tensors["transformer.ln_f.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, str(partial))
    with pytest.raises(ValueError, match=r"partial\.safetensors: missing tensor 'ln_f\.weight'"):
        load_gpt2_params_from_safetensors(str(partial))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_gpt2_params_from_safetensors(str(truncated))


@pytest.mark.slow
def test_corrupt_tf_checkpoint_names_the_file(tmp_path, openai_dir):
    folder, _ = openai_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.ckpt.index").write_bytes(b"this is not a tensor bundle index")
    with pytest.raises(ValueError, match=r"Could not read TensorFlow checkpoint .*bad/model\.ckpt"):
        load_gpt2_params_from_tf_ckpt(str(bad / "model.ckpt"), hparams_of(SMALL))
    with pytest.raises(ValueError, match="but n_layer is 1"):  # checkpoint deeper than hparams says
        load_gpt2_params_from_tf_ckpt(str(folder / "model.ckpt"), {**hparams_of(SMALL), "n_layer": 1})


# ----------------------------------------------------------------------------- downloads

def closed_port_url():
    with socket.socket() as s:  # bind, note the port, close: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


BLOB = np.random.default_rng(7).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


@pytest.mark.slow
def test_download_and_load_gpt2_from_local_server(tmp_path, serve, openai_dir):
    folder, arrays = openai_dir
    server = serve({f"/124M/{f}": (folder / f).read_bytes() for f in OPENAI_FILES})
    calls = []
    settings, params = download_and_load_gpt2(
        "124M", str(tmp_path), base_url=server.url, backup_base_url=None, show_bar=False,
        progress=lambda done, total, name: calls.append((done, total, name)))
    assert settings == hparams_of(SMALL)
    np.testing.assert_array_equal(params["wte"], arrays["model/wte"])
    for f in OPENAI_FILES:  # every file arrived whole, and the callback saw it finish
        assert (tmp_path / "124M" / f).read_bytes() == (folder / f).read_bytes()
        size = (folder / f).stat().st_size
        assert (size, size, f) in calls
    assert not list((tmp_path / "124M").glob("*.part"))
    assert weights_available("124M", str(tmp_path), source="openai") is True

    # Complete files are not fetched again: a second call works with the server gone.
    n = len(server.requests)
    server.close()
    settings2, _ = download_and_load_gpt2("124M", str(tmp_path), base_url=server.url, show_bar=False)
    assert settings2 == settings and len(server.requests) == n


@pytest.mark.slow
def test_backup_url_is_tried_and_offline_names_urls_and_folder(tmp_path, serve, openai_dir):
    folder, _ = openai_dir
    server = serve({f"/mirror/124M/{f}": (folder / f).read_bytes() for f in OPENAI_FILES})
    dead = closed_port_url()
    settings, _ = download_and_load_gpt2("124M", str(tmp_path / "a"), base_url=dead,
                                         backup_base_url=server.url + "/mirror", show_bar=False)
    assert settings["n_layer"] == 2

    with pytest.raises(DownloadError) as err:
        download_and_load_gpt2("124M", str(tmp_path / "b"), base_url=dead,
                               backup_base_url=dead + "/backup", show_bar=False)
    msg = str(err.value)
    assert f"{dead}/124M/checkpoint" in msg and f"{dead}/backup/124M/checkpoint" in msg
    assert str(tmp_path / "b" / "124M") in msg and "model.ckpt.data-00000-of-00001" in msg


def test_hf_download_offline_names_url_and_folder(tmp_path):
    dead = closed_port_url()
    with pytest.raises(DownloadError) as err:
        download_hf_gpt2("355M", str(tmp_path), base_url=dead, show_bar=False)
    msg = str(err.value)
    assert f"{dead}/openai-community/gpt2-medium/resolve/main/model.safetensors" in msg
    assert str(tmp_path / "hf" / "gpt2-medium") in msg
    with pytest.raises(ValueError, match="Model size not in"):
        download_hf_gpt2("350M", str(tmp_path))


def test_download_resumes_a_partial_file(tmp_path, serve):
    server = serve({"/blob.bin": BLOB})
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:100_000])  # an earlier, interrupted download
    calls = []
    download_file(f"{server.url}/blob.bin", str(dest), show_bar=False, chunk_size=65536,
                  progress=lambda *a: calls.append(a))
    assert dest.read_bytes() == BLOB
    assert server.requests == [("/blob.bin", "bytes=100000-")]
    assert calls[0] == (100_000, 300_000, "blob.bin") and calls[-1] == (300_000, 300_000, "blob.bin")
    assert not (tmp_path / "blob.bin.part").exists()


def test_download_restarts_when_server_ignores_range(tmp_path, serve):
    server = serve({"/blob.bin": BLOB})
    server.ignore_range = True
    (tmp_path / "blob.bin.part").write_bytes(b"x" * 5000)
    download_file(f"{server.url}/blob.bin", str(tmp_path / "blob.bin"), show_bar=False)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB


def test_download_size_check_failure_keeps_part_for_resume(tmp_path, serve):
    server = serve({"/blob.bin": BLOB})
    server.short_body.add("/blob.bin")
    dest, part = tmp_path / "blob.bin", tmp_path / "blob.bin.part"
    with pytest.raises(DownloadError, match=r"blob\.bin: connection lost after \d+ of 301000 bytes.*resume"):
        download_file(f"{server.url}/blob.bin", str(dest), show_bar=False, chunk_size=65536)
    assert not dest.exists()  # never renamed into place
    kept = part.read_bytes()
    assert len(kept) >= 4 * 65536 and BLOB.startswith(kept)  # whole chunks kept for the resume
    server.short_body.clear()
    download_file(f"{server.url}/blob.bin", str(dest), show_bar=False)
    assert dest.read_bytes() == BLOB and server.requests[-1] == ("/blob.bin", f"bytes={len(kept)}-")


def test_download_checks_sha256(tmp_path, serve):
    good = hashlib.sha256(BLOB).hexdigest()
    server = serve({"/good.bin": BLOB, "/bad.bin": BLOB})
    server.extra_headers = {"/good.bin": {"X-Linked-Etag": f'"{good}"'},
                            "/bad.bin": {"X-Linked-Etag": '"' + "0" * 64 + '"'}}
    download_file(f"{server.url}/good.bin", str(tmp_path / "good.bin"), show_bar=False)
    assert (tmp_path / "good.bin").read_bytes() == BLOB
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download_file(f"{server.url}/bad.bin", str(tmp_path / "bad.bin"), show_bar=False)
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.part").exists()
    with pytest.raises(DownloadError, match="sha256 mismatch"):  # an explicit hash too
        download_file(f"{server.url}/good.bin", str(tmp_path / "other.bin"), sha256="1" * 64, show_bar=False)


def test_download_http_error_names_url(tmp_path, serve):
    server = serve({})
    with pytest.raises(DownloadError, match=re.escape(f"{server.url}/nope.bin: HTTP 404")):
        download_file(f"{server.url}/nope.bin", str(tmp_path / "nope.bin"), show_bar=False)


def test_missing_tensorflow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install tensorflow-cpu.*Hugging Face"):
        download_and_load_gpt2("124M", str(tmp_path), base_url=closed_port_url(), backup_base_url=None)
    assert not (tmp_path / "124M").exists()  # refused before downloading anything
    with pytest.raises(ValueError, match="Model size not in"):
        download_and_load_gpt2("125M", str(tmp_path))


# ----------------------------------------------------------------------------- load_pretrained

@pytest.fixture
def gpt2_small_shrunk(monkeypatch):
    """Make "gpt2-small (124M)" tiny in vocab/context/depth (its emb_dim 768 still names it 124M)."""
    base = {**sft.model.BASE_CONFIG, "vocab_size": 64, "context_length": 16}
    monkeypatch.setattr(sft.model, "BASE_CONFIG", base)
    small = {"emb_dim": 768, "n_layers": 1, "n_heads": 12}
    monkeypatch.setitem(sft.model.model_configs, "gpt2-small (124M)", small)
    return sft.model.model_config("gpt2-small (124M)")


def test_load_pretrained_hf_source_from_local_files(tmp_path, gpt2_small_shrunk):
    assert weights_available("gpt2-small (124M)", str(tmp_path)) is None
    ref = write_hf_safetensors(tmp_path / "hf" / "gpt2" / "model.safetensors", gpt2_small_shrunk, prefix="")
    assert weights_available("gpt2-small (124M)", str(tmp_path)) == "hf"
    assert weights_available("124M", str(tmp_path), source="openai") is False
    model = load_pretrained("gpt2-small (124M)", str(tmp_path), source="hf", show_bar=False)
    assert not model.training
    assert_same_logits(model, ref)


@pytest.mark.slow
def test_load_pretrained_openai_source_checks_hparams(tmp_path, gpt2_small_shrunk):
    cfg = gpt2_small_shrunk
    arrays = openai_arrays(cfg, seed=5)
    write_openai_checkpoint(tmp_path / "124M", cfg, arrays)
    assert weights_available("gpt2-small", str(tmp_path)) == "openai"
    model = load_pretrained("gpt2-small (124M)", str(tmp_path), show_bar=False)
    assert_same_logits(model, hf_model(cfg, hf_state_from_openai(arrays, cfg)))
    (tmp_path / "124M" / "hparams.json").write_text(json.dumps({**hparams_of(cfg), "n_head": 6}))
    with pytest.raises(ValueError, match=r"hparams\.json does not describe .*n_head=6 \(expected 12\)"):
        load_pretrained("gpt2-small (124M)", str(tmp_path), show_bar=False)


def test_load_pretrained_tiny_is_seeded_and_offline(tmp_path):
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    a, b = load_pretrained("tiny", str(tmp_path)), load_pretrained("tiny (random)", str(tmp_path))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert not a.training and torch.equal(a.out_head.weight, b.out_head.weight)
    assert weights_available("tiny", str(tmp_path)) == "random"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="source must be"):
        load_pretrained("gpt2-small (124M)", str(tmp_path), source="tf")


def test_download_weights_fetches_files_only(tmp_path, serve, openai_dir, monkeypatch):
    """The app's download button: files land in the folder load_pretrained reads, with no TF conversion."""
    import sft.weights as w

    folder, _ = openai_dir
    server = serve({f"/124M/{f}": (folder / f).read_bytes() for f in OPENAI_FILES}
                   | {"/openai-community/gpt2/resolve/main/model.safetensors": BLOB})
    monkeypatch.setattr(w, "_import_tf", lambda: pytest.fail("downloading must not need TensorFlow"))
    seen = []
    out = download_weights("gpt2-small (124M)", str(tmp_path), source="openai", base_url=server.url,
                           show_bar=False, progress=lambda d, t, f: seen.append(f))
    assert out == str(tmp_path / "124M") and set(seen) == set(OPENAI_FILES)
    assert weights_available("gpt2-small (124M)", str(tmp_path), source="openai") is True

    out = download_weights("124M", str(tmp_path), source="hf", base_url=server.url, show_bar=False)
    assert open(out, "rb").read() == BLOB
    assert weights_available("gpt2-small", str(tmp_path)) == "openai"
    with pytest.raises(ValueError, match="random weights"):
        download_weights("tiny", str(tmp_path))
    with pytest.raises(ValueError, match="source must be"):
        download_weights("124M", str(tmp_path), source="s3")
