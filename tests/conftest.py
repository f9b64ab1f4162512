import os
import sys

import numpy as np
import pytest

# Tests never read the user's ~/.keras or tuning logs, nor write the user's kernel cache; Keras (the oracle) runs on JAX.
_session_home = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tvmconv-tests-{os.getpid()}")
os.environ["KERAS_HOME"] = os.path.join(_session_home, "keras")
os.environ["TVMCONV_CACHE_DIR"] = os.path.join(_session_home, "cache")
os.environ["TVMCONV_TUNING_LOGS"] = os.path.join(_session_home, "tuning_logs")
os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def keras():
    keras = pytest.importorskip("keras", reason="Keras 3 is a test extra: pip install .[test]")
    return keras
