"""lladav-jax: LLaDA-V in JAX/Flax.

    import lladav_jax as lv
    m = lv.load(DIR)                    # or lv.load(DIR, quantize="int8"): int8 | int4 weights
    m.generate(image, prompt, **options)
    m.generate(lv.Video("clip.mp4"), prompt)   # a video; a list of images works too
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lladav_jax.inference.api import Generation, Model, Video, load

__all__ = ["Generation", "Model", "Video", "load"]


def __getattr__(name: str):
    # Lazy: `import lladav_jax` stays light (no JAX) until the API is used.
    if name in __all__:
        from lladav_jax.inference import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
