"""The 8b variant has exactly the official shapes (built abstractly: no memory)."""

import json
import math
import pathlib

import jax

from lladav_jax.models import hf_params, lladav, variants

DATA = pathlib.Path(__file__).parents[1] / "fixtures"


def test_8b_parameter_counts_match_the_official_release(capsys):
    cfg = variants.model_config("8b")
    counts = lladav.param_counts(cfg)
    index = json.loads((DATA / "llada_8b_llm.safetensors.index.json").read_text())
    assert counts["text"] == 8_015_581_184
    assert counts["text"] * 2 == index["metadata"]["total_size"]  # bf16 bytes
    v = cfg.vision
    per_layer = 4 * (v.hidden_size**2 + v.hidden_size) + 4 * v.hidden_size + 2 * (
        v.hidden_size * v.intermediate_size) + v.intermediate_size + v.hidden_size
    patches = (v.image_size // v.patch_size) ** 2
    embeddings = 3 * v.patch_size**2 * v.hidden_size + v.hidden_size + patches * v.hidden_size
    assert counts["vision"] == 26 * per_layer + embeddings == 397_745_440
    d = cfg.text.hidden_size
    assert counts["connector"] == v.hidden_size * d + d + d * d + d + d == 21_508_096
    with capsys.disabled():
        print("\n8b parameters: " + ", ".join(f"{k} {n:,}" for k, n in counts.items()))


def test_8b_llm_keys_equal_the_official_index():
    cfg = variants.model_config("8b")
    index = json.loads((DATA / "llada_8b_llm.safetensors.index.json").read_text())
    ours = {k for e in hf_params.llm_entries(cfg) for k in e.hf_keys()}
    assert ours == set(index["weight_map"])
    assert len(ours) == 291


def test_8b_config_matches_the_release_config():
    cfg = variants.model_config("8b").text
    ref = json.loads((DATA / "llada_8b_llm.config.json").read_text())
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
            cfg.intermediate_size, cfg.rope_theta, cfg.rms_norm_eps,
            cfg.max_position_embeddings) == (
        ref["vocab_size"], ref["hidden_size"], ref["num_hidden_layers"],
        ref["num_attention_heads"], ref["num_key_value_heads"], ref["intermediate_size"],
        ref["rope_theta"], ref["rms_norm_eps"], ref["max_position_embeddings"])
    assert cfg.head_dim * cfg.num_heads == cfg.hidden_size
    assert not ref["tie_word_embeddings"]


def test_expected_hf_shapes_of_8b():
    cfg = variants.model_config("8b")
    params = lladav.abstract_params(cfg)
    shapes = hf_params.expected_hf_shapes(hf_params.lladav_entries(cfg), params)
    assert shapes["model.embed_tokens.weight"] == (126464, 4096)
    assert shapes["model.layers.31.mlp.down_proj.weight"] == (4096, 12288)
    assert shapes["model.mm_projector.0.weight"] == (4096, 1152)
    assert shapes["model.image_newline"] == (4096,)
    vis = hf_params.VISION_PREFIX
    assert shapes[vis + "embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert shapes[vis + "encoder.layers.25.mlp.fc1.weight"] == (4304, 1152)
    assert vis + "encoder.layers.26.mlp.fc1.weight" not in shapes  # the dropped last layer
    total = sum(math.prod(s) for s in shapes.values())
    assert total == lladav.param_counts(cfg)["total"]
    assert all(x.dtype == jax.numpy.float32 for x in jax.tree.leaves(params))
