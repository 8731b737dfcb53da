"""Each initialiser's empirical variance matches its formula."""

import math

import jax
import numpy as np
import pytest

from configs.common import model_config
from model.transformer import Model, resolve


def truncated_normal_variance(std, bound=2.0):
    """Variance of N(0, std^2) truncated to [-bound*std, bound*std]."""
    pdf = math.exp(-bound**2 / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(bound / math.sqrt(2))
    return std**2 * (1 - 2 * bound * pdf / mass)


def expected_variance(init, fan_in, fan_out, std=0.02):
    return {
        "truncated_normal": truncated_normal_variance(std),
        "xavier": 2.0 / (fan_in + fan_out),
        "he": 2.0 / fan_in,
    }[init]


@pytest.mark.parametrize("init", ["truncated_normal", "xavier", "he"])
def test_kernel_variance_matches_formula(init):
    cfg = resolve(model_config("small", init=init, vocab_size=512, max_len=8,
                               heads=("classify",)))
    params = Model(cfg).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    block = params["encoder"]["block_0"]
    hidden, mlp = cfg.hidden, cfg.mlp_dim
    kernels = {  # name: (array, fan_in, fan_out)
        "query": (block["attention"]["query"]["kernel"], hidden, hidden),
        "out": (block["attention"]["out"]["kernel"], hidden, hidden),
        "wi": (block["mlp"]["wi"]["kernel"], hidden, mlp),
        "wo": (block["mlp"]["wo"]["kernel"], mlp, hidden),
    }
    for name, (kernel, fan_in, fan_out) in kernels.items():
        values = np.asarray(kernel.value if hasattr(kernel, "value") else kernel).ravel()
        want = expected_variance(init, fan_in, fan_out)
        # Standard error of a sample variance is ~ var * sqrt(2 / n): allow 5 of them.
        tolerance = 5 * want * math.sqrt(2 / values.size)
        assert abs(values.var() - want) < tolerance, (name, values.var(), want)
        assert abs(values.mean()) < 5 * math.sqrt(want / values.size), name
    if init == "truncated_normal":
        query = np.asarray(kernels["query"][0].value)
        assert np.abs(query).max() <= 2 * 0.02 + 1e-7  # Truncated at two std.
    assert np.all(np.asarray(block["mlp"]["wi"]["bias"].value) == 0)


def test_unknown_initializer_names_the_key():
    with pytest.raises(ValueError, match="config.model.init"):
        resolve(model_config("tiny", init="orthogonal"))
