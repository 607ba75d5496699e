"""Vision features computed once per set of images (inference/features.py): a conversation's
later turns and several questions about one image reuse them, and the answers are those of the
tower run inside the sampler. A random `tiny` model."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lladav_jax.data.layout import collate_visual
from lladav_jax.inference import api, features
from tests.serve.test_server import png
from tests.tiny_model import random_model_dir

OPTIONS = dict(gen_length=8, block_length=4, steps=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return api.load(random_model_dir(tmp_path_factory.mktemp("features")))


def test_a_conversation_encodes_its_image_once(model):
    cache = model.feature_cache
    cache.clear()
    before = cache.encodes
    first = model.generate(png(1), "What shape?", **OPTIONS)
    turns = [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": first},
             {"from": "human", "value": "And its color?"}]
    second = model.generate(png(1), turns, **OPTIONS)
    turns += [{"from": "gpt", "value": second}, {"from": "human", "value": "Where is it?"}]
    hits = cache.hits
    third = model.generate(png(1), turns, **OPTIONS)
    assert cache.encodes == before + 1 and cache.hits == hits + 1
    cache.clear()  # computed afresh, the answer is the same
    assert model.generate(png(1), turns, **OPTIONS) == third
    assert cache.encodes == before + 2
    # Several questions about one image: one batch, one run of the tower.
    questions = [f"Question {i}?" for i in range(3)]
    answers = model.generate(png(2), questions, **OPTIONS)
    assert cache.encodes == before + 3
    assert answers == [model.generate(png(2), q, **OPTIONS) for q in questions]


def test_features_give_the_answers_of_the_tower_in_the_sampler(model):
    """The sampler fed `features` and the sampler fed `pixels` (the tower inside its program)
    commit the same tokens, for one image, several and none in one batch."""
    options = model.options(**OPTIONS)
    prompts = [model.prepare(png(3), "What shape?", options),
               model.prepare([png(4), png(5)], "Which one is red?", options),
               model.prepare(None, "Hello?", options)]
    with_features = model._collate(prompts, options.gen_length)
    p_len = with_features["tokens"].shape[1]
    with_pixels = {k: v for k, v in with_features.items() if k != "features"}
    with_pixels["pixels"] = collate_visual([p.images for p in prompts], model.config,
                                           p_len + options.gen_length)["pixels"]
    shape = with_pixels["pixels"].shape
    tower = model.module.encode_images(with_pixels["pixels"].reshape(-1, *shape[2:]))
    tower = np.asarray(tower).reshape(*shape[:2], *tower.shape[1:])
    # Rows with images: the same features (a row without is zeros: none are read).
    np.testing.assert_allclose(np.asarray(with_features["features"])[:2], tower[:2],
                               rtol=1e-5, atol=1e-5)
    sampler = model._sampler(options, False)
    got = [np.asarray(sampler(b, jax.random.key(0))["tokens"])
           for b in (with_features, with_pixels)]
    np.testing.assert_array_equal(got[0], got[1])


def test_least_recently_used_features_go_first(model):
    cfg = model.config
    one = [model.prepare(png(s), "q", model.options(**OPTIONS)) for s in (6, 7)]
    row_bytes = model.feature_cache.row(one[0].visual_key, [i for i, _ in one[0].images]).nbytes
    cache = features.FeatureCache(model.module, int(cfg.image.max_tiles),
                                  int(cfg.vision.image_size), max_bytes=row_bytes)
    for p in (one[0], one[1], one[0], one[0]):
        cache.row(p.visual_key, [i for i, _ in p.images])
    assert (cache.encodes, cache.hits) == (3, 1)  # the second image pushed the first out
    assert features.key([]) == b"" and features.key(one[0].images[0][:1]) == one[0].visual_key
