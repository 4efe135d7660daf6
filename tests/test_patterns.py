"""The one pattern parser and sparsity rule (tensor_math/patterns.py), and that masks, SparseGPT, OWL and the
config all answer with it."""

from __future__ import annotations

import math

import pytest
import torch

from optimum_statprune import StatPruneConfig
from optimum_statprune.tensor_math.masks import make_mask, nm_mask
from optimum_statprune.tensor_math.owl import owl_sparsities
from optimum_statprune.tensor_math.patterns import (
    DEFAULT_SPARSITY,
    PatternError,
    SparsityError,
    check_nm_width,
    check_sparsity,
    parse_pattern,
    pattern_sparsity,
    resolve_sparsity,
    sparsity_problem,
)
from optimum_statprune.tensor_math.sparsegpt import sparsegpt_prune

BAD_PATTERNS = ["2-4", "2:4:8", "4:2", "2:2", "0:4", "structured", "", " 2:4", "2:4 ", "-1:4", "a:b", None, 24, "2.0:4"]


@pytest.mark.parametrize(("pattern", "expected"), [("unstructured", None), ("2:4", (2, 4)), ("4:8", (4, 8)),
                                                   ("1:100", (1, 100)), ("15:16", (15, 16))])
def test_parse_pattern(pattern, expected):
    assert parse_pattern(pattern) == expected


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_bad_patterns_get_one_error_everywhere(pattern):
    """The parser, the mask, SparseGPT and the config refuse the same patterns with the same error."""
    with pytest.raises(PatternError) as parsed:
        parse_pattern(pattern)
    assert isinstance(parsed.value, ValueError)
    scores = torch.rand(2, 8)
    with pytest.raises(PatternError, match=str(parsed.value).split(",")[0][:20]):
        make_mask(scores, 0.5, pattern)
    with pytest.raises(PatternError):
        sparsegpt_prune(scores, torch.eye(8), 0.5, pattern)
    with pytest.raises(ValueError, match=r"StatPruneConfig\.pattern=") as config_error:
        StatPruneConfig(pattern=pattern)
    assert str(parsed.value) in str(config_error.value)


def test_pattern_sparsity():
    assert pattern_sparsity("unstructured") is None
    assert pattern_sparsity("2:4") == 0.5
    assert pattern_sparsity("1:4") == 0.75
    assert math.isclose(pattern_sparsity("1:3"), 2 / 3)


def test_nm_width_rule_is_shared():
    check_nm_width(16, 2, 4)
    with pytest.raises(PatternError, match="multiple of 4; this layer has 6 inputs"):
        check_nm_width(6, 2, 4)
    with pytest.raises(PatternError, match="multiple of 4; this layer has 6 inputs"):
        nm_mask(torch.rand(2, 6), 2, 4)
    with pytest.raises(PatternError, match="multiple of 4; this layer has 6 inputs"):
        sparsegpt_prune(torch.rand(2, 6), torch.eye(6), 0.5, "2:4", blocksize=4)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_a_users_sparsity_lies_strictly_between_0_and_1(value):
    assert sparsity_problem(value) is not None
    with pytest.raises(SparsityError, match="strictly between 0 and 1"):
        check_sparsity(value)


def test_a_layers_sparsity_may_be_0_or_1():
    assert check_sparsity(0.0, closed=True) == 0.0 and check_sparsity(1, closed=True) == 1.0
    assert sparsity_problem(1.01, closed=True) == "a sparsity must lie in [0, 1] (a finite fraction pruned, e.g. 0.5)"
    # masks and SparseGPT check a layer's sparsity by this rule
    with pytest.raises(SparsityError, match=r"in \[0, 1\]"):
        make_mask(torch.rand(2, 8), 1.5)
    with pytest.raises(SparsityError, match=r"in \[0, 1\]"):
        sparsegpt_prune(torch.rand(2, 8), torch.eye(8), -0.5)
    # OWL's target by the same rule on its own range
    with pytest.raises(SparsityError, match=r"OWL target sparsity=0\.0005 is not valid: a sparsity must lie in \[0\.001, 0\.999\]"):
        owl_sparsities([0.1, 0.2], [3, 3], 0.0005, 0.0)


@pytest.mark.parametrize(
    ("sparsity", "pattern", "expected"),
    [(None, "unstructured", DEFAULT_SPARSITY), (0.3, "unstructured", 0.3), (None, "2:4", 0.5), (None, "1:4", 0.75),
     (DEFAULT_SPARSITY, "1:4", 0.75), (0.75, "1:4", 0.75), (0.5, "4:8", 0.5), (1 - 1 / 3, "1:3", 1 - 1 / 3)],
)
def test_resolve_sparsity(sparsity, pattern, expected):
    assert resolve_sparsity(sparsity, pattern) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(("sparsity", "pattern"), [(0.9, "2:4"), (0.6, "4:8"), (0.74, "1:4"), (0.25, "1:4")])
def test_a_sparsity_beside_nm_must_be_the_default_or_agree(sparsity, pattern):
    with pytest.raises(SparsityError, match="leave sparsity at its default or set it to"):
        resolve_sparsity(sparsity, pattern)
