"""Checkpoint conversion: official HF layout <-> model directory, exact and checked.

Synthetic official-layout directories of the tiny model are written with our safetensors
writer; the exported ones are read back with the reference `safetensors` library (torch) and
loaded into transformers' LLaVA-OneVision, whose logits must equal our model's.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from PIL import Image
from safetensors import safe_open

from lladav_jax.checkpoints import hf_convert, modeldir, safetensors_io
from lladav_jax.checkpoints import torch_reference as ref
from lladav_jax.cli import convert as convert_cli
from lladav_jax.data.image import process_image
from lladav_jax.data.layout import collate_visual
from lladav_jax.models import hf_config, hf_params, lladav, variants
from lladav_jax.scale import sharding
from tests.close import assert_close

CFG = variants.model_config("tiny")
ENTRIES = hf_params.lladav_entries(CFG)
VP = hf_params.VISION_PREFIX
POST_LN = {VP + "post_layernorm.weight": 1.0, VP + "post_layernorm.bias": 0.0}
REPO = pathlib.Path(__file__).resolve().parents[2]


def official_tensors(seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random tensors under every official key (norm weights around 1), post_layernorm as the
    identity (what our exporter writes)."""
    rng = np.random.default_rng(seed)
    shapes = hf_params.expected_hf_shapes(ENTRIES, lladav.abstract_params(CFG))
    out = {k: ((1.0 if "norm" in k and k.endswith("weight") else 0.0)
               + 0.2 * rng.standard_normal(s)).astype(dtype) for k, s in shapes.items()}
    out.update({k: np.full(CFG.vision.hidden_size, v, dtype) for k, v in POST_LN.items()})
    return out


def write_dir(path: pathlib.Path, tensors: dict, config: dict, shard_bytes: int = 300_000):
    path.mkdir(parents=True)
    safetensors_io.write_sharded(path, [safetensors_io.pending(k, v) for k, v in tensors.items()],
                                 shard_bytes)
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text('{"model": "stand-in"}')


def read_reference(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory via the reference safetensors reader (torch)."""
    index = json.loads((path / safetensors_io.INDEX_FILE).read_text())["weight_map"]
    out = {}
    for name in sorted(set(index.values())):
        with safe_open(path / name, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def bits(x) -> np.ndarray:
    """Raw bytes of a torch tensor or numpy array (bit-exact comparison, bf16 included)."""
    if isinstance(x, torch.Tensor):
        x = x.view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32)
    else:
        x = x.view(np.int16 if x.dtype == ml_dtypes.bfloat16 else np.int32)
    return np.asarray(x)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def no_leftovers(parent: pathlib.Path, name: str) -> bool:
    return not any(p.name.startswith((name, f".{name}")) for p in parent.iterdir())


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("src") / "official"
    write_dir(path, official_tensors(), hf_config.config_to_hf(CFG, "float32"))
    return path


SHARD = 60_000  # bytes: several shards even for the tiny model


@pytest.mark.parametrize("stored,param_dtype", [
    ("bfloat16", "float32"), ("float32", "float32"), ("bfloat16", "bfloat16"),
])
def test_round_trip_is_bit_identical(tmp_path, stored, param_dtype):
    dtype = np.dtype(ml_dtypes.bfloat16) if stored == "bfloat16" else np.dtype(np.float32)
    src = tmp_path / "official"
    write_dir(src, official_tensors(1, dtype), hf_config.config_to_hf(CFG, stored))
    hf_convert.import_hf(src, tmp_path / "ours", param_dtype=param_dtype, block_bytes=2048)
    assert modeldir.load_config(tmp_path / "ours").param_dtype == param_dtype
    hf_convert.export_hf(tmp_path / "ours", tmp_path / "back", dtype=stored, shard_bytes=SHARD,
                      block_bytes=1000)

    want, got = read_reference(src), read_reference(tmp_path / "back")
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(bits(got[k]), bits(want[k]), err_msg=k)
    # Small shards with an index; config and tokenizer carried over.
    index = json.loads((tmp_path / "back" / safetensors_io.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) >= index["metadata"]["total_size"] // SHARD > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in got.values())
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "llava_llada" and config["torch_dtype"] == stored
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
    assert len(config["image_grid_pinpoints"]) == 36
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == b'{"model": "stand-in"}'


def test_config_maps_both_ways():
    for name in ("tiny", "8b"):
        cfg = variants.model_config(name)
        back = hf_config.config_from_hf(json.loads(json.dumps(hf_config.config_to_hf(cfg))))
        for part in ("text", "vision", "image"):
            assert back[part].to_dict() == cfg[part].to_dict(), (name, part)
    # The official LLM config (no vision_config): LM fields read, so400m vision defaults.
    official = json.loads((REPO / "tests/fixtures/llada_8b_llm.config.json").read_text())
    cfg = hf_config.config_from_hf({**official, "model_type": "llava_llada",
                                  "mm_vision_select_layer": -2})
    assert cfg.text.to_dict() == variants.model_config("8b").text.to_dict()
    assert cfg.vision.to_dict() == variants.model_config("8b").vision.to_dict()
    with pytest.raises(hf_config.ConversionError, match="mm_projector_type 'linear'"):
        hf_config.config_from_hf({**official, "mm_projector_type": "linear"})


@pytest.fixture(scope="module")
def exported(fp32_dir, tmp_path_factory):
    """fp32 official -> model directory -> fp32 official."""
    root = tmp_path_factory.mktemp("exported")
    hf_convert.import_hf(fp32_dir, root / "ours")
    hf_convert.export_hf(root / "ours", root / "hf", dtype="float32")
    return root


def picture(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def test_exported_logits_match_llava_onevision(exported):
    # From the exported config.json alone; the loader fails unless every tensor finds its place
    # and only what LLaDA-V never runs (the vision layer after `select_layer`, the pooling head)
    # is absent.
    hf, hf_cfg = ref.load(exported / "hf")
    ours, cfg = modeldir.load_model(exported / "ours")
    assert hf_cfg.text.to_dict() == cfg.text.to_dict()

    img = process_image(picture(230, 97, 1), cfg)  # 5x2 grid, unpadded and downsampled
    image_id = hf.config.image_token_index
    v, before, after = img.layout.num_tokens, 5, 9
    text = np.random.default_rng(0).integers(0, image_id, before + after)
    tokens = np.concatenate([text[:before], np.full(v, image_id), text[before:]])[None]
    valid = np.ones_like(tokens, np.int32)
    visual = collate_visual([[(img, before)]], cfg, tokens.shape[1])
    got = nnx.jit(lambda m, b: m(**b))(ours, dict(tokens=tokens, segment_ids=valid, **visual))

    pixels = torch.from_numpy(img.tiles.transpose(0, 3, 1, 2).copy())[None]
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(tokens), pixel_values=pixels,
                  image_sizes=torch.tensor([[97, 230]]),
                  attention_mask=ref.bidirectional_mask(valid)).logits.numpy()
    assert_close(np.asarray(got), want)


def test_load_model_onto_a_mesh(exported):
    single, _ = modeldir.load_model(exported / "ours")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = modeldir.load_model(exported / "ours", mesh=mesh)
    q = sharded.llm.layers.q.kernel[...]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)
    a = leaves(nnx.to_pure_dict(nnx.state(single, nnx.Param)))
    b = leaves(nnx.to_pure_dict(nnx.state(sharded, nnx.Param)))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def llm_and_vision_dirs(root: pathlib.Path, tensors: dict) -> None:
    """LLaDA in HF-port and OLMo-style names; SigLIP as a full SiglipModel (prefixed, 3 stored
    layers, text tower, head) and as transformers 5 saves a SiglipVisionModel (2 layers)."""
    t, v = CFG.text, CFG.vision
    llm = {k: x for k, x in tensors.items() if hf_params.llada_key(k) == k}
    port_cfg = {"model_type": "llada", "hidden_size": t.hidden_size,
                "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads, "intermediate_size": t.intermediate_size,
                "vocab_size": t.vocab_size, "rope_theta": t.rope_theta,
                "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": 1e-5}
    write_dir(root / "llm_port", llm, port_cfg)
    to_olmo = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
               "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
               "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}
    top = {"model.embed_tokens.weight": "model.transformer.wte.weight",
           "model.norm.weight": "model.transformer.ln_f.weight",
           "lm_head.weight": "model.transformer.ff_out.weight"}
    olmo = {}
    for k, x in llm.items():
        if k in top:
            olmo[top[k]] = x
        else:
            _, _, i, part = k.split(".", 3)
            olmo[f"model.transformer.blocks.{i}.{to_olmo[part.removesuffix('.weight')]}.weight"] = x
    olmo_cfg = {"model_type": "llada", "d_model": t.hidden_size, "n_layers": t.num_layers,
                "n_heads": t.num_heads, "n_kv_heads": t.num_kv_heads,
                "mlp_hidden_size": t.intermediate_size, "vocab_size": t.vocab_size,
                "embedding_size": t.vocab_size, "rope_theta": t.rope_theta,
                "max_sequence_length": t.max_position_embeddings, "weight_tying": False}
    write_dir(root / "llm_olmo", olmo, olmo_cfg)

    vision = {k[len(VP):]: x for k, x in tensors.items() if k.startswith(VP)}
    rng = np.random.default_rng(5)
    last = {k.replace("layers.0.", "layers.2."): rng.standard_normal(x.shape).astype(x.dtype)
            for k, x in vision.items() if k.startswith("encoder.layers.0.")}
    siglip = {"hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
              "num_attention_heads": v.num_heads, "intermediate_size": v.intermediate_size,
              "image_size": v.image_size, "patch_size": v.patch_size, "layer_norm_eps": 1e-6}
    full = {"vision_model." + k: x for k, x in {**vision, **last}.items()}
    full["vision_model.post_layernorm.weight"] = rng.standard_normal(v.hidden_size)
    full["vision_model.head.probe"] = np.zeros((1, 1, v.hidden_size), np.float32)
    full["text_model.embeddings.token_embedding.weight"] = np.zeros((10, 8), np.float32)
    full["logit_scale"] = np.zeros(1, np.float32)
    write_dir(root / "siglip_full", full, {"model_type": "siglip", "vision_config": siglip})
    kept = {k: x for k, x in vision.items() if not k.startswith("post_layernorm")}
    write_dir(root / "siglip_vision", kept, {"model_type": "siglip_vision_model", **siglip})


@pytest.mark.slow
def test_llm_names_and_vision_layouts_import_identically(tmp_path, fp32_dir):
    tensors = official_tensors()
    llm_and_vision_dirs(tmp_path, tensors)
    hf_convert.import_parts(tmp_path / "llm_port", tmp_path / "siglip_full", tmp_path / "a", seed=3)
    assert convert_cli.main(["import-hf", "--llm", str(tmp_path / "llm_olmo"), "--vision",
                         str(tmp_path / "siglip_vision"), "--out", str(tmp_path / "b"),
                         "--seed", "3"]) == 0
    a, b = modeldir.load_params(tmp_path / "a"), modeldir.load_params(tmp_path / "b")
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # LLM and vision equal the official directory's; the connector is `create`'s, seed 3.
    hf_convert.import_hf(fp32_dir, tmp_path / "full")
    full = modeldir.load_params(tmp_path / "full")
    for part in ("llm", "vision"):
        for x, y in zip(leaves(a[part]), leaves(full[part]), strict=True):
            np.testing.assert_array_equal(x, y)
    fresh = nnx.to_pure_dict(nnx.state(lladav.create(CFG, seed=3), nnx.Param))
    for part in ("connector", "image_newline"):
        for x, y in zip(leaves(a[part]), leaves(fresh[part]), strict=True):
            np.testing.assert_array_equal(x, y)
    assert (tmp_path / "b" / "tokenizer.json").exists()
    # A renamed original-name tensor is reported under the name it is stored as.
    bad = {k: np.asarray(x) for k, x in
           safetensors_io.open_checkpoint(tmp_path / "llm_olmo").items()}
    bad["model.transformer.blocks.1.attn_outt.weight"] = bad.pop(
        "model.transformer.blocks.1.attn_out.weight")
    write_dir(tmp_path / "bad", bad, json.loads((tmp_path / "llm_olmo/config.json").read_text()))
    match = (r"(?s)missing keys \(1\): model\.layers\.1\.self_attn\.o_proj\.w.*"
             r"unexpected keys \(1\): bad/model\.transformer\.blocks\.1\.attn_outt")
    with pytest.raises(hf_params.WeightMappingError, match=match):
        hf_convert.import_parts(tmp_path / "bad", tmp_path / "siglip_full", tmp_path / "c")
    assert no_leftovers(tmp_path, "c")


def test_bad_directories_fail_by_name_and_write_nothing(tmp_path):
    config = hf_config.config_to_hf(CFG, "float32")
    out = tmp_path / "out"

    def fails(name, tensors, match, cfg=config, exc=ValueError):
        write_dir(tmp_path / name, tensors, cfg)
        with pytest.raises(exc, match=match):
            hf_convert.import_hf(tmp_path / name, out)
        assert not out.exists() and no_leftovers(tmp_path, "out")

    good = official_tensors()
    renamed = dict(good)
    renamed["model.layers.1.mlp.up_proj.weights"] = renamed.pop("model.layers.1.mlp.up_proj.weight")
    fails("renamed", renamed, r"(?s)missing keys \(1\): model\.layers\.1\.mlp\.up_proj\.weight\n"
          r".*unexpected keys \(1\): model\.layers\.1\.mlp\.up_proj\.weights")
    reshaped = dict(good)
    reshaped["model.mm_projector.0.weight"] = reshaped["model.mm_projector.0.weight"][:, :-1]
    fails("reshaped", reshaped, r"model\.mm_projector\.0\.weight: stored \(64, 31\), "
          r"expected \(64, 32\)")
    ints = dict(good)
    ints["model.image_newline"] = ints["model.image_newline"].astype(np.int32)
    fails("ints", ints, r"dtype.*model\.image_newline: I32")
    # A config that does not match the tensors: every offending key is listed.
    fails("config", good, r"missing keys \(9\): model\.layers\.2\.",
          cfg={**config, "num_hidden_layers": 3})
    fails("config2", good, r"wrong shapes \(\d+\): .*expected \(48,",
          cfg={**config, "intermediate_size": 48})

    ours = tmp_path / "ours"
    write_dir(tmp_path / "ok", good, config)
    hf_convert.import_hf(tmp_path / "ok", ours)
    # A release may also hold the last vision layer (27 of 27) and the pooling head: accepted.
    extra = {k.replace(".layers.0.", ".layers.2."): x for k, x in good.items()
             if k.startswith(VP + "encoder.layers.0.")}
    extra[VP + "head.probe"] = np.zeros((1, 1, CFG.vision.hidden_size), np.float32)
    write_dir(tmp_path / "extra", {**good, **extra}, config)
    hf_convert.import_hf(tmp_path / "extra", tmp_path / "ours27")
    for x, y in zip(leaves(modeldir.load_params(ours)),
                    leaves(modeldir.load_params(tmp_path / "ours27")), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(FileExistsError):
        hf_convert.import_hf(tmp_path / "ok", ours)
    with pytest.raises(hf_convert.ConversionError, match="unknown dtype 'float16'"):
        hf_convert.export_hf(ours, out, dtype="float16")
    assert not out.exists() and no_leftovers(tmp_path, "out")


def test_command_line(tmp_path, fp32_dir, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-m", "lladav_jax.cli.convert", "import-hf", "--hf_dir", str(fp32_dir),
         "--out", str(tmp_path / "ours")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert convert_cli.main(["export-hf", "--ckpt", str(tmp_path / "ours"), "--out",
                         str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    want, got = read_reference(fp32_dir), read_reference(tmp_path / "hf")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    capsys.readouterr()
    assert convert_cli.main(["export-hf", "--ckpt", str(tmp_path / "nope"), "--out",
                         str(tmp_path / "x")]) == 1
    assert "nope is not a model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_cli.main(["import-hf", "--hf_dir", str(fp32_dir), "--llm", "x", "--out", "y"])


def test_nonfinite_tensors_are_refused_by_name_both_ways(tmp_path, fp32_dir, capsys):
    """NaN in an official tensor stops an import, naming it (nothing is written); NaN in one of
    our parameters stops an export alike; --allow_nonfinite converts them anyway."""
    config = hf_config.config_to_hf(CFG, "float32")
    tensors = official_tensors()
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key] = tensors[key].copy()
    tensors[key][3, 5] = np.nan
    write_dir(tmp_path / "nan", tensors, config)
    out = tmp_path / "ours"
    assert convert_cli.main(["import-hf", "--hf_dir", str(tmp_path / "nan"), "--out",
                             str(out)]) == 1
    err = capsys.readouterr().err
    assert f"lladav-convert: error: {key} holds NaN or inf" in err and "--allow_nonfinite" in err
    assert "Traceback" not in err and not out.exists() and no_leftovers(tmp_path, "ours")
    assert convert_cli.main(["import-hf", "--hf_dir", str(tmp_path / "nan"), "--out", str(out),
                             "--allow_nonfinite"]) == 0
    params = modeldir.load_params(out)
    assert np.isnan(params["llm"]["layers"]["up"]["kernel"]).sum() == 1

    assert convert_cli.main(["export-hf", "--ckpt", str(out), "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert f"error: {key} (ours: llm/layers/up/kernel) holds NaN or inf" in err, err
    assert not (tmp_path / "hf").exists() and no_leftovers(tmp_path, "hf")
    assert convert_cli.main(["export-hf", "--ckpt", str(out), "--out", str(tmp_path / "hf"),
                             "--allow_nonfinite"]) == 0
    assert np.isnan(read_reference(tmp_path / "hf")[key].float().numpy()).sum() == 1


def test_safetensors_io_matches_the_reference_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((5, 7)).astype(np.float32),
              "b": np.arange(6, dtype=np.int64).reshape(2, 3),
              "c": rng.standard_normal((9,)).astype(ml_dtypes.bfloat16)}
    # Ours -> reference reader (c written in three row blocks).
    pending = [safetensors_io.pending("a", arrays["a"]), safetensors_io.pending("b", arrays["b"]),
               safetensors_io.PendingTensor("c", (9,), arrays["c"].dtype,
                                            lambda: [arrays["c"][:4], arrays["c"][4:8],
                                                     arrays["c"][8:]])]
    safetensors_io.write_file(tmp_path / "ours.safetensors", pending)
    with safe_open(tmp_path / "ours.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        np.testing.assert_array_equal(bits(f.get_tensor("c")), bits(arrays["c"]))
        np.testing.assert_array_equal(f.get_tensor("a").numpy(), arrays["a"])
    # Reference writer -> our lazy reader, row ranges included.
    save_file({"a": arrays["a"], "b": arrays["b"]}, tmp_path / "ref.safetensors")
    lazy = safetensors_io.read_header(tmp_path / "ref.safetensors")
    np.testing.assert_array_equal(lazy["a"][1:4], arrays["a"][1:4])
    np.testing.assert_array_equal(np.asarray(lazy["b"]), arrays["b"])
    assert load_file(tmp_path / "ours.safetensors")["b"].tolist() == arrays["b"].tolist()
