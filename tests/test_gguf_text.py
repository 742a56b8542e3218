"""GGUF text encoders as llama.cpp writes them (city96's LLaVA-LLaMA-3 GGUFs for HunyuanVideo): llama.cpp tensor
names, q/k rows permuted for llama.cpp's RoPE, `llama.*` metadata and the tokenizer in `tokenizer.ggml.*`. Written
here from the shipped tiny LLaMA with the gguf package's writer."""

import json
from pathlib import Path

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors, trainers

from kineflow.models.checkpoints import detect, inspect_file, read_header
from kineflow.models.tokenization import LLAMA3_SPLIT_PATTERN, gguf_tokenizer, load_tokenizer
from kineflow.runtime import host, offload
from kineflow.runtime.video_models import load_text_encoders, load_text_tower

TINY_LLM = Path(__file__).resolve().parent.parent / "weights" / "text_encoders" / "kineflow_tiny_llm"
# Output error of the tiny LLaMA's last hidden state against the unquantized model, as a share of its largest value.
# Measured: Q8_0 0.9% (Q5_0 8.1%, Q4_0 10.7%).
Q8_0_BOUND = 0.02

LLAMA_CPP_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter: within each head, rows (i, i + half) become adjacent rows (2i, 2i+1)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama_cpp_name(key: str) -> str:
    if key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if key == "model.norm.weight":
        return "output_norm.weight"
    _, _, index, *rest = key.split(".")
    module, leaf = ".".join(rest[:-1]), rest[-1]
    return f"blk.{index}.{LLAMA_CPP_NAMES[module]}.{leaf}"


def write_llama_gguf(path: Path, qtype, tokenizer: Tokenizer | None = None) -> Path:
    config = json.loads((TINY_LLM / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_block_count(config["num_hidden_layers"])
    for key, tensor in load_file(str(TINY_LLM / "model.safetensors")).items():
        if key.endswith("q_proj.weight"):
            tensor = _llama_cpp_permute(tensor, heads)
        elif key.endswith("k_proj.weight"):
            tensor = _llama_cpp_permute(tensor, kv_heads)
        data = tensor.float().numpy()
        if data.ndim == 2 and "embed" not in key and qtype != Q.F32:
            writer.add_tensor(_llama_cpp_name(key), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(_llama_cpp_name(key), data)
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        tokens = sorted(vocab, key=vocab.get)
        merges = json.loads(tokenizer.to_str())["model"]["merges"]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        writer.add_bos_token_id(vocab["<|begin_of_text|>"])
        writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _hidden_states(model) -> torch.Tensor:
    ids = torch.tensor([[1, 7, 30, 12, 99, 5, 64]])
    with torch.inference_mode():
        return model(ids, torch.ones_like(ids))


@pytest.fixture(scope="module")
def reference():
    model, _ = load_text_tower(TINY_LLM, "llama_text", torch.float32, torch.device("cpu"))
    return _hidden_states(model)


def test_llama_cpp_layout_is_detected_and_inspected(tmp_path):
    path = write_llama_gguf(tmp_path / "llava-llama-3-tiny-Q8_0.gguf", Q.Q8_0)
    detection = detect(read_header(path))
    assert (detection.family, detection.layout) == ("llama_text", "gguf")
    assert inspect_file(path)["quantization"] == "gguf:Q8_0"


def test_float_gguf_gives_the_hidden_states_of_the_original(tmp_path, reference):
    """Unquantized, the llama.cpp row order with adjacent rotary pairs is the same model (to float rounding)."""
    path = write_llama_gguf(tmp_path / "tiny_f32.gguf", Q.F32)
    model, _ = load_text_tower(path, "llama_text", torch.float32, torch.device("cpu"))
    assert model.config.rope_interleaved and model.config.num_attention_heads == 4
    torch.testing.assert_close(_hidden_states(model), reference, rtol=0, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("policy", ["full", "blocks"])
def test_q8_0_gguf_stays_quantized_and_is_within_its_error(tmp_path, reference, policy):
    path = write_llama_gguf(tmp_path / "tiny_q8.gguf", Q.Q8_0)
    model, residency = load_text_tower(path, "llama_text", torch.float32, torch.device("cpu"), policy=policy)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # GGUF blocks in memory
    with offload.running(residency):
        out = _hidden_states(model)
    assert (out - reference).abs().max() <= Q8_0_BOUND * reference.abs().max()


def _byte_level_bpe(texts: list[str]) -> Tokenizer:
    """A small LLaMA-3-style tokenizer: LLaMA-3's split, byte-level BPE, whole-word lookup, BOS prepended."""
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tokenizer.token_to_id("<|begin_of_text|>"))])
    return tokenizer


def test_tokenizer_rebuilt_from_gguf_metadata_matches_the_original(tmp_path):
    texts = ["A red circle moves left on a white background.", "Describe the video by detailing the following "
             "aspects: 1. The main content and theme of the video.", "don't stop 12345 numbers, newline\n\ntwo"] * 3
    original = _byte_level_bpe(texts)
    path = write_llama_gguf(tmp_path / "with_tokenizer.gguf", Q.Q8_0, tokenizer=original)
    rebuilt = gguf_tokenizer(path)
    template = "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video.<|eot_id|>a green square grows"
    for text in texts + [template, "unseen wörds ünïcode 2024!!"]:
        assert rebuilt.ids(text) == original.encode(text).ids, text
    assert load_tokenizer(path).ids(template) == original.encode(template).ids


def test_load_text_encoders_reads_a_gguf_llama(tmp_path):
    """Load Text Encoders with a GGUF LLaMA: the GGUF's tokenizer is used when it carries one, else the folder named."""
    folder = tmp_path / "text_encoders"
    folder.mkdir()
    write_llama_gguf(folder / "tiny_q8.gguf", Q.Q8_0)
    (folder / "clip.safetensors").symlink_to(TINY_LLM.parent / "kineflow_tiny_clip.safetensors")
    with host.configured(models_dir=tmp_path, device="cpu"):
        gguf_encoders = load_text_encoders("tiny_q8.gguf", "clip.safetensors", tokenizer_path=str(TINY_LLM))
        encoders = load_text_encoders("kineflow_tiny_llm", "kineflow_tiny_clip.safetensors")
        got, expected = gguf_encoders.encode(["a red circle moves left"]), encoders.encode(["a red circle moves left"])
    assert torch.equal(got["text_mask"], expected["text_mask"])
    states, want = got["text_states"], expected["text_states"]
    assert (states - want).abs().max() <= Q8_0_BOUND * want.abs().max()
