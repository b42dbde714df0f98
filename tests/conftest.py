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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread does the work faster than two waiting on each other (and keeps CPU use modest)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def oracle():
    """llama.cpp's reference quantizer (ggml-quants.c compiled from the llama-cpp-python sdist), or a skip
    that says why it cannot be built here."""
    from lowbit.testing import ggml_oracle
    try:
        return ggml_oracle.load()
    except ggml_oracle.OracleUnavailable as e:
        pytest.skip(f"llama.cpp reference quantizer unavailable: {e}")


@pytest.fixture(scope="module")
def cpu_isas():
    """The CPU kernels' vector paths this machine can run, best first (the C++ backend must build)."""
    from lowbit.kernels.cpu import build
    assert build.load(), "the C++ CPU backend failed to build on this machine"
    return build.supported_isas()


@pytest.fixture(scope="module")
def tiny_generated(tiny_model_dirs, tmp_path_factory):
    """(model dir, `lowbit generate` output) of the tiny llama: 16 sequences of up to 24 tokens in shards of 8,
    written once per module for each set of extra generate overrides (e.g. top-k logits, EOS stopping)."""
    from lowbit.methods.data_gen.config import load_generate_config
    from lowbit.methods.data_gen.runner import run as generate
    cache = {}

    def get(*extra):
        if extra not in cache:
            d = tiny_model_dirs("llama")
            out = tmp_path_factory.mktemp("gen") / "data"
            generate(load_generate_config(None, [
                f"teacher.path={d}", f"output.dir={out}", "teacher.dtype=float32", "generate.num_sequences=16",
                "generate.batch_size=8", "generate.max_len=24", "output.shard_size=8", *extra]))
            cache[extra] = (d, out)
        return cache[extra]
    return get
