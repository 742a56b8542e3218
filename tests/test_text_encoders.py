"""CLIP-L and LLaMA text encoders, tokenizers and HunyuanVideo's text conditioning.

Full-size models are only built on the meta device (key/shape checks against the reference manifests);
numerical parity with transformers runs at tiny random configs in float32.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel

from kineflow.models import clip_text, hunyuan_text, llama_text, tokenization
from kineflow.models.clip_text import CLIPTextConfig, CLIPTextModel
from kineflow.models.hunyuan_text import HunyuanTextEncoder, VIDEO_PROMPT_TEMPLATE
from checkpoint_fixtures import manifest_shapes
from kineflow.models.llama_text import LlamaTextConfig, LlamaTextEncoder
from kineflow.errors import InputFileError, KineFlowError, ModelFileError

TOL = 1e-4


def meta_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- full size on meta
def test_clip_l_full_size_matches_manifest():
    expected = manifest_shapes("clip_l_text_hf")
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.full())
    assert meta_shapes(model) == expected
    converted = clip_text.convert_state_dict(expected)
    assert converted == expected
    assert clip_text.detect_layout(expected) == "hf"
    assert clip_text.config_from_state_dict(converted) == CLIPTextConfig.full()


def test_llama_full_size_matches_manifest_without_lm_head():
    expected = manifest_shapes("llava_llama3_8b_text_hf")
    with torch.device("meta"):
        model = LlamaTextEncoder(LlamaTextConfig.full())
    without_head = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    assert len(without_head) == 290
    assert meta_shapes(model) == without_head
    converted = llama_text.convert_state_dict(expected)
    assert converted == without_head
    assert llama_text.config_from_state_dict(converted) == LlamaTextConfig.full()


def test_clip_layouts_are_converted_to_internal_names():
    expected = manifest_shapes("clip_l_text_hf")
    bare = {k.removeprefix("text_model."): v for k, v in expected.items()}  # transformers >= 5 state dicts
    sd15 = {"cond_stage_model.transformer." + k: v for k, v in expected.items()}
    sd15["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
    sd15["model.diffusion_model.input_blocks.0.0.weight"] = (320, 4, 3, 3)  # other parts of a full checkpoint
    with_projection = {**expected, "text_projection.weight": (768, 768), "logit_scale": (),
                       "text_model.embeddings.position_ids": (1, 77)}
    dual = {**{"text_encoders.clip_l.transformer." + k: v for k, v in expected.items()},
            "text_encoders.clip_g.transformer.text_model.embeddings.token_embedding.weight": (49408, 1280)}
    assert clip_text.detect_layout(bare) == "hf_bare"
    for sd in (bare, sd15, with_projection, dual):
        assert clip_text.convert_state_dict(sd) == expected
    with pytest.raises(ModelFileError, match="expected a CLIP text model"):
        clip_text.convert_state_dict({"foo.weight": (1,)})
    with pytest.raises(ModelFileError, match="'hf' layout, found the 'hf_bare'"):
        clip_text.convert_state_dict(bare, "hf")


def test_llama_layouts_are_converted_to_internal_names():
    expected = manifest_shapes("llava_llama3_8b_text_hf")
    internal = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    bare = {k.removeprefix("model."): v for k, v in internal.items()}
    prefixed = {"text_encoders.llama.transformer." + k: v for k, v in expected.items()}
    assert llama_text.detect_layout(bare) == "hf_bare"
    assert llama_text.detect_layout(prefixed) == "hf"
    for sd in (bare, prefixed):
        assert llama_text.convert_state_dict(sd) == internal


# --------------------------------------------------------------------------- parity with transformers
def _hf_clip(eos_token_id: int):
    from transformers import CLIPTextConfig as HFConfig, CLIPTextModel as HFModel

    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                   layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1, eos_token_id=eos_token_id)
    return HFModel(cfg).eval()


@pytest.mark.parametrize("eos_token_id", [None, 998])
def test_clip_parity_with_transformers(eos_token_id):
    # HF pools at argmax(ids) when its config says eos_token_id == 2 (the original CLIP configs), else at the first eos.
    hf = _hf_clip(2 if eos_token_id is None else eos_token_id)
    sd = clip_text.convert_state_dict(hf.state_dict())
    config = clip_text.config_from_state_dict(sd)
    assert config == CLIPTextConfig.tiny()
    model = CLIPTextModel(dataclasses.replace(config, eos_token_id=eos_token_id))
    model.load_state_dict(sd)
    model.eval()

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 990, (2, 12), generator=g)
    ids[0, 0] = ids[1, 0] = 997  # bos-like token
    ids[0, -1] = 998  # row 0: full length, eos at the end
    ids[1, 7:] = 998  # row 1: eos at position 7, then eos-padding (the CLIP-L convention)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out = model(ids, mask)
        skipped = model(ids, mask, num_layers=2)
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max() <= TOL
    assert (out.pooled_output - ref.pooler_output).abs().max() <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert (ours - theirs).abs().max() <= TOL
    # clip skip: stopping after 2 layers gives the same layer output, then final_layer_norm on it
    assert (skipped.hidden_states[-1] - ref.hidden_states[2]).abs().max() <= TOL
    expected_skip = hf.final_layer_norm(ref.hidden_states[2])
    assert (skipped.last_hidden_state - expected_skip).abs().max() <= TOL


def test_llama_parity_with_transformers():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=512, attention_bias=False, mlp_bias=False)
    hf = LlamaModel(hf_cfg).eval()
    # make the norms non-trivial so a missing or misplaced norm would show
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    sd = llama_text.convert_state_dict(hf.state_dict())
    config = llama_text.config_from_state_dict(sd)
    assert config == LlamaTextConfig.tiny()
    model = LlamaTextEncoder(config).eval()
    model.load_state_dict(sd)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    ids[1, 13:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for index in (-1, -3, 0, 1, 4):
            ours = model(ids, mask, output_hidden_layer=index)
            assert (ours - ref[index]).abs().max() <= TOL, index
    assert len(ref) == 5
    with pytest.raises(ValueError, match="output_hidden_layer"):
        model(ids, mask, output_hidden_layer=-6)


def test_llama_stops_at_the_requested_layer():
    model = LlamaTextEncoder(LlamaTextConfig.tiny()).eval()
    ran = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *_, i=i: ran.append(i))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), output_hidden_layer=-3)
    assert ran == [0, 1]


# --------------------------------------------------------------------------- tokenizers
PROMPTS = [
    "A cat", "Hello, World!!!", "  multiple   spaces\tand\nnewlines ", "it's don't we'll I'm you're they've he'd",
    "3.14159 and 42 numbers 2024", "UPPER lower MiXeD", "café naïve résumé", "cafe\u0301 decomposed accent",
    "emoji 🐱🚀 test", "<|endoftext|> inside", "a" * 300, " ".join(["word"] * 100), "",
    "tokens-with-hyphens and_under_scores", "(parentheses) [brackets] {braces}", "日本語のテキスト",
    "html &amp; entities", "a photo of an astronaut riding a horse on mars, 8k, highly detailed",
    "!!!???...", "x'''d", "Ünïcödé ÀÉÎ", "IT'S LOUD", "tab\tseparated\tvalues 1,000,000 $5.99 100%",
    "masterpiece, best quality, 1girl, (detailed eyes:1.2), <lora:foo:0.8>",
]


def test_shipped_clip_tokenizer_matches_transformers(tmp_path):
    from transformers import CLIPTokenizer

    ours = tokenization.clip_l_tokenizer()
    model = json.loads(tokenization.CLIP_L_TOKENIZER_FILE.read_text(encoding="utf-8"))["model"]
    assert len(model["vocab"]) == 49408 and model["vocab"]["<|startoftext|>"] == 49406 and ours.pad_id == 49407
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    reference = CLIPTokenizer.from_pretrained(str(tmp_path))

    ids, mask = ours.encode(PROMPTS, 77)
    assert ids.shape == (len(PROMPTS), 77)
    for row, prompt in enumerate(PROMPTS):
        ref = reference(prompt, padding="max_length", max_length=77, truncation=True)
        assert ids[row].tolist() == ref["input_ids"], prompt
        assert mask[row].tolist() == ref["attention_mask"], prompt
    long_row = ids[PROMPTS.index(" ".join(["word"] * 100))]
    assert long_row[0] == 49406 and long_row[-1] == 49407 and bool(mask[PROMPTS.index("A cat")].sum() == 4)


def test_clip_vocabulary_is_built_in_openai_order(tmp_path):
    merges = ["i n", "t h", "th e</w>", "in g</w>"]
    bpe = tmp_path / "bpe.txt.gz"
    bpe.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(merges) + "\n").encode()))
    vocab, read = tokenization.read_openai_bpe(bpe, num_merges=4)
    assert read == [tuple(m.split()) for m in merges]
    assert len(vocab) == 512 + 4 + 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512 and vocab["the</w>"] == 514
    assert vocab["<|startoftext|>"] == 516 and vocab["<|endoftext|>"] == 517
    tok = tokenization.TextTokenizer(tokenization.build_clip_tokenizer(vocab, read, max_length=8), vocab["<|endoftext|>"])
    ids, mask = tok.encode(["The  THING"], 8)
    assert ids[0].tolist() == [516, 514, vocab["th"], vocab["ing</w>"], 517, 517, 517, 517]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    with pytest.raises(InputFileError, match="expected 10 merge lines"):
        tokenization.read_openai_bpe(bpe, num_merges=10)


def test_missing_tokenizer_says_where_to_put_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFileError, match=r"expected .*tokenizer\.json.*config\.json"):
        tokenization.load_tokenizer(tmp_path)
    with pytest.raises(ModelFileError, match="does not exist"):
        tokenization.load_tokenizer(tmp_path / "nowhere" / "tokenizer.json")


# --------------------------------------------------------------------------- HunyuanVideo conditioning
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>", "[UNK]"]
WORD_PATTERN = r"\w+|[^\w\s]+"  # what pre_tokenizers.Whitespace splits on


def tiny_llama_tokenizer(folder: Path, texts: list[str]) -> Path:
    """A word-level LLaMA-3-like tokenizer: special header tokens, BOS added in front, `<pad>` in tokenizer_config."""
    words = sorted({w for t in texts for w in re.findall(WORD_PATTERN, re.sub("|".join(map(re.escape, SPECIALS)), " ", t))})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    return folder


def count_tokens(text: str) -> int:
    """Independent count for the tiny tokenizer: BOS + each special token + each word/punctuation run."""
    parts = re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text)
    return 1 + sum(1 if p in SPECIALS else len(re.findall(WORD_PATTERN, p)) for p in parts)


@pytest.fixture(scope="module")
def hunyuan_parts(tmp_path_factory):
    prompts = ["A red fox runs through snow.", "blurry, low quality", "x " * 40]
    folder = tiny_llama_tokenizer(tmp_path_factory.mktemp("llama_tok"), [VIDEO_PROMPT_TEMPLATE, *prompts])
    llama_tok = tokenization.load_tokenizer(folder)
    torch.manual_seed(0)
    llama = LlamaTextEncoder(LlamaTextConfig.tiny(vocab_size=llama_tok.tokenizer.get_vocab_size())).eval()
    clip = CLIPTextModel(CLIPTextConfig.tiny(vocab_size=49408)).eval()
    return llama, llama_tok, clip, tokenization.clip_l_tokenizer(), prompts


def test_hunyuan_template_cropping_and_mask(hunyuan_parts):
    llama, llama_tok, clip, clip_tok, prompts = hunyuan_parts
    assert llama_tok.pad_id == SPECIALS.index("<pad>")
    enc = HunyuanTextEncoder(llama, llama_tok, clip, clip_tok, text_length=16)
    prefix = VIDEO_PROMPT_TEMPLATE.split("{}")[0]
    assert enc.crop_start == count_tokens(prefix) > 60
    assert enc.max_length == 16 + enc.crop_start

    out = enc.encode(prompts)
    assert out["text_states"].shape == (3, 16, 256)
    assert out["text_mask"].shape == (3, 16) and out["text_mask"].dtype == torch.long
    assert out["text_states_2"].shape == (3, 128)
    # prompt words + the closing <|eot_id|>; the 40-word prompt is truncated at text_length
    assert out["text_mask"][0].tolist() == [1] * 8 + [0] * 8
    assert out["text_mask"][1].tolist() == [1] * 5 + [0] * 11
    assert out["text_mask"][2].tolist() == [1] * 16

    # the states are the skipped-layer (-3) hidden states of the full templated sequence, cut at crop_start
    ids, mask = llama_tok.encode([VIDEO_PROMPT_TEMPLATE.replace("{}", p) for p in prompts], enc.max_length)
    with torch.no_grad():
        full = llama(ids, mask, output_hidden_layer=-3)
        pooled = clip(*clip_tok.encode(prompts, 77)).pooled_output
    assert torch.equal(out["text_states"], full[:, enc.crop_start:])
    assert torch.equal(out["text_states_2"], pooled)

    # a negative prompt is just another encode call; batching does not change a row's valid states
    alone = enc.encode(prompts[1])
    valid = alone["text_mask"][0].bool()
    assert torch.allclose(alone["text_states"][0, valid], out["text_states"][1, valid], atol=TOL)
    assert torch.allclose(alone["text_states_2"], out["text_states_2"][1:2], atol=TOL)


def test_hunyuan_short_template_and_crop_override(hunyuan_parts):
    llama, llama_tok, clip, clip_tok, _ = hunyuan_parts
    template = "<|start_header_id|>system<|end_header_id|> Describe the video <|eot_id|><|start_header_id|>user<|end_header_id|>{}<|eot_id|>"
    enc = HunyuanTextEncoder(llama, llama_tok, clip, clip_tok, template=template, text_length=6)
    # BOS, start, system, end, Describe, the, video, eot, start, user, end
    assert enc.crop_start == 11
    out = enc.encode("fox runs")
    assert out["text_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    forced = HunyuanTextEncoder(llama, llama_tok, clip, clip_tok, template=template, text_length=6, crop_start=9)
    assert forced.encode("fox runs")["text_mask"][0].tolist() == [1] * 5 + [0]
    with pytest.raises(KineFlowError, match="placeholder"):
        HunyuanTextEncoder(llama, llama_tok, clip, clip_tok, template="no placeholder")


def test_load_from_files_with_foreign_prefixes(tmp_path, hunyuan_parts):
    llama, llama_tok, clip, _, _ = hunyuan_parts
    clip_file = tmp_path / "sd15.safetensors"
    save_file({**{"cond_stage_model.transformer." + k: v.contiguous() for k, v in clip.state_dict().items()},
               "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}, str(clip_file))
    llama_file = tmp_path / "llama.safetensors"
    save_file({**{k: v.contiguous() for k, v in llama.state_dict().items()},
               "lm_head.weight": torch.zeros(llama.config.vocab_size, 256)}, str(llama_file))

    loaded_clip = hunyuan_text.load_clip_text(clip_file, dtype=torch.float32)
    loaded_llama = hunyuan_text.load_llama_text(llama_file, dtype=torch.float32)
    ids = torch.tensor([[49406, 320, 2368, 49407]])
    with torch.no_grad():
        assert torch.equal(loaded_clip(ids).pooled_output, clip(ids).pooled_output)
        assert torch.equal(loaded_llama(ids % 50), llama(ids % 50))
    assert loaded_llama.model.embed_tokens.weight.dtype == torch.float32


def test_llama_folder_config_sets_what_shapes_cannot_tell(tmp_path):
    """Head count, RoPE theta and norm eps come from a Hugging Face folder's config.json (shapes alone would
    assume 128-wide heads)."""
    import json as _json

    from kineflow.models.hunyuan_text import load_llama_text
    from kineflow.models.llama_text import LlamaTextConfig, LlamaTextEncoder
    from kineflow.errors import ModelFileError
    from kineflow.training.tiny_models import save_safetensors

    torch.manual_seed(0)
    config = LlamaTextConfig(vocab_size=50, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    model = LlamaTextEncoder(config).eval()
    save_safetensors(model.state_dict(), tmp_path / "model.safetensors")
    declared = {"num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(_json.dumps(declared))
    loaded = load_llama_text(tmp_path, dtype=torch.float32)
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads) == (4, 2)
    ids = torch.randint(0, 50, (1, 7))
    torch.testing.assert_close(loaded(ids), model(ids))

    (tmp_path / "config.json").write_text(_json.dumps({**declared, "num_key_value_heads": 4}))
    with pytest.raises(ModelFileError, match="key/value heads"):
        load_llama_text(tmp_path, dtype=torch.float32)
