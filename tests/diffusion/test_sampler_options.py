"""SamplerOptions: the one definition of the sampler's ranges (lladav-generate, lladav-eval and
Model.generate all build one), each out-of-range option named with its range."""

import pytest

from lladav_jax.diffusion.options import SamplerOptions


@pytest.mark.parametrize(("options", "words"), [
    (dict(gen_length=0), "gen_length=0: must be >= 1"),
    (dict(gen_length=-1), "gen_length=-1: must be >= 1"),
    (dict(steps=0), "steps=0: must be >= 1"),
    (dict(block_length=0), "block_length=0: must be >= 1"),
    (dict(gen_length=8.0), "gen_length=8.0: must be an integer"),
    (dict(gen_length=10, block_length=4, steps=4), "multiple of block_length 4"),
    (dict(gen_length=8, block_length=4, steps=3), "multiple of the number of blocks"),
    (dict(temperature=-1), "temperature=-1.0: must be >= 0"),
    (dict(cfg_scale=-0.5), "cfg_scale=-0.5: must be >= 0"),
    (dict(threshold=0.0), "threshold=0.0: must be a probability in (0, 1]"),
    (dict(threshold=1.5), "in (0, 1]"),
    (dict(remasking="lowest"), "remasking='lowest': choose one of low_confidence, random"),
    (dict(cache="full"), "cache='full': choose one of none, prefix, dual"),
    (dict(temperature="hot"), "temperature='hot': must be a number"),
])
def test_out_of_range_options_are_named(options, words):
    with pytest.raises(ValueError) as e:
        SamplerOptions(**options)
    assert str(e.value).startswith("sampler option ") and words in str(e.value), str(e.value)


def test_edges_of_the_ranges_are_allowed():
    o = SamplerOptions(gen_length=1, block_length=1, steps=1, temperature=0, cfg_scale=0,
                       threshold=1.0)
    assert o.num_blocks == 1 and o.temperature == 0.0
