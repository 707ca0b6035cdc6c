"""Shared fixtures: one trained tokenizer per session and a cache of random checkpoints."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton fixes compiled-vs-interpreted when its functions are decorated (on import), so the
    # kernel tests need triton imported in interpreter mode before anything else imports it.
    # The variable is then restored: the other tests keep the reference kernels on CPU, and
    # tests/test_kernels.py sets it again while it runs.
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from offload_runtime.kernels import load_triton, triton_available  # noqa: E402

        if triton_available():
            load_triton()
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved

from offload_runtime import synthetic  # noqa: E402

torch.set_num_threads(2)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tokenizer():
    return synthetic.train_tokenizer()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer):
    """checkpoint(model_type, **config) -> path of a random checkpoint (built once per argument set)."""
    made: dict = {}

    def make(model_type: str = "llama", seed: int = 0, **overrides):
        key = (model_type, seed, repr(sorted(overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"ckpt_{model_type}")
            synthetic.make_checkpoint(path, model_type, tokenizer=tokenizer, seed=seed, **overrides)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def long_text():
    return synthetic.synthetic_text(1500, seed=7)


@pytest.fixture(scope="session")
def trained_pair():
    """The shipped stories260K target and its distilled draft (a LoadedModel each), fp32 on CPU, loaded once."""
    from offload_runtime import loading, trained

    target = loading.load(str(trained.TARGET), torch.device("cpu"), "float32")
    draft = loading.load(str(trained.DRAFT), torch.device("cpu"), "float32", with_tokenizer=False)
    return target, draft
