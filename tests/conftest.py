import os
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*kernels-community.*")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """arch -> folder of a saved tiny random model (+ tokenizer), built once per session."""
    from lowbit.testing import ARCHS, save_tiny_model
    root = tmp_path_factory.mktemp("tiny_models")
    cache = {}

    def get(arch: str = "llama"):
        if arch not in cache:
            assert arch in ARCHS
            cache[arch] = save_tiny_model(root / arch, arch)
        return cache[arch]
    return get
