"""`StatPruneConfig`: every choice a pruning run makes, validated on construction, JSON round-trip."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

CONFIG_NAME = "statprune_config.json"
SCHEMA_VERSION = 1

METHODS = ("magnitude", "wanda", "ria", "cvr", "statprune", "sparsegpt")
GROUPS = ("row", "layer")
WEIGHT_STAT_AXES = ("column", "row")
COMPENSATIONS = ("none", "ec", "ec-activation", "lsq", "bias")
ACTIVATION_STATS = ("variance", "second_moment")
SAFETY_SCOPES = ("layer", "block")
EC_STEPS = ("column", "row", "column,row", "row,column")
ACTIVATION_METHODS = ("wanda", "ria", "cvr", "statprune", "sparsegpt")

_PATTERN_RE = re.compile(r"^(\d+):(\d+)$")

# What a field left at None means: the method's preset first, then the general default. The "cvr"
# preset is the paper's formula as written; the "statprune" preset is what the protocol-A sweep chose
# (docs/results.md, benchmarks/sweep.py).
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "cvr": {},
    # protocol A, 50% unstructured: 50.74 against Wanda's 52.32 and SparseGPT's 49.96 (docs/results.md)
    "statprune": {
        "alpha": 0.5,
        "activation_stat": "second_moment",
        "activation_power": 1.0,
        "weight_stat_axis": "column",
        "compensation": "ec-activation",
        "safety_check": True,
        "safety_scope": "layer",
    },
}
GENERAL_DEFAULTS: dict[str, Any] = {
    "alpha": 1.0,
    "activation_stat": "variance",
    "activation_power": 0.5,
    "weight_stat_axis": "column",
    "compensation": "none",
    "compensation_shrink": 1.0,
    "safety_check": False,
    "safety_scope": "layer",
}
PRESET_FIELDS = tuple(GENERAL_DEFAULTS)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"StatPruneConfig.{name}={value!r} is not valid: {allowed}.")


@dataclass
class StatPruneConfig:
    """What to prune, how, and with which calibration.

    Fields left at ``None`` take the method's defaults (see ``resolved()``), so a saved config
    records what the user asked for and the manifest records what was actually run.
    """

    method: str = "statprune"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    group: str = "row"
    # CVR: S_ij = |W_ij| * A_j^(activation_power/2) * (sigma^2_W + eps)^(-alpha/2), A = Var(x) or E[x^2];
    # the paper's formula is A = Var(x), activation_power = 1/2. None: the method's preset.
    alpha: float | None = None
    eps: float = 1e-8
    weight_stat_axis: str | None = None
    activation_stat: str | None = None
    activation_power: float | None = None
    ria_power: float = 0.5
    compensation: str | None = None
    # a compensated weight is moved only this fraction of the way from the pruned one (1: fully)
    compensation_shrink: float | None = None
    safety_check: bool | None = None
    # judge a compensation by each linear's output error ("layer") or by the whole block's ("block")
    safety_scope: str | None = None
    ec_steps: str = "column,row"
    ec_centered: bool = True
    ec_clamp: tuple[float, float] = (1.0, 2.0)
    add_bias: bool = False
    sample_tokens: int = 2048
    # SparseGPT: OBS updates over column blocks, dampening relative to mean(diag(H))
    sparsegpt_blocksize: int = 128
    sparsegpt_damp: float = 0.01
    # OWL: per-block sparsity from the share of outlier Wanda scores (> owl_threshold x mean)
    owl: bool = False
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8
    sequential: bool = False
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.ec_clamp, list):
            self.ec_clamp = tuple(self.ec_clamp)
        if isinstance(self.ignore, str):
            self.ignore = [self.ignore]
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.method not in METHODS:
            _fail("method", self.method, f"choose one of {', '.join(METHODS)}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 < self.sparsity < 1:
            _fail("sparsity", self.sparsity, "use a fraction strictly between 0 and 1, e.g. 0.5")
        if self.pattern != "unstructured":
            m = _PATTERN_RE.match(str(self.pattern))
            if not m:
                _fail("pattern", self.pattern, "use 'unstructured' or 'N:M' such as '2:4'")
            n, mm = int(m.group(1)), int(m.group(2))
            if not 0 < n < mm:
                _fail("pattern", self.pattern, "N:M needs 0 < N < M (N weights kept in every group of M)")
        if self.group not in GROUPS:
            _fail("group", self.group, f"choose one of {', '.join(GROUPS)}")
        for name in ("alpha", "eps", "ria_power", "activation_power", "compensation_shrink"):
            v = getattr(self, name)
            if v is None and name in PRESET_FIELDS:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _fail(name, v, "use a finite real number")
        if self.alpha is not None and self.alpha < 0:
            _fail("alpha", self.alpha, "use a number >= 0")
        if self.activation_power is not None and self.activation_power < 0:
            _fail("activation_power", self.activation_power, "use a number >= 0 (1/2: the paper's Var(x)^(1/4))")
        if self.compensation_shrink is not None and not 0 < self.compensation_shrink <= 1:
            _fail("compensation_shrink", self.compensation_shrink, "use a fraction in (0, 1]; 1 applies the correction fully")
        if self.eps <= 0:
            _fail("eps", self.eps, "use a positive number such as 1e-8")
        if self.weight_stat_axis is not None and self.weight_stat_axis not in WEIGHT_STAT_AXES:
            _fail("weight_stat_axis", self.weight_stat_axis, f"choose one of {', '.join(WEIGHT_STAT_AXES)}")
        if self.activation_stat is not None and self.activation_stat not in ACTIVATION_STATS:
            _fail("activation_stat", self.activation_stat, f"choose one of {', '.join(ACTIVATION_STATS)}")
        if self.safety_scope is not None and self.safety_scope not in SAFETY_SCOPES:
            _fail("safety_scope", self.safety_scope, f"choose one of {', '.join(SAFETY_SCOPES)}")
        if self.compensation is not None and self.compensation not in COMPENSATIONS:
            _fail("compensation", self.compensation, f"choose one of {', '.join(COMPENSATIONS)}")
        if self.safety_check is not None and not isinstance(self.safety_check, bool):
            _fail("safety_check", self.safety_check, "use true or false")
        for name in ("ec_centered", "add_bias", "sequential"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "use true or false")
        if self.ec_steps not in EC_STEPS:
            _fail("ec_steps", self.ec_steps, f"choose one of {', '.join(EC_STEPS)}")
        if not (
            isinstance(self.ec_clamp, tuple)
            and len(self.ec_clamp) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.ec_clamp)
            and 0 < self.ec_clamp[0] <= self.ec_clamp[1]
        ):
            _fail("ec_clamp", self.ec_clamp, "use a pair (low, high) with 0 < low <= high, e.g. (1.0, 2.0)")
        if self.method == "sparsegpt" and self.compensation not in (None, "none"):
            _fail("compensation", self.compensation, "sparsegpt updates the surviving weights itself; use 'none'")
        if isinstance(self.sparsegpt_damp, bool) or not isinstance(self.sparsegpt_damp, (int, float)) or not 0 < self.sparsegpt_damp < 1:
            _fail("sparsegpt_damp", self.sparsegpt_damp, "use a fraction of mean(diag(H)) in (0, 1), e.g. 0.01")
        if not isinstance(self.owl, bool):
            _fail("owl", self.owl, "use true or false")
        if self.owl and self.pattern != "unstructured":
            _fail("owl", self.owl, "OWL allocates unstructured sparsity per block; use pattern='unstructured'")
        if isinstance(self.owl_threshold, bool) or not isinstance(self.owl_threshold, (int, float)) or not self.owl_threshold > 0:
            _fail("owl_threshold", self.owl_threshold, "use a positive multiple of the mean score, e.g. 5")
        limit = min(self.sparsity, 1 - self.sparsity) if self.owl else 1.0
        if isinstance(self.owl_lambda, bool) or not isinstance(self.owl_lambda, (int, float)) or not 0 <= self.owl_lambda < limit:
            _fail("owl_lambda", self.owl_lambda, "use a spread in [0, min(sparsity, 1 - sparsity)), e.g. 0.08")
        for name in ("sample_tokens", "nsamples", "seqlen", "batch_size", "sparsegpt_blocksize"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(name, v, "use a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            _fail("seed", self.seed, "use a non-negative integer")
        for name in ("targets", "ignore"):
            v = getattr(self, name)
            if v is None and name == "targets":
                continue
            if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
                _fail(name, v, "use a list of module-name patterns (regular expressions)")
            for p in v:
                try:
                    re.compile(p)
                except re.error as e:
                    _fail(name, p, f"not a valid regular expression ({e})")
        if isinstance(self.schema_version, bool) or self.schema_version != SCHEMA_VERSION:
            _fail("schema_version", self.schema_version, f"this version of optimum-statprune reads schema {SCHEMA_VERSION}")

    # ------------------------------------------------------------------ derived values
    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, else None."""
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def effective_sparsity(self) -> float:
        """The fraction pruned: ``sparsity`` for unstructured, ``1 - N/M`` for N:M."""
        nm = self.nm
        return self.sparsity if nm is None else 1.0 - nm[0] / nm[1]

    @property
    def needs_activations(self) -> bool:
        return self.method in ACTIVATION_METHODS or self.resolved_compensation() not in ("none", "ec")

    def resolve(self, name: str) -> Any:
        """A preset field's value as run: the user's, else the method's preset, else the general default."""
        value = getattr(self, name)
        if value is not None:
            return value
        return PRESET_DEFAULTS.get(self.method, {}).get(name, GENERAL_DEFAULTS[name])

    def resolved_compensation(self) -> str:
        return self.resolve("compensation")

    def resolved(self) -> dict[str, Any]:
        """The config as run: preset defaults filled in."""
        d = self.to_dict()
        d.update({name: self.resolve(name) for name in PRESET_FIELDS})
        return d

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ec_clamp"] = list(self.ec_clamp)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StatPruneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"StatPruneConfig has no field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}."
            )
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write ``statprune_config.json`` into ``save_directory`` (atomically)."""
        from .checkpoint.atomic import atomic_write_text

        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        atomic_write_text(path, self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> StatPruneConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}.")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
