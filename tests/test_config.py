"""StatPruneConfig: validation on construction (every field), derived values, JSON and directory round-trips."""

from __future__ import annotations

import json
import math
import os

import pytest

from optimum_statprune import StatPruneConfig
from optimum_statprune.config import CONFIG_NAME, SCHEMA_VERSION

NAN = float("nan")
INF = float("inf")

# (field, bad value). Every field of the dataclass has at least one entry (checked below).
BAD_VALUES = [
    ("sparsegpt_blocksize", 0),
    ("sparsegpt_blocksize", 1.5),
    ("sparsegpt_damp", 0),
    ("sparsegpt_damp", 1.0),
    ("sparsegpt_damp", True),
    ("sparsegpt_allocation", "greedy"),
    ("sparsegpt_allocation", None),
    ("sparsegpt_sweep", "fused"),
    ("sparsegpt_sweep", None),
    ("update", "sgd"),
    ("update", "ADMM"),
    ("update", 1),
    ("update_iters", 0),
    ("update_iters", 2.0),
    ("update_iters", None),
    ("update_damp", 0.0),
    ("update_damp", -0.1),
    ("update_damp", NAN),
    ("update_damp", True),
    ("update_rho", 0),
    ("update_rho", INF),
    ("update_rho", "1"),
    ("update_mask_steps", -1),
    ("update_mask_steps", 1.5),
    ("update_mask_steps", 21),  # more than update_iters
    ("update_tf32", "yes"),
    ("update_tf32", None),
    ("owl", "yes"),
    ("owl", 1),
    ("owl_threshold", 0),
    ("owl_threshold", -1.0),
    ("owl_lambda", -0.1),
    ("owl_lambda", 1.0),
    ("method", "sparse-gpt"),
    ("method", "Wanda"),
    ("method", ""),
    ("method", None),
    ("sparsity", 0),
    ("sparsity", 0.0),
    ("sparsity", 1),
    ("sparsity", 1.0),
    ("sparsity", -0.25),
    ("sparsity", 1.5),
    ("sparsity", NAN),
    ("sparsity", INF),
    ("sparsity", True),
    ("sparsity", "0.5"),
    ("sparsity", None),
    ("pattern", "4:2"),
    ("pattern", "2:2"),
    ("pattern", "0:4"),
    ("pattern", "2-4"),
    ("pattern", "2:4:8"),
    ("pattern", "structured"),
    ("pattern", ""),
    ("pattern", None),
    ("pattern", 24),
    ("group", "column"),
    ("group", "Row"),
    ("group", None),
    ("alpha", -1.0),
    ("alpha", -1e-9),
    ("alpha", NAN),
    ("alpha", INF),
    ("alpha", "1"),
    ("alpha", True),
    ("eps", 0),
    ("eps", 0.0),
    ("eps", -1e-8),
    ("eps", NAN),
    ("eps", INF),
    ("eps", "1e-8"),
    ("eps", False),
    ("ria_power", NAN),
    ("ria_power", -INF),
    ("ria_power", "0.5"),
    ("ria_power", None),
    ("ria_power", True),
    ("weight_stat_axis", "col"),
    ("weight_stat_axis", "layer"),
    ("activation_stat", "var"),
    ("activation_stat", "mean"),
    ("activation_stat", 0),
    ("activation_power", -0.5),
    ("activation_power", NAN),
    ("activation_power", "0.5"),
    ("activation_power", True),
    ("compensation_shrink", 0),
    ("compensation_shrink", 1.5),
    ("compensation_shrink", -0.1),
    ("compensation_shrink", NAN),
    ("compensation_shrink", "0.5"),
    ("safety_scope", "model"),
    ("safety_scope", ""),
    ("safety_scope", True),
    ("compensation", "EC"),
    ("compensation", "sparsegpt"),
    ("compensation", ""),
    ("compensation", 0),
    ("safety_check", "yes"),
    ("safety_check", "true"),
    ("safety_check", 1),
    ("safety_check", 0),
    ("ec_steps", "column, row"),
    ("ec_steps", "row,row"),
    ("ec_steps", "col"),
    ("ec_steps", ""),
    ("ec_steps", None),
    ("ec_centered", "yes"),
    ("ec_centered", 1),
    ("ec_centered", None),
    ("ec_clamp", (2.0, 1.0)),
    ("ec_clamp", (0.0, 2.0)),
    ("ec_clamp", (-1.0, 2.0)),
    ("ec_clamp", (1.0,)),
    ("ec_clamp", (1.0, 2.0, 3.0)),
    ("ec_clamp", (NAN, 2.0)),
    ("ec_clamp", (1.0, "2")),
    ("ec_clamp", (True, 2.0)),
    ("ec_clamp", "1,2"),
    ("ec_clamp", None),
    ("add_bias", "no"),
    ("add_bias", 0),
    ("add_bias", None),
    ("sample_tokens", 0),
    ("sample_tokens", -5),
    ("sample_tokens", 2048.0),
    ("sample_tokens", "2048"),
    ("sample_tokens", True),
    ("nsamples", 0),
    ("nsamples", -1),
    ("nsamples", 1.5),
    ("nsamples", None),
    ("seqlen", 0),
    ("seqlen", -2048),
    ("seqlen", 2048.0),
    ("seqlen", False),
    ("seed", -1),
    ("seed", 1.5),
    ("seed", "0"),
    ("seed", None),
    ("seed", True),
    ("batch_size", 0),
    ("batch_size", -8),
    ("batch_size", 8.0),
    ("batch_size", None),
    ("sequential", "yes"),
    ("sequential", 1),
    ("sequential", None),
    ("targets", ("q_proj",)),
    ("targets", {"q_proj": 1}),
    ("targets", [1]),
    ("targets", [""]),
    ("targets", 7),
    ("ignore", None),
    ("ignore", [None]),
    ("ignore", [""]),
    ("ignore", ("lm_head",)),
    ("ignore", 5),
    ("schema_version", 0),
    ("schema_version", SCHEMA_VERSION + 1),
    ("schema_version", "1"),
    ("schema_version", None),
    ("schema_version", True),
]


def _ids(case):
    return f"{case[0]}={case[1]!r}"


def test_every_field_has_bad_value_cases():
    from dataclasses import fields

    covered = {name for name, _ in BAD_VALUES}
    assert {f.name for f in fields(StatPruneConfig)} <= covered


@pytest.mark.parametrize("case", BAD_VALUES, ids=[_ids(c) for c in BAD_VALUES])
def test_bad_value_raises_naming_field_and_value(case):
    name, value = case
    with pytest.raises(ValueError) as info:
        StatPruneConfig(**{name: value})
    msg = str(info.value)
    assert name in msg
    assert repr(value) in msg
    # The message also says what is allowed, not only what is wrong.
    assert len(msg) > len(name) + len(repr(value)) + 20


@pytest.mark.parametrize(
    "name, value, bad",
    [
        ("targets", ["model\\.layers\\.(", "x"], "model\\.layers\\.("),
        ("ignore", ["lm_head", "["], "["),
        ("targets", "[", "["),
    ],
)
def test_invalid_regex_is_rejected_naming_field_and_pattern(name, value, bad):
    with pytest.raises(ValueError) as info:
        StatPruneConfig(**{name: value})
    msg = str(info.value)
    assert name in msg
    assert repr(bad) in msg
    assert "regular expression" in msg


def test_validate_rechecks_after_mutation():
    cfg = StatPruneConfig()
    cfg.sparsity = 2.0
    with pytest.raises(ValueError, match="sparsity"):
        cfg.validate()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"method": "wanda", "sparsity": 0.7, "group": "layer"},
        {"method": "magnitude", "pattern": "2:4"},
        {"method": "ria", "ria_power": 1.0, "pattern": "4:8"},
        {"method": "cvr", "alpha": 0.0, "eps": 1e-3, "weight_stat_axis": "row"},
        {"compensation": "ec", "ec_steps": "row,column", "ec_centered": False, "ec_clamp": (0.5, 4.0)},
        {"compensation": "bias", "add_bias": True, "safety_check": False},
        {"sparsity": 1e-6, "seed": 0, "sample_tokens": 1, "nsamples": 1, "seqlen": 1, "batch_size": 1},
        {"targets": ["q_proj", "re:.*mlp"], "ignore": ["lm_head"], "sequential": True},
        {"pattern": "1:100"},
    ],
)
def test_valid_configs_construct(kwargs):
    cfg = StatPruneConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(cfg, key) == value


def test_list_and_string_normalisation():
    cfg = StatPruneConfig(ec_clamp=[1.0, 3.0], ignore="lm_head", targets="mlp")
    assert cfg.ec_clamp == (1.0, 3.0)
    assert isinstance(cfg.ec_clamp, tuple)
    assert cfg.ignore == ["lm_head"]
    assert cfg.targets == ["mlp"]


def test_derived_values():
    assert StatPruneConfig().nm is None
    assert StatPruneConfig(sparsity=0.3).effective_sparsity == 0.3
    cfg = StatPruneConfig(pattern="2:4")
    assert cfg.nm == (2, 4)
    assert cfg.effective_sparsity == 0.5
    assert StatPruneConfig(pattern="4:8").nm == (4, 8)
    assert math.isclose(StatPruneConfig(pattern="1:3").effective_sparsity, 2 / 3)


def test_cvr_preset_is_the_papers_formula_and_user_values_win():
    cvr = StatPruneConfig(method="cvr")
    assert cvr.alpha is None and cvr.activation_power is None
    resolved = cvr.resolved()
    assert (resolved["alpha"], resolved["activation_stat"], resolved["activation_power"], resolved["weight_stat_axis"]) == (
        1.0, "variance", 0.5, "column")
    assert resolved["compensation"] == "none" and resolved["compensation_shrink"] == 1.0
    assert StatPruneConfig(method="cvr", alpha=0.25).resolve("alpha") == 0.25
    assert StatPruneConfig(method="wanda").resolve("safety_scope") == "layer"


def test_preset_resolution():
    cfg = StatPruneConfig()  # method="statprune", compensation/safety left at None
    assert cfg.compensation is None and cfg.safety_check is None
    assert cfg.resolved_compensation() == "ec-activation"
    assert cfg.resolve("safety_check") is True
    resolved = cfg.resolved()
    assert resolved["compensation"] == "ec-activation" and resolved["safety_check"] is True
    assert (resolved["alpha"], resolved["activation_stat"], resolved["activation_power"]) == (0.5, "second_moment", 1.0)
    # The saved dict records what the user asked for, not the preset.
    assert cfg.to_dict()["compensation"] is None

    explicit = StatPruneConfig(compensation="ec", safety_check=False)
    assert explicit.resolved_compensation() == "ec"
    assert explicit.resolve("safety_check") is False

    wanda = StatPruneConfig(method="wanda")
    assert wanda.resolved_compensation() == "none"
    assert wanda.resolve("safety_check") is False


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"method": "magnitude"}, False),
        ({"method": "magnitude", "compensation": "ec"}, False),
        ({"method": "magnitude", "compensation": "bias"}, True),
        ({"method": "magnitude", "compensation": "lsq"}, True),
        ({"method": "magnitude", "compensation": "ec-activation"}, True),
        ({"method": "wanda"}, True),
        ({"method": "ria"}, True),
        ({"method": "cvr"}, True),
        ({"method": "statprune"}, True),
    ],
)
def test_needs_activations(kwargs, expected):
    assert StatPruneConfig(**kwargs).needs_activations is expected


NON_DEFAULT = {
    "method": "cvr",
    "sparsity": 0.75,  # explicit, and equal to what 1:4 prunes
    "pattern": "1:4",
    "group": "layer",
    "alpha": 0.5,
    "eps": 1e-6,
    "weight_stat_axis": "row",
    "activation_stat": "second_moment",
    "activation_power": 1.0,
    "compensation_shrink": 0.5,
    "safety_scope": "block",
    "ria_power": 0.75,
    "compensation": "ec",
    "safety_check": True,
    "ec_steps": "row,column",
    "ec_centered": False,
    "ec_clamp": (0.5, 3.0),
    "add_bias": True,
    "sample_tokens": 512,
    "nsamples": 16,
    "seqlen": 256,
    "seed": 7,
    "batch_size": 2,
    "sequential": True,
    "targets": ["q_proj", "k_proj"],
    "ignore": ["layers\\.0\\."],
    "sparsegpt_blocksize": 64,
    "sparsegpt_damp": 0.05,
    "sparsegpt_allocation": "lookahead",
    "sparsegpt_sweep": "solve",
    "owl_threshold": 7.0,
    "owl_lambda": 0.2,
    "update_iters": 30,
    "update_damp": 0.05,
    "update_rho": 2.0,
    "update_mask_steps": 10,
    "update_tf32": False,
}
# OWL allocates unstructured sparsity, so it cannot be switched on beside NON_DEFAULT's 1:4 pattern.
OWL = {"method": "wanda", "owl": True, "owl_threshold": 3.0, "owl_lambda": 0.1}
# The weight update excludes a compensation, so it cannot be switched on beside NON_DEFAULT's "ec".
UPDATE = {"method": "ria", "update": "admm", "update_mask_steps": 5}


@pytest.mark.parametrize("kwargs", [{}, NON_DEFAULT, UPDATE], ids=["defaults", "non-defaults", "update"])
def test_dict_and_json_round_trip(kwargs):
    cfg = StatPruneConfig(**kwargs)
    d = cfg.to_dict()
    assert d["schema_version"] == SCHEMA_VERSION
    assert isinstance(d["ec_clamp"], list)
    assert StatPruneConfig.from_dict(d) == cfg

    text = cfg.to_json_string()
    loaded = json.loads(text)
    assert loaded == d
    again = StatPruneConfig.from_dict(loaded)
    assert again == cfg
    assert again.to_json_string() == text
    assert isinstance(again.ec_clamp, tuple)


def test_to_dict_is_a_copy():
    cfg = StatPruneConfig(ignore=["lm_head"])
    d = cfg.to_dict()
    d["ignore"].append("other")
    assert cfg.ignore == ["lm_head"]


def test_non_default_config_differs_in_every_field():
    from dataclasses import fields

    default, other = StatPruneConfig(), StatPruneConfig(**NON_DEFAULT)
    assert StatPruneConfig(**OWL).owl != default.owl
    assert StatPruneConfig(**UPDATE).update != default.update
    for f in fields(StatPruneConfig):
        if f.name not in ("schema_version", "owl", "update"):
            assert getattr(default, f.name) != getattr(other, f.name), f.name


@pytest.mark.parametrize("kwargs", [{}, NON_DEFAULT, OWL, UPDATE], ids=["defaults", "non-defaults", "owl", "update"])
def test_save_and_from_pretrained_round_trip(tmp_path, kwargs):
    cfg = StatPruneConfig(**kwargs)
    target = tmp_path / "nested" / "dir"  # created on demand
    path = cfg.save_pretrained(target)
    assert os.path.basename(path) == CONFIG_NAME == "statprune_config.json"
    assert os.path.isfile(target / CONFIG_NAME)
    assert sorted(os.listdir(target)) == [CONFIG_NAME]  # no temp files left behind
    on_disk = json.loads((target / CONFIG_NAME).read_text(encoding="utf-8"))
    assert on_disk == cfg.to_dict()
    assert on_disk["schema_version"] == SCHEMA_VERSION
    assert StatPruneConfig.from_pretrained(target) == cfg
    assert StatPruneConfig.from_pretrained(str(target)) == cfg


def test_save_pretrained_overwrites(tmp_path):
    StatPruneConfig(sparsity=0.3).save_pretrained(tmp_path)
    StatPruneConfig(sparsity=0.7).save_pretrained(tmp_path)
    assert StatPruneConfig.from_pretrained(tmp_path).sparsity == 0.7
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME]


def test_from_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        StatPruneConfig.from_pretrained(tmp_path)


def test_from_dict_rejects_unknown_keys():
    d = StatPruneConfig().to_dict()
    d["sparsity_ratio"] = 0.5
    d["zzz_extra"] = 1
    with pytest.raises(ValueError) as info:
        StatPruneConfig.from_dict(d)
    msg = str(info.value)
    assert "sparsity_ratio" in msg and "zzz_extra" in msg


def test_from_dict_validates_values():
    d = StatPruneConfig().to_dict()
    d["pattern"] = "3:2"
    with pytest.raises(ValueError, match="pattern"):
        StatPruneConfig.from_dict(d)


def test_from_dict_partial_uses_defaults():
    cfg = StatPruneConfig.from_dict({"method": "wanda"})
    assert cfg == StatPruneConfig(method="wanda")


def test_from_pretrained_rejects_unknown_key_and_other_schema(tmp_path):
    d = StatPruneConfig().to_dict()
    d["unknown_field"] = True
    (tmp_path / CONFIG_NAME).write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown_field"):
        StatPruneConfig.from_pretrained(tmp_path)

    d = StatPruneConfig().to_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(ValueError, match="schema_version"):
        StatPruneConfig.from_pretrained(tmp_path)


def test_cross_field_rules():
    with pytest.raises(ValueError, match="compensation"):
        StatPruneConfig(method="sparsegpt", compensation="lsq")
    with pytest.raises(ValueError, match="owl"):
        StatPruneConfig(method="wanda", owl=True, pattern="2:4")
    with pytest.raises(ValueError, match="owl_lambda"):
        StatPruneConfig(method="wanda", owl=True, sparsity=0.1, owl_lambda=0.2)
    assert StatPruneConfig(sparsity=0.05).owl_lambda == 0.08  # only checked against sparsity when OWL is on


# ---------------------------------------------------------------------------------- sparsity and N:M
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, 0.5),
        ({"sparsity": 0.7}, 0.7),
        ({"pattern": "2:4"}, 0.5),
        ({"pattern": "4:8"}, 0.5),
        ({"pattern": "1:4"}, 0.75),  # the default sparsity beside N:M stands for "not set"
        ({"pattern": "2:8"}, 0.75),
        ({"pattern": "1:4", "sparsity": 0.75}, 0.75),
        ({"pattern": "2:4", "sparsity": 0.5}, 0.5),
        ({"pattern": "1:3", "sparsity": 1 - 1 / 3}, 1 - 1 / 3),
    ],
)
def test_sparsity_is_the_users_or_the_patterns(kwargs, expected):
    cfg = StatPruneConfig(**kwargs)
    assert cfg.effective_sparsity == pytest.approx(expected, abs=1e-12)
    # the manifest (resolved) records what runs; the saved config what the user asked for
    assert cfg.resolved()["sparsity"] == pytest.approx(expected, abs=1e-12)
    assert cfg.to_dict()["sparsity"] == kwargs.get("sparsity", 0.5)
    assert StatPruneConfig.from_dict(json.loads(cfg.to_json_string())) == cfg


@pytest.mark.parametrize(("pattern", "sparsity"), [("2:4", 0.9), ("4:8", 0.6), ("1:4", 0.7), ("2:4", 0.25)])
def test_explicit_sparsity_that_contradicts_the_pattern_is_refused(pattern, sparsity):
    """An N:M pattern prunes exactly 1 - N/M; a different sparsity set beside it would be recorded but not
    run (the old behaviour: 2:4 with 0.9 pruned 50% and the manifest said 90%)."""
    with pytest.raises(ValueError) as info:
        StatPruneConfig(pattern=pattern, sparsity=sparsity)
    msg = str(info.value)
    n, m = (int(v) for v in pattern.split(":"))
    assert f"StatPruneConfig.sparsity={sparsity!r}" in msg and pattern in msg
    assert f"{1 - n / m:g}" in msg and "leave sparsity at its default" in msg


def test_a_resolved_config_reloads():
    """What the manifest records (resolved) is itself a valid config, e.g. for the model card's command."""
    for kwargs in ({"pattern": "1:4"}, {"pattern": "2:4"}, {"sparsity": 0.3}):
        resolved = StatPruneConfig(**kwargs).resolved()
        assert StatPruneConfig.from_dict(resolved).effective_sparsity == resolved["sparsity"]


def test_owl_lambda_is_bounded_by_the_resolved_sparsity():
    assert StatPruneConfig(method="wanda", owl=True, owl_lambda=0.45).effective_sparsity == 0.5
    with pytest.raises(ValueError, match="owl_lambda"):
        StatPruneConfig(method="wanda", owl=True, sparsity=0.2, owl_lambda=0.25)


# ---------------------------------------------------------------------------------- methods and registry
def test_method_list_and_presets_come_from_the_registry():
    from optimum_statprune import config as config_module
    from optimum_statprune.methods import get_method, method_names

    assert config_module.METHODS == method_names() == (
        "magnitude", "wanda", "ria", "cvr", "statprune", "sparsegpt", "quality")
    assert config_module.PRESET_DEFAULTS["statprune"] == dict(get_method("statprune").preset)
    assert config_module.PRESET_DEFAULTS["quality"] == {"update": "admm", "update_mask_steps": 15}
    assert config_module.PRESET_DEFAULTS["cvr"] == {}
    with pytest.raises(ValueError, match="choose one of magnitude, wanda, ria, cvr, statprune, sparsegpt, quality"):
        StatPruneConfig(method="obs")


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"method": "magnitude"}, set()),
        ({"method": "magnitude", "compensation": "ec"}, set()),
        # the safety check judges on a token subsample, which comes with the channel statistics
        ({"method": "magnitude", "compensation": "ec", "safety_check": True}, {"channel"}),
        ({"method": "magnitude", "compensation": "bias"}, {"channel"}),
        ({"method": "wanda"}, {"channel"}),
        ({"method": "statprune"}, {"channel"}),
        ({"method": "sparsegpt"}, {"hessian"}),
        # the weight update reads X^T X; a preset's compensation gives way to it
        ({"method": "magnitude", "update": "admm"}, {"hessian"}),
        ({"method": "statprune", "update": "admm"}, {"channel", "hessian"}),
        ({"method": "quality"}, {"channel", "hessian"}),
    ],
)
def test_statistics_are_the_methods_and_the_compensations(kwargs, expected):
    cfg = StatPruneConfig(**kwargs)
    assert cfg.statistics == expected
    assert cfg.needs_activations is bool(expected)


def test_method_fields_are_checked_whichever_method_runs():
    """A bad value of one method's field is refused even when another method is chosen (compare runs
    one config under several methods), by that method's own check."""
    with pytest.raises(ValueError, match="sparsegpt_damp"):
        StatPruneConfig(method="wanda", sparsegpt_damp=2.0)
    with pytest.raises(ValueError, match="alpha"):
        StatPruneConfig(method="sparsegpt", alpha=-1.0)


def test_sparsegpt_rules_hold_only_when_sparsegpt_runs():
    with pytest.raises(ValueError, match="sparsegpt updates the surviving weights itself"):
        StatPruneConfig(method="sparsegpt", compensation="ec")
    assert StatPruneConfig(method="wanda", compensation="ec").compensation == "ec"
    # an N:M group must not straddle two column blocks: refused before any calibration, not mid-run
    with pytest.raises(ValueError, match="sparsegpt_blocksize=6 is not valid: with pattern 2:4 use a multiple of 4"):
        StatPruneConfig(method="sparsegpt", pattern="2:4", sparsegpt_blocksize=6)
    assert StatPruneConfig(method="wanda", pattern="2:4", sparsegpt_blocksize=6).sparsegpt_blocksize == 6
    cfg = StatPruneConfig(method="sparsegpt", sparsegpt_allocation="lookahead", sparsegpt_sweep="solve")
    assert (cfg.sparsegpt_allocation, cfg.sparsegpt_sweep) == ("lookahead", "solve")
    assert StatPruneConfig().resolved()["sparsegpt_allocation"] == "even"


def test_importing_the_config_does_not_import_torch():
    """optimum-cli imports the package on every start; the config and the method declarations stay light."""
    import subprocess
    import sys

    code = "import sys, optimum_statprune; optimum_statprune.StatPruneConfig(method='sparsegpt'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
