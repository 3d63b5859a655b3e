"""The exported files in llama.cpp itself (``llama-cpp-python``, the ``gguf`` extra; CI installs
it with the test extras): the demo-trained tiny Llama and Qwen2- and Mistral-shaped models built
from configs load, their next-token logits match transformers, greedy generation gives the same
text, and llama.cpp tokenizes rendered chat text of the real data exactly as we do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sftdata.convert import convert
from sftdata.tokenizer import load_tokenizer
from sfttrain.export.gguf import export_gguf
from sfttrain.export.gguf.vocab import SPLIT_RULES
from sfttrain.generate import generate, render_prompt
from sfttrain.model import load_for_inference
from tests.sfttrain_helpers import ROOT, demo_jsonl, run_cli

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed"
)

DEMO_QUESTIONS = [
    "What is the capital of France?",
    "What is 7 plus 5?",
    "What sound does a cow make?",
    "What is the opposite of hot?",
]


def _llama(path: Path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=1024, logits_all=True, verbose=False)


def _logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _greedy(llm, ids: list[int], stop: int, n: int) -> list[int]:
    """llama.cpp's own greedy loop (temperature 0), token ids until ``stop``."""
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if token == stop or len(out) == n:
            break
        out.append(token)
    return out


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    """The demo run (fixtures/demo/train.yaml on fixtures/demo/qa.csv), trained as `make demo` does."""
    work = tmp_path_factory.mktemp("demo")
    src = demo_jsonl(work / "src")
    shards = work / "shards"
    from sftdata.pack import PackOptions, pack

    pack([src], shards, PackOptions(seq_len=256, tokenizer="tiny", val_count=20))
    r = run_cli("run", str(shards), "-o", str(work / "run"), "--model", "tiny",
                "-c", str(ROOT / "fixtures" / "demo" / "train.yaml"), "--no-progress", timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return work / "run" / "final"


@pytest.fixture(scope="module")
def demo_files(demo_model, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("demo-gguf")
    return {
        q: Path(export_gguf(demo_model, folder / f"{q}.gguf", quant=q).output)
        for q in ("f32", "f16", "q8_0", "q6_k", "q4_k_m")
    }


def _prompt_ids(tok, question: str) -> list[int]:
    text = render_prompt(tok, [{"role": "user", "content": question}])
    return tok(text, add_special_tokens=False)["input_ids"]


def test_f32_and_f16_logits_match_transformers(demo_model, demo_files) -> None:
    lm, tok = load_for_inference(demo_model)
    for quant, tolerance in (("f32", 1e-3), ("f16", 3e-2)):
        llm = _llama(demo_files[quant])
        for q in DEMO_QUESTIONS:
            ids = _prompt_ids(tok, q)
            with torch.no_grad():
                ours = lm(torch.tensor([ids])).logits[0].numpy()
            theirs = _logits(llm, ids)
            # relative to the logits' range: a trained model's are tens of units wide
            assert np.abs(theirs - ours).max() <= tolerance * np.abs(ours).max(), (quant, q)
            assert (theirs.argmax(-1) == ours.argmax(-1)).all()
        llm.close()


K_TOLERANCE = {"q8_0": 0.03, "q6_k": 0.03, "q4_k_m": 0.1}
"""Largest logit difference from transformers', relative to the logits' range, per quantised type
(the demo model: its rows are 128 wide, so llama.cpp writes its k-quants' matrices in q5_0/q8_0)."""


def test_quantised_logits_stay_within_a_stated_tolerance(demo_model, demo_files) -> None:
    lm, tok = load_for_inference(demo_model)
    for quant, tolerance in K_TOLERANCE.items():
        llm = _llama(demo_files[quant])
        for q in DEMO_QUESTIONS:
            ids = _prompt_ids(tok, q)
            with torch.no_grad():
                ours = lm(torch.tensor([ids])).logits[0].numpy()
            worst = np.abs(_logits(llm, ids) - ours).max() / np.abs(ours).max()
            assert worst <= tolerance, (quant, q, worst)
        llm.close()


def test_greedy_answers_are_the_same_text_in_every_type(demo_model, demo_files) -> None:
    """f32/f16 give transformers' greedy text; q8_0 and the k-quants (llama.cpp's quantiser) give
    the same answers to the demo questions."""
    _, tok = load_for_inference(demo_model)
    ours = generate(demo_model, prompts=DEMO_QUESTIONS, max_new_tokens=24)
    assert ours[0] == "The capital of France is Paris."  # the demo model learned its data
    for quant, path in demo_files.items():
        llm = _llama(path)
        for question, answer in zip(DEMO_QUESTIONS, ours, strict=True):
            ids = _greedy(llm, _prompt_ids(tok, question), tok.eos_token_id, 24)
            assert tok.decode(ids, skip_special_tokens=True).strip() == answer, (quant, question)
        llm.close()


def test_the_chat_command_on_the_gguf_answers_like_the_model(demo_model, demo_files) -> None:
    """llama-cpp-python renders the template stored in the file: same prompt, same reply."""
    from sfttrain.chat import Chat, GGUFEngine, Sampling

    expected = generate(demo_model, prompts=DEMO_QUESTIONS[:2], max_new_tokens=24)
    engine = GGUFEngine(demo_files["q8_0"])
    chat = Chat(engine, sampling=Sampling(max_new_tokens=24))
    for question, answer in zip(DEMO_QUESTIONS[:2], expected, strict=True):
        chat.reset()
        assert "".join(chat.send(question)).strip() == answer
    engine.close()


def _real_texts(tok, shared: Path, tmp: Path, *, template: str = "auto") -> list[str]:
    """Rendered chat text of real records: multi-turn English, Chinese, tool calls."""
    texts = []
    for name in (
        "sharegpt_dummy_conversation.json",
        "alpaca_zh_demo.json",
        "glaive_toolcall_en_demo.json",
    ):
        out = tmp / f"{name}.jsonl"
        convert([shared / name], out)
        for line in out.read_text(encoding="utf-8").splitlines()[:40]:
            messages = [
                {
                    "role": m["role"] if m["role"] != "tool" else "user",
                    "content": m.get("content") or json.dumps(m.get("tool_calls")),
                }
                for m in json.loads(line)["messages"]
            ]
            texts.append(render_prompt(tok, messages, template=template))
    return texts


def _tokenizes_alike(llm, tok, texts: list[str]) -> None:
    for text in texts:
        ours = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ours, text[:200]


def test_llama_cpp_tokenizes_rendered_real_data_as_we_do(demo_files, shared_data, tmp_path) -> None:
    tok = load_tokenizer("tiny")
    llm = _llama(demo_files["q8_0"])
    _tokenizes_alike(llm, tok, _real_texts(tok, shared_data, tmp_path))
    llm.close()


def _check_shape(folder: Path, cfg, tok, texts: list[str]) -> None:
    """Build a random model from ``cfg``, export f32, compare logits and tokenization."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = export_gguf(folder, folder.with_suffix(".gguf"), quant="f32")
    llm = _llama(Path(out.output))
    _tokenizes_alike(llm, tok, texts)
    for text in texts[:10]:
        ids = tok(text, add_special_tokens=False)["input_ids"][:512]
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(_logits(llm, ids) - ours).max() <= 1e-3 * np.abs(ours).max()
    llm.close()


def test_a_qwen2_shaped_model_runs_in_llama_cpp(shared_data, tmp_path) -> None:
    """Qwen2: q/k/v biases, NEOX rotary, tied embeddings, padded vocabulary, the qwen2 split rule."""
    from transformers import Qwen2Config

    folder = tmp_path / "qwen2"
    load_tokenizer("tiny").save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    rule = next(r for r, name in SPLIT_RULES.items() if name == "qwen2")
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": rule}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tok = load_tokenizer(folder)
    cfg = Qwen2Config(
        vocab_size=len(tok) + 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
        max_position_embeddings=1024, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )  # fmt: skip
    _check_shape(folder, cfg, tok, _real_texts(tok, shared_data, tmp_path))


def test_a_mistral_shaped_model_with_a_sentencepiece_vocabulary(
    shared_data, llama2_tokenizer_dir, tmp_path
) -> None:
    """Mistral on the real Llama-2 SentencePiece vocabulary: pairwise rotary, scores from merges."""
    from transformers import MistralConfig

    tok = load_tokenizer(llama2_tokenizer_dir)
    cfg = MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        sliding_window=None,
    )  # fmt: skip
    _check_shape(
        tmp_path / "mistral", cfg, tok, _real_texts(tok, shared_data, tmp_path, template="llama2")
    )
