"""`sfttrain export --format gguf`: what the file holds, read back with the gguf package's own
reader (an implementation independent of the writer's call sequence), and the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from sftdata.errors import ConfigError, ModelError
from sftdata.tokenizer import load_tokenizer
from sfttrain.export.gguf import QUANTS, export_gguf
from sfttrain.model import build_tiny
from tests.sfttrain_helpers import run_cli, small_model_dir


def _fields(path: Path) -> tuple[gguf.GGUFReader, dict]:
    reader = gguf.GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items()}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    return {q: Path(export_gguf("tiny", folder / f"tiny-{q}.gguf", quant=q).output) for q in QUANTS}


def test_every_type_holds_the_architecture_and_every_weight(tiny_files) -> None:
    model = build_tiny(seed=42)
    cfg = model.config
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for quant, path in tiny_files.items():
        reader, kv = _fields(path)
        assert kv["general.architecture"] == "llama"
        assert kv["general.file_type"] == int(
            gguf.LlamaFileType[f"{'ALL' if quant == 'f32' else 'MOSTLY'}_{quant.upper()}"]
        )
        assert kv["llama.block_count"] == cfg.num_hidden_layers
        assert kv["llama.embedding_length"] == cfg.hidden_size
        assert kv["llama.feed_forward_length"] == cfg.intermediate_size
        assert kv["llama.attention.head_count"] == cfg.num_attention_heads
        assert kv["llama.attention.head_count_kv"] == cfg.num_key_value_heads
        assert kv["llama.context_length"] == cfg.max_position_embeddings
        assert kv["llama.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
        assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
        tensors = {t.name: t for t in reader.tensors}
        # one GGUF tensor per HF weight, same element count; GGUF lists dims innermost first
        assert len(tensors) == len(expected)
        assert tensors["token_embd.weight"].shape.tolist() == [cfg.hidden_size, cfg.vocab_size]
        assert tensors["output.weight"].shape.tolist() == [cfg.hidden_size, cfg.vocab_size]
        assert tensors["blk.0.attn_k.weight"].shape.tolist() == [cfg.hidden_size, 64]
        assert sorted(int(np.prod(t.shape)) for t in tensors.values()) == sorted(
            int(np.prod(s)) for s in expected.values()
        )
        matrix = gguf.GGMLQuantizationType[quant.upper()]
        for t in tensors.values():
            want = gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else matrix
            assert t.tensor_type == want, (quant, t.name)


def test_quantised_weights_decode_close_to_the_model(tiny_files) -> None:
    """Dequantised with the reader's own dequantiser, each type is as close as its bits allow."""
    weight = build_tiny(seed=42).state_dict()["model.layers.1.mlp.down_proj.weight"].numpy()
    scale = np.abs(weight).max()
    worst = {}
    for quant, path in tiny_files.items():
        reader, _ = _fields(path)
        t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(weight.shape)
        worst[quant] = float(np.abs(back - weight).max() / scale)
    assert worst["f32"] == 0.0
    assert worst["f16"] < 1e-3 and worst["bf16"] < 1e-2 and worst["q8_0"] < 1e-2
    assert worst["q5_1"] < worst["q4_1"] < 0.15 and worst["q5_0"] < worst["q4_0"] < 0.15


def test_the_vocabulary_and_template_are_the_tokenizers(tiny_files) -> None:
    tok = load_tokenizer("tiny")
    _, kv = _fields(tiny_files["q8_0"])
    vocab = json.loads(tok.backend_tokenizer.to_str())["model"]
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == len(tok)
    assert all(tokens[i] == t for t, i in vocab["vocab"].items())
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]]
    assert kv["tokenizer.ggml.merges"] == merges
    types = kv["tokenizer.ggml.token_type"]
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert types[tok.convert_tokens_to_ids(special)] == gguf.TokenType.CONTROL
    assert types[tok.convert_tokens_to_ids("Ġthe")] == gguf.TokenType.NORMAL
    assert kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert kv["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.chat_template"] == tok.chat_template


def test_padded_embedding_rows_and_tied_heads(tmp_path) -> None:
    """Rows past the last token id become unused [PAD] tokens; a tied head is not written twice."""
    rows = len(load_tokenizer("tiny")) + 32
    folder = small_model_dir(tmp_path / "m", vocab_size=rows, tie_word_embeddings=True)
    out = tmp_path / "m.gguf"
    export_gguf(folder, out, quant="q8_0")
    reader, kv = _fields(out)
    assert len(kv["tokenizer.ggml.tokens"]) == rows
    assert kv["tokenizer.ggml.tokens"][-1] == f"[PAD{rows - 1}]"
    assert kv["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
    assert "output.weight" not in {t.name for t in reader.tensors}


def test_tensors_are_converted_one_at_a_time(tmp_path) -> None:
    """The export holds one tensor's converted copy at a time, not one of every tensor: numpy's
    allocations (tracemalloc sees them; torch's weights it does not) peak near the largest
    converted tensor, far below the model, in f32 and in a block type."""
    import tracemalloc

    folder = small_model_dir(
        tmp_path / "m", hidden_size=128, intermediate_size=512, num_hidden_layers=24
    )
    from safetensors.numpy import load_file

    weights = load_file(str(folder / "model.safetensors"))
    total = sum(w.nbytes for w in weights.values())
    largest = max(w.nbytes for w in weights.values())
    assert largest < total / 10  # the model is many tensors, so the two figures are apart
    for quant in ("f32", "q8_0"):
        tracemalloc.start()
        try:
            export_gguf(folder, tmp_path / f"m-{quant}.gguf", quant=quant)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # a quantiser's temporaries are a few times its input; all tensors would be >= total
        assert peak < total / 3, (quant, peak, largest, total)


def test_a_lora_checkpoint_is_merged_first(tmp_path) -> None:
    from tests.sfttrain_helpers import demo_shards

    shards = demo_shards(tmp_path / "d", limit=40)
    run = tmp_path / "run"
    r = run_cli("run", str(shards), "-o", str(run), "--model", "tiny", "--set", "finetuning_type=lora",
                "--set", "max_steps=2", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_cli("export", str(run / "final"), "--format", "gguf", "--quant", "f32",
                "-o", str(tmp_path / "lora.gguf"), "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["merged"] is True
    reader, _ = _fields(tmp_path / "lora.gguf")
    assert not [t.name for t in reader.tensors if "lora" in t.name]
    # the merged q projection differs from the untouched base's: the update is in the file
    base = tmp_path / "base.gguf"
    export_gguf("tiny", base, quant="f32")
    q = {
        p: next(t for t in _fields(p)[0].tensors if t.name == "blk.0.attn_q.weight")
        for p in (tmp_path / "lora.gguf", base)
    }
    assert not np.array_equal(*(np.array(t.data) for t in q.values()))


# -- bad input: one line each, nothing half-written ------------------------------------------


def _refused(tmp_path: Path, *args: str) -> str:
    r = run_cli("export", *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.stderr
    assert not [p for p in tmp_path.rglob("*.gguf*") if p.name != "exists.gguf"]
    return lines[0]


def test_unknown_and_unwritable_types_name_what_can_be_written(tmp_path) -> None:
    out = str(tmp_path / "t.gguf")
    line = _refused(tmp_path, "tiny", "--format", "gguf", "--quant", "q4_k", "-o", out)
    assert "q4_k" in line and "q8_0, q4_0" in line and "llama-quantize" in line
    line = _refused(tmp_path, "tiny", "--format", "gguf", "--quant", "q9", "-o", out)
    assert "'q9' is not a GGML type" in line and "f16" in line


def test_a_k_quant_without_llama_cpp_names_the_extra(monkeypatch) -> None:
    import importlib.util

    from sftdata.errors import ConfigError
    from sfttrain.export.gguf.quant import check_quant

    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llama_cpp" else find(name, *a),
    )
    with pytest.raises(ConfigError) as e:
        check_quant("Q4_K_M")
    assert str(e.value) == (
        "--quant q4_k_m (llama.cpp's own quantiser) needs the 'gguf' extra (llama_cpp missing): "
        "pip install 'sftpipe[gguf]'"
    )


def test_an_existing_output_needs_overwrite(tmp_path) -> None:
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"mine")
    line = _refused(tmp_path, "tiny", "--format", "gguf", "-o", str(out))
    assert "--overwrite" in line and out.read_bytes() == b"mine"
    r = run_cli(
        "export", "tiny", "--format", "gguf", "--quant", "q8_0", "-o", str(out), "--overwrite"
    )
    assert r.returncode == 0 and out.read_bytes()[:4] == b"GGUF"


def test_an_incomplete_checkpoint_is_refused(tmp_path) -> None:
    folder = small_model_dir(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    line = _refused(tmp_path, str(folder), "--format", "gguf", "-o", str(tmp_path / "o.gguf"))
    assert str(folder) in line
    line = _refused(
        tmp_path, str(tmp_path / "nowhere"), "--format", "gguf", "-o", str(tmp_path / "o.gguf")
    )
    assert "nowhere" in line


def test_an_unsupported_architecture_lists_the_supported(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config

    folder = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(load_tokenizer("tiny")))
    ).save_pretrained(folder)
    load_tokenizer("tiny").save_pretrained(folder)
    line = _refused(tmp_path, str(folder), "--format", "gguf", "-o", str(tmp_path / "o.gguf"))
    assert "'gpt2'" in line and "llama, mistral, qwen2" in line


def test_a_tokenizer_llama_cpp_cannot_split_is_refused(tmp_path) -> None:
    """A byte-level BPE whose split rule llama.cpp has no name for, and a WordPiece vocabulary."""
    folder = small_model_dir(tmp_path / "m")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\d+|\D+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    line = _refused(tmp_path, str(folder), "--format", "gguf", "-o", str(tmp_path / "o.gguf"))
    assert "pre_tokenizer" in line and "qwen2" in line
    spec["model"] = {"type": "WordPiece", "unk_token": "<|endoftext|>", "vocab": spec["model"]["vocab"],
                     "continuing_subword_prefix": "##", "max_input_chars_per_word": 100}  # fmt: skip
    spec["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    line = _refused(tmp_path, str(folder), "--format", "gguf", "-o", str(tmp_path / "o.gguf"))
    assert "WordPiece tokenizer cannot be written" in line


def test_hf_and_gguf_options_do_not_mix(tmp_path) -> None:
    line = _refused(
        tmp_path, "tiny", "--format", "gguf", "--dtype", "bf16", "-o", str(tmp_path / "a.gguf")
    )
    assert "--quant" in line
    line = _refused(tmp_path, "tiny", "--quant", "q8_0", "-o", str(tmp_path / "folder"))
    assert "--format gguf" in line


def test_an_interrupted_export_leaves_nothing(tmp_path, monkeypatch) -> None:
    import sfttrain.export.gguf.quant as quant

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(quant, "encode", boom)
    with pytest.raises(KeyboardInterrupt):
        export_gguf("tiny", tmp_path / "x.gguf", quant="q8_0")
    assert not list(tmp_path.iterdir())  # no temp file, no lock, no output


def test_the_output_must_be_a_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        export_gguf("tiny", tmp_path, quant="f16")


def test_unscaled_rope_only(tmp_path) -> None:
    folder = small_model_dir(tmp_path / "m", rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ModelError, match="rope_scaling type 'linear'"):
        export_gguf(folder, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()
