import atexit
import os
import shutil
import sys
from pathlib import Path

import pytest

# Tests never touch the network: hub lookups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Run store and calibration cache of the tests live in a throw-away folder, never in ~/.cache.
os.environ["MOEVIZ_DATA_DIR"] = __import__("tempfile").mkdtemp(prefix="moeviz-test-data-")
atexit.register(shutil.rmtree, os.environ["MOEVIZ_DATA_DIR"], True)
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, save_tiny_model  # noqa: E402

from moeviz import runtime_config  # noqa: E402

# The suite runs as the app and the CLI do (moeviz.runtime_config: plain reads, fixed mmap threshold).
runtime_config.configure()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """family -> folder of a saved tiny random model (built once per test session)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: save_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def demo_model():
    """The bundled demo MoE (sample_data/demo-moe) through moeviz.load_model, once per session (read-only:
    compression works on structural copies, and tests check the base is never touched)."""
    from moeviz.models import load_model

    return load_model()


@pytest.fixture(autouse=True, scope="module")
def restore_torch_threads():
    """A module that changes torch's thread count (benchmark-like tests, one-thread fixtures) gets it back
    at its end, so the next module runs with the count the session started with."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def loaded_tiny(tiny_model_dirs):
    """family -> LoadedModel, loaded through moeviz.load_model (cached for the session; read-only)."""
    from moeviz.models import load_model

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_model(tiny_model_dirs[family])
        return cache[family]

    return get


@pytest.fixture(scope="session")
def loaded_family(tmp_path_factory):
    """model_type -> LoadedModel of a tiny model of any MoE family of the installed transformers
    (tests/family_configs.py), saved and loaded through moeviz.load_model (cached; read-only)."""
    from family_configs import build_tiny
    from tiny_models import tiny_tokenizer

    from moeviz.models import load_model

    cache = {}

    def get(model_type):
        if model_type not in cache:
            folder = tmp_path_factory.mktemp(model_type)
            model = build_tiny(model_type)
            model.save_pretrained(folder, safe_serialization=True)
            tiny_tokenizer(model.config.get_text_config().vocab_size).save_pretrained(folder)
            cache[model_type] = load_model(folder)
        return cache[model_type]

    return get
