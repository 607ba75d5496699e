"""LoRA model directories in the official layouts: exported merged (LoRA and QLoRA) and as a
PEFT adapter, checked against transformers' LLaVA-OneVision with peft; an adapter imported
back; bad adapters refused by name with nothing written."""

import dataclasses
import json
import pathlib
import shutil

import numpy as np
import peft
import pytest
import torch
from flax import nnx, traverse_util
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from lladav_jax.checkpoints import hf_convert, modeldir, peft_adapter, safetensors_io
from lladav_jax.checkpoints import torch_reference as ref
from lladav_jax.cli import convert as convert_cli
from lladav_jax.data.image import process_image
from lladav_jax.data.layout import collate_visual
from lladav_jax.models import adapters, hf_params, lladav, variants
from lladav_jax.models.config import LoraConfig, ModelConfig, QuantConfig
from tests.checkpoints.test_convert import leaves, no_leftovers, picture, read_reference
from tests.close import assert_close

CFG = ModelConfig.from_config(variants.model_config("tiny"))
# LLaDA's q adapted but not SigLIP's, SigLIP's k but not LLaDA's: target_modules must tell.
LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "gate", "down"),
                  vision_targets=("k", "o", "fc1"))
LORA_CFG = dataclasses.replace(CFG, lora=LORA)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> pathlib.Path:
    """base/ (plain), lora/ (its adapters with random B), their fp32 exports base_hf/ and
    merged_hf/, and adapter/ (lora/ --adapter_only)."""
    root = tmp_path_factory.mktemp("peft")
    base = nnx.to_pure_dict(nnx.state(lladav.create(CFG, seed=1), nnx.Param))
    modeldir.save_model_dir(root / "base", base, CFG.to_config())
    flat = traverse_util.flatten_dict(adapters.adapt(base, LORA_CFG, seed=2))
    rng = np.random.default_rng(3)
    for k, v in flat.items():  # B starts at zero: a trained adapter has it anything but
        if k[-1] == "lora_b":
            flat[k] = (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
    modeldir.save_model_dir(root / "lora", traverse_util.unflatten_dict(flat),
                            LORA_CFG.to_config())
    hf_convert.export_hf(root / "base", root / "base_hf", dtype="float32")
    hf_convert.export_hf(root / "lora", root / "merged_hf", dtype="float32")
    assert convert_cli.main(["export-hf", "--ckpt", str(root / "lora"), "--out",
                             str(root / "adapter"), "--adapter_only"]) == 0  # float32
    return root


@pytest.fixture(scope="module")
def logits(root) -> tuple[dict, np.ndarray]:
    """(an image question as transformers takes it, our LoRA model's logits for it)."""
    model, cfg = modeldir.load_model(root / "lora")
    img = process_image(picture(230, 97, 1), cfg)  # several tiles: every vision layer counts
    image_id = cfg.text.vocab_size - 1
    text = np.random.default_rng(0).integers(0, image_id, 14)
    tokens = np.concatenate([text[:5], np.full(img.layout.num_tokens, image_id), text[5:]])[None]
    valid = np.ones_like(tokens, np.int32)
    visual = collate_visual([[(img, 5)]], cfg, tokens.shape[1])
    ours = nnx.jit(lambda m, b: m(**b))(model, dict(tokens=tokens, segment_ids=valid, **visual))
    torch_inputs = dict(input_ids=torch.from_numpy(tokens),
                        pixel_values=torch.from_numpy(img.tiles.transpose(0, 3, 1, 2).copy())[None],
                        image_sizes=torch.tensor([[97, 230]]),
                        attention_mask=ref.bidirectional_mask(valid))
    return torch_inputs, np.asarray(ours)


def torch_logits(hf, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return hf(**inputs).logits.numpy()


def test_merged_export_computes_the_lora_model(root, logits):
    inputs, ours = logits
    hf, _ = ref.load(root / "merged_hf")
    assert_close(torch_logits(hf, inputs), ours)
    base, _ = ref.load(root / "base_hf")  # the adapters matter: without them it differs
    assert np.abs(torch_logits(base, inputs) - ours).max() > 1e-2


def test_qlora_exports_dequantized_and_merged(root, tmp_path):
    cfg = dataclasses.replace(LORA_CFG, quantize=QuantConfig(weights="int4", tile=32,
                                                             vision=True))
    lora = modeldir.load_params(root / "lora", LORA_CFG.to_config())
    params = adapters.adapt(modeldir.load_params(root / "base", CFG.to_config()), cfg,
                            adapters=adapters.adapters_of(lora))
    modeldir.save_model_dir(tmp_path / "qlora", params, cfg.to_config())
    hf_convert.export_hf(tmp_path / "qlora", tmp_path / "hf", dtype="float32", block_bytes=4096)
    got = read_reference(tmp_path / "hf")
    want = hf_params.to_hf(adapters.merge(params, cfg), hf_params.lladav_entries(CFG))
    for key, x in want.items():
        np.testing.assert_allclose(got[key].numpy(), x, rtol=0, atol=1e-6, err_msg=key)
    # Dequantized: not the float base.
    base = read_reference(root / "base_hf")
    assert not np.allclose(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def official_names(hf: ref.HFModel) -> torch.nn.Module:
    """LLaVA-OneVision's layers under their official LLaDA-V names (the same modules, so that
    peft's adapters injected here run in `hf`)."""
    official = torch.nn.Module()
    official.model = torch.nn.Module()
    official.model.layers = hf.model.language_model.layers
    vision = official.model.vision_tower = torch.nn.Module()
    vision.vision_tower = torch.nn.Module()
    vision.vision_tower.vision_model = hf.model.vision_tower  # holds all 3 stored layers
    official.lm_head = hf.lm_head
    return official


def test_adapter_loads_in_peft_on_the_base(root, logits):
    config = json.loads((root / "adapter" / peft_adapter.ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["bias"]) == (
        "LORA", 4, 8, "none")
    inputs, ours = logits
    hf, _ = ref.load(root / "base_hf")
    model = peft.PeftModel.from_pretrained(official_names(hf), root / "adapter")
    assert_close(torch_logits(hf, inputs), ours)
    # Exactly the adapted modules got adapters: LLaDA's q_proj but not SigLIP's, SigLIP's
    # k_proj but not LLaDA's, and no vision layer past select_layer.
    injected = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
                if isinstance(m, LoraLayer)}
    want = {m.name.format(i=i) for m in peft_adapter.adapted_modules(LORA_CFG)
            for i in range(m.layers)}
    assert injected == want and len(want) == 5 * 2 + 3 * 2
    # Keys as peft itself saves this model's adapters, with our values.
    saved = safetensors_io.read_header(root / "adapter" / peft_adapter.ADAPTER_FILE)
    theirs = get_peft_model_state_dict(model)
    assert sorted(saved) == sorted(theirs)
    for k, t in theirs.items():
        np.testing.assert_array_equal(np.asarray(saved[k]), t.numpy(), err_msg=k)


def test_adapter_imports_back_identically(root, tmp_path):
    out = tmp_path / "back"
    assert convert_cli.main(["import-hf", "--adapter", str(root / "adapter"), "--base",
                             str(root / "base"), "--out", str(out), "--block_bytes", "5000"]) == 0
    cfg = ModelConfig.from_config(modeldir.load_config(out))
    assert cfg == LORA_CFG
    want = modeldir.load_params(root / "lora")
    got = modeldir.load_params(out)
    assert jax_tree_keys(got) == jax_tree_keys(want)
    for x, y in zip(leaves(got), leaves(want), strict=True):
        np.testing.assert_array_equal(x, y)


def jax_tree_keys(tree) -> list:
    return sorted(traverse_util.flatten_dict(tree))


def bad_adapter(src: pathlib.Path, dst: pathlib.Path, config=None, tensors=None) -> pathlib.Path:
    """A copy of the adapter directory `src` with its config updated by `config` and its
    tensors replaced by `tensors(dict of arrays)`'s result."""
    shutil.copytree(src, dst)
    if config:
        path = dst / peft_adapter.ADAPTER_CONFIG
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors:
        path = dst / peft_adapter.ADAPTER_FILE
        arrays = tensors({k: np.asarray(t) for k, t in safetensors_io.read_header(path).items()})
        safetensors_io.write_file(path, [safetensors_io.pending(k, v) for k, v in arrays.items()])
    return dst


def renamed(arrays: dict, old: str, new: str) -> dict:
    return {k.replace(old, new): v for k, v in arrays.items()}


def test_bad_adapters_fail_by_name_and_write_nothing(root, tmp_path, capsys):
    out = tmp_path / "out"
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"

    def fails(name, match, **change):
        src = bad_adapter(root / "adapter", tmp_path / name, **change)
        with pytest.raises(ValueError, match=match):
            peft_adapter.import_adapter(src, root / "base", out)
        assert not out.exists() and no_leftovers(tmp_path, "out")

    fails("rank", r"rank: adapter_config\.json says r 8, the tensors have rank 4",
          config={"r": 8})
    fails("shape", rf"wrong tensors \(1\): {q0}\.lora_A\.weight: stored \(4, 63\), "
          r"expected \(4, 64\)", tensors=lambda a: {**a, f"{q0}.lora_A.weight":
                                                  a[f"{q0}.lora_A.weight"][:, :-1]})
    fails("unknown", r"(?s)cannot adapt \(6\): base_model\.model\.lm_head\.lora_A\.weight.*"
          r"layers\.0\.self_attn\.qq_proj\.lora_A",
          tensors=lambda a: {**renamed(a, "q_proj", "qq_proj"),
                             "base_model.model.lm_head.lora_A.weight": np.zeros((4, 64)),
                             "base_model.model.lm_head.lora_B.weight": np.zeros((256, 4))})
    fails("ia3", r"peft_type 'IA3'; only LORA", config={"peft_type": "IA3"})
    fails("dora", r"beyond plain LoRA.*use_dora True", config={"use_dora": True})
    fails("unpaired", r"unpaired \(1\): model\.layers\.1\.mlp\.down_proj: lora_B without",
          tensors=lambda a: {k: v for k, v in a.items()
                             if k != "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"})
    # From the command line: one error line, exit 1, nothing written.
    capsys.readouterr()
    assert convert_cli.main(["import-hf", "--adapter", str(tmp_path / "rank"), "--base",
                             str(root / "base"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "lladav-convert: error:" in err and "says r 8" in err and "Traceback" not in err
    assert not out.exists()
    assert convert_cli.main(["export-hf", "--ckpt", str(root / "base"), "--out", str(out),
                             "--adapter_only"]) == 1
    assert "has no adapters" in capsys.readouterr().err and not out.exists()


def test_adapter_of_a_run_that_trained_the_connector_warns(root, tmp_path):
    shutil.copytree(root / "lora", tmp_path / "run")  # as a workdir whose run trained it
    (tmp_path / "run" / modeldir.TRAIN_CONFIG_FILE).write_text(
        json.dumps({"optim": {"lr": {"vision": 0.0, "connector": 1e-5, "llm": 1e-4}}}))
    with pytest.warns(UserWarning, match=r"trained the connector.*merged export"):
        peft_adapter.export_adapter(tmp_path / "run", tmp_path / "adapter")
