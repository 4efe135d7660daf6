"""Model card and push / download against a fake Hub served on 127.0.0.1 (see fake_hub.py)."""

from __future__ import annotations

import ast
import json
import logging
import shutil
import socket
from pathlib import Path

import pytest
import torch
from fake_hub import READ_ONLY_TOKEN, USER, VALID_TOKEN, fake_hub_session
from manifest_v2 import as_schema_2, flip_byte
from tiny_models import build, tiny_tokenizer, token_ids

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.sharing.hub import (
    CARD_MARKER,
    HubError,
    download,
    layer_type,
    model_card,
    push_to_hub,
    sparsity_by_type,
    write_model_card,
)
from optimum_statprune.sharing.manifest import MANIFEST_NAME, read_manifest, write_manifest
from optimum_statprune.sharing.transport import is_hub_id, redact
from optimum_statprune.sharing.verify import load_manifest, verify

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPO = f"{USER}/tiny-llama-2of4"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny Llama pruned 2:4 with Wanda, saved once per module; returns (folder, model)."""
    model = build("llama")
    model.config._name_or_path = BASE  # what from_pretrained(BASE) would have recorded
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(method="wanda", pattern="2:4"),
                                        tokenizer=tiny_tokenizer(), device="cpu")
    pruner.prune(token_ids(), progress=False)
    folder = tmp_path_factory.mktemp("pruned") / "tiny-llama"
    pruner.save_pretrained(folder)
    return folder, model, pruner


@pytest.fixture
def folder(pruned, tmp_path):
    """A private copy of the saved model (push writes README.md into it)."""
    return shutil.copytree(pruned[0], tmp_path / "model")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with fake_hub_session(monkeypatch, tmp_path) as running:
        yield running


@pytest.fixture(params=["pipeline", "single-commit"])
def upload_path(request, monkeypatch):
    """huggingface_hub uploads through its Xet pipeline when hf_xet is installed, else in one commit."""
    if request.param == "single-commit":
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return request.param


def _closed_port() -> int:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------------------- card
def test_layer_types():
    assert layer_type("model.layers.3.self_attn.q_proj") == "q_proj"
    assert layer_type("model.layers.1.mlp.experts.5.down_proj") == "experts.down_proj"
    assert layer_type("model.layers.1.mlp.shared_expert.up_proj") == "shared_expert.up_proj"
    assert layer_type("transformer.h.0.attn.c_attn") == "c_attn"


def test_model_card_without_push(folder):
    card = model_card(folder)
    assert card.data.base_model == BASE
    assert card.data.library_name == "transformers"
    for tag in ("pruned", "sparse", "optimum-statprune", "2:4-sparsity", "wanda"):
        assert tag in card.data.tags
    text = str(card)
    manifest = read_manifest(folder)
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "**total**"):
        assert kind in text
    assert "| **total** | 14 |" in text and "50.00%" in text
    assert manifest["calibration"]["sha256"] in text
    assert f"optimum-statprune prune --model {BASE} --calibration CALIBRATION --method wanda" in text
    assert "--pattern 2:4" in text and "--nsamples 128" in text
    assert "## Evaluation" not in text
    rows = sparsity_by_type(manifest)
    assert rows["q_proj"]["layers"] == 2 and rows["total"]["sparsity"] == pytest.approx(0.5)


def test_the_cards_command_line_rebuilds_the_same_config(folder):
    """The "Reproduce" command parses with the real CLI and gives the manifest's configuration."""
    import shlex

    from optimum_statprune import cli
    from optimum_statprune.cli import config_flags

    text = str(model_card(folder))
    line = next(x for x in text.splitlines() if x.startswith("optimum-statprune prune "))
    args = cli.build_parser().parse_args(shlex.split(line)[1:])
    assert args.model == BASE and args.output == "pruned-model"
    assert config_flags.build_config(args).resolved() == read_manifest(folder)["config"]


def test_model_card_shows_evaluation_and_skips_local_paths(folder):
    manifest = read_manifest(folder)
    manifest["evaluation"] = {"perplexity": {"dataset": "wikitext2", "dense": 22.46, "pruned": 52.27}}
    manifest["model"]["name_or_path"] = str(folder)  # a local path is not a Hub id
    write_manifest(folder, manifest)
    config = json.loads((folder / "config.json").read_text())
    config["pruning_config"]["base_model"] = None
    (folder / "config.json").write_text(json.dumps(config))
    card = model_card(folder)
    assert card.data.base_model is None
    assert "## Evaluation" in str(card) and "| perplexity.pruned | 52.27 |" in str(card)


# ------------------------------------------------------------------------------------------- push / pull
def test_push_download_and_load_round_trip(hub, folder, pruned, upload_path):
    from huggingface_hub import HfApi, snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = push_to_hub(folder, REPO, token=VALID_TOKEN)
    assert info.oid in str(info) and REPO in str(info)
    remote = hub.files(REPO)
    local = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local
    assert "README.md" in local and MANIFEST_NAME in local

    snapshot = snapshot_download(REPO)
    for name, data in local.items():
        assert (folder / name).read_bytes() == data
        assert Path(snapshot, name).read_bytes() == data
    assert load_manifest(REPO) == read_manifest(folder)

    card = HfApi().model_info(REPO).card_data
    assert card.base_model == BASE and {"pruned", "sparse", "2:4-sparsity"} <= set(card.tags)

    loaded = AutoModelForCausalLM.from_pretrained(REPO)
    ids = token_ids(2, 12, seed=1)
    assert torch.equal(_logits(loaded, ids), _logits(pruned[1], ids))
    assert AutoTokenizer.from_pretrained(REPO)("a b c")["input_ids"] == [3, 4, 5]
    assert not hub.unhandled, hub.unhandled


def test_repush_replaces_stale_shards_and_skips_unchanged_files(hub, tmp_path, pruned):
    from transformers import AutoModelForCausalLM

    folder = shutil.copytree(pruned[0], tmp_path / "one-shard")
    push_to_hub(folder, REPO, token=VALID_TOKEN)
    assert "model.safetensors" in hub.files(REPO)

    sharded = tmp_path / "sharded"
    pruned[2].save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    push_to_hub(sharded, REPO, token=VALID_TOKEN)
    remote = hub.files(REPO)
    assert "model.safetensors" not in remote and "model.safetensors.index.json" in remote
    assert sorted(p for p in remote if p.endswith(".safetensors")) == sorted(p.name for p in sharded.glob("*.safetensors"))

    commits = len(hub.repos[REPO].commits)
    again = push_to_hub(sharded, REPO, token=VALID_TOKEN)
    assert len(hub.repos[REPO].commits) == commits  # nothing changed, nothing committed
    assert again.oid == hub.repos[REPO].head.oid
    ids = token_ids(2, 12, seed=2)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(REPO), ids), _logits(pruned[1], ids))


def test_private_repo_needs_the_token_to_download(hub, folder):
    push_to_hub(folder, REPO, token=VALID_TOKEN, private=True)
    assert hub.repos[REPO].private
    with pytest.raises(HubError, match="not found.*private"):
        download(REPO)
    assert (download(REPO, token=VALID_TOKEN) or "").endswith(hub.repos[REPO].head.oid)


# ------------------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("token", ["hf_not_a_real_token", None])
def test_bad_or_missing_token_is_a_clear_error(hub, folder, token):
    with pytest.raises(HubError) as err:
        push_to_hub(folder, REPO, token=token)
    message = str(err.value)
    assert "authentication failed" in message and "huggingface-cli login" in message and "HF_TOKEN" in message
    assert "\n" not in message
    assert isinstance(err.value, RuntimeError)
    assert REPO not in hub.repos


def test_read_only_token_is_a_clear_error(hub, folder):
    with pytest.raises(HubError, match=f"no write access to '{USER}'"):
        push_to_hub(folder, REPO, token=READ_ONLY_TOKEN)


def test_someone_elses_namespace_is_forbidden(hub, folder):
    with pytest.raises(HubError, match="no write access to 'someone-else'"):
        push_to_hub(folder, "someone-else/model", token=VALID_TOKEN)


def test_missing_repo_on_download_is_a_clear_error(hub):
    with pytest.raises(HubError, match=f"repository {USER}/missing not found on http://127.0.0.1") as err:
        download(f"{USER}/missing")
    assert "\n" not in str(err.value)
    with pytest.raises(HubError, match="not found"):
        load_manifest(f"{USER}/missing")


def test_missing_revision_is_a_clear_error(hub, folder):
    push_to_hub(folder, REPO, token=VALID_TOKEN)
    with pytest.raises(HubError, match="revision 'v2' does not exist"):
        download(REPO, revision="v2")


def test_transient_503_on_the_first_commit_is_retried(hub, folder, upload_path):
    hub.fail_next("POST", r"/commit/main$", status=503)
    info = push_to_hub(folder, REPO, token=VALID_TOKEN, retry_wait=0.01)
    assert [status for _, _, status in hub.calls("POST", r"/commit/")] == [503, 200]
    assert info.oid == hub.repos[REPO].head.oid
    assert hub.files(REPO)[MANIFEST_NAME] == (folder / MANIFEST_NAME).read_bytes()


def test_transient_error_on_download_is_retried(hub, folder):
    push_to_hub(folder, REPO, token=VALID_TOKEN)
    hub.fail_next("GET", rf"^/api/models/{REPO}/revision/main$", status=503)
    snapshot = download(REPO)
    assert Path(snapshot, MANIFEST_NAME).read_bytes() == (folder / MANIFEST_NAME).read_bytes()
    assert [s for _, _, s in hub.calls("GET", r"/revision/main$")] == [503, 200]


def test_transient_errors_that_persist_give_up_with_a_clear_error(hub, folder):
    hub.fail_next("POST", r"^/api/repos/create$", status=502, times=10)
    with pytest.raises(HubError, match=r"kept answering HTTP 502 \(3 attempts\); try again later"):
        push_to_hub(folder, REPO, token=VALID_TOKEN, max_retries=2, retry_wait=0.01)
    assert len(hub.calls("POST", r"^/api/repos/create$")) == 3


def test_unreachable_endpoint_is_retried_then_reported(hub, folder):
    with pytest.raises(HubError, match=r"could not be reached \(.*, 2 attempts\)"):
        push_to_hub(folder, REPO, token=VALID_TOKEN, endpoint=f"http://127.0.0.1:{_closed_port()}", max_retries=1,
                    retry_wait=0.01)


def test_only_pruned_folders_are_pushed(hub, tmp_path, folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HubError, match="save_pretrained"):
        push_to_hub(tmp_path / "empty", REPO, token=VALID_TOKEN)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["layers"][0]["sha256"] = "0" * 64
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(HubError, match="does not match its manifest"):
        push_to_hub(folder, REPO, token=VALID_TOKEN)
    assert not hub.requests  # refused before any request


def test_tests_cannot_reach_the_internet(hub):
    from huggingface_hub import HfApi

    with pytest.raises(RuntimeError, match="only the loopback fake hub"):
        HfApi(endpoint="https://huggingface.co").model_info("gpt2")


def test_cli_push_and_verify(folder, hub, capsys):
    from optimum_statprune import cli

    assert cli.main(["verify", str(folder)]) == 0
    assert capsys.readouterr().out.startswith("OK:")
    assert cli.main(["push", str(folder), f"{USER}/cli-pushed", "--token", VALID_TOKEN]) == 0
    assert f"pushed {folder} to {USER}/cli-pushed" in capsys.readouterr().out
    assert load_manifest(f"{USER}/cli-pushed") == read_manifest(folder)
    assert cli.main(["verify", f"{USER}/cli-pushed"]) == 0
    capsys.readouterr()
    assert cli.main(["push", str(folder), f"{USER}/other", "--token", "not-a-token"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "login" in err and "Traceback" not in err
    assert cli.main(["push", str(folder / "missing"), f"{USER}/other"]) == 2


def test_cli_reads_the_token_from_a_file(folder, hub, tmp_path, capsys):
    """--token-file keeps the token out of the process list: push and verify a private repo with it."""
    from optimum_statprune import cli

    token_file = tmp_path / "token"
    token_file.write_text(VALID_TOKEN + "\n")
    repo = f"{USER}/cli-private"
    assert cli.main(["push", str(folder), repo, "--private", "--token-file", str(token_file)]) == 0
    assert repo in hub.repos
    assert cli.main(["verify", repo, "--token-file", str(token_file)]) == 0
    capsys.readouterr()
    assert cli.main(["push", str(folder), repo, "--token-file", str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and VALID_TOKEN not in err


def test_cli_verify_fails_on_a_revived_weight(folder, capsys):
    from safetensors.torch import load_file, save_file

    from optimum_statprune import cli

    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][tensors[key] == 0] = 1.0
    save_file(tensors, shard, metadata={"format": "pt"})
    assert cli.main(["verify", str(folder)]) == 1
    assert capsys.readouterr().out.startswith("FAILED")


# ------------------------------------------------------------------------------------------- retries
def test_a_transient_429_on_create_is_retried(hub, folder):
    hub.fail_next("POST", r"^/api/repos/create$", status=429)
    push_to_hub(folder, REPO, token=VALID_TOKEN, retry_wait=0.01)
    assert [s for _, _, s in hub.calls("POST", r"^/api/repos/create$")] == [429, 200]


def test_permanent_errors_are_not_retried(hub, folder):
    with pytest.raises(HubError, match="authentication failed"):
        push_to_hub(folder, REPO, token="hf_not_a_real_token", retry_wait=0.01)
    assert len(hub.calls("POST", r"^/api/repos/create$")) == 1
    hub.fail_next("GET", rf"^/api/models/{USER}/missing/revision/main$", status=404)
    with pytest.raises(HubError, match="not found"):
        download(f"{USER}/missing", retry_wait=0.01)
    assert len(hub.calls("GET", rf"^/api/models/{USER}/missing/revision/main$")) == 1


def _imports(module_path: Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(module_path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.append(("." * node.level + (node.module or ""), [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_no_module_imports_httpx2_or_another_modules_private_names():
    """The transport goes through huggingface_hub (httpx2 is its dependency, not ours), and modules
    share only public names (verify used to import hub's _call and _default_endpoint)."""
    import optimum_statprune

    root = Path(optimum_statprune.__file__).parent
    for path in [*(root / "sharing").glob("*.py"), root / "flags.py"]:
        for module, names in _imports(path):
            assert module.split(".")[0] != "httpx2", f"{path} imports {module}"
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{path} imports {private} from {module}"


# ------------------------------------------------------------------------------------------- schema 2
def test_push_verifies_every_tensor_of_a_schema_2_folder(hub, folder):
    as_schema_2(folder)
    flip_byte(folder, "model.norm.weight")
    with pytest.raises(HubError, match="does not match its manifest.*1 sha256"):
        push_to_hub(folder, REPO, token=VALID_TOKEN)
    assert not hub.requests
    flip_byte(folder, "model.norm.weight")  # back as it was
    push_to_hub(folder, REPO, token=VALID_TOKEN)
    report = verify(REPO)
    assert report.ok and report.schema == 2, str(report)


# ------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name, ok", [
    ("gpt2", True), ("tester/model", True), ("Org-1/model_v2.5", True),
    ("a/b/c", False), ("../model", False), ("./model", False), ("org--x/model", False), ("org/mo..del", False),
    ("org/-model", False), ("", False), (None, False), ("org/" + "x" * 97, False), ("org/mödel", False),
    ("org/with space", False), ("~/models/x", False),
])
def test_one_hub_id_rule(name, ok):
    assert is_hub_id(name) is ok


def test_push_refuses_a_bad_repo_id_before_any_request(hub, folder):
    with pytest.raises(HubError, match="not a Hub repository id"):
        push_to_hub(folder, "a/b/c", token=VALID_TOKEN)
    assert not hub.requests


# ------------------------------------------------------------------------------------------- privacy
def test_redact():
    assert redact("see http://u:p@h:1/x and https://tok@host/y") == "see http://***@h:1/x and https://***@host/y"
    assert redact("Authorization: Bearer hf_abcdefghijkl") == "Authorization: Bearer hf_***"
    assert redact("the token xyz12345 leaked", ["xyz12345", None]) == "the token *** leaked"


def test_endpoint_credentials_never_appear(hub, folder, caplog):
    caplog.set_level(logging.DEBUG)
    with_credentials = hub.url.replace("http://", "http://alice:s3cr3t-pw@")
    with pytest.raises(HubError) as err:
        push_to_hub(folder, REPO, token=VALID_TOKEN, endpoint=with_credentials, max_retries=1, retry_wait=0.01)
    assert "http://***@127.0.0.1" in str(err.value)
    unreachable = f"http://alice:s3cr3t-pw@127.0.0.1:{_closed_port()}"
    with pytest.raises(HubError, match="could not be reached") as err2:
        push_to_hub(folder, REPO, token=VALID_TOKEN, endpoint=unreachable, max_retries=1, retry_wait=0.01)
    for text in (str(err.value), str(err2.value), caplog.text):
        assert "s3cr3t-pw" not in text
    assert "retry 1/1" in caplog.text  # the retry was logged, redacted


def test_token_from_a_file_or_hf_token(hub, folder, tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {VALID_TOKEN}\n")
    push_to_hub(folder, REPO, token_file=token_file, private=True)
    assert download(REPO, token_file=token_file).endswith(hub.repos[REPO].head.oid)
    assert verify(REPO, token_file=token_file).ok
    assert load_manifest(REPO, token_file=token_file) == read_manifest(folder)
    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    push_to_hub(folder, f"{USER}/from-env")
    assert f"{USER}/from-env" in hub.repos


def test_bad_token_files_are_clear_errors(tmp_path, folder):
    with pytest.raises(HubError, match="does not exist"):
        push_to_hub(folder, REPO, token_file=tmp_path / "nope")
    two = tmp_path / "two"
    two.write_text("hf_secretpart1 hf_secretpart2\n")
    with pytest.raises(HubError, match="exactly one token") as err:
        push_to_hub(folder, REPO, token_file=two)
    assert "secretpart" not in str(err.value)
    with pytest.raises(HubError, match="not both"):
        download(REPO, token="hf_x", token_file=two)


def test_a_token_never_appears_in_messages_or_logs(hub, folder, tmp_path, caplog):
    secret = "hf_thisTokenIsNotValid0123456789"
    (tmp_path / "token").write_text(secret)
    caplog.set_level(logging.DEBUG)
    failing = [
        lambda: push_to_hub(folder, REPO, token_file=tmp_path / "token"),
        lambda: download(f"{USER}/missing", token=secret),
        lambda: verify(f"{USER}/missing", token=secret),
        lambda: load_manifest(f"{USER}/missing", token_file=tmp_path / "token"),
        lambda: push_to_hub(folder, REPO, token=secret, endpoint=f"http://{secret}@127.0.0.1:{_closed_port()}",
                            max_retries=1, retry_wait=0.01),
    ]
    for action in failing:
        with pytest.raises(HubError) as err:
            action()
        assert secret not in str(err.value) and secret not in repr(err.value)
        assert err.value.__cause__ is None or secret not in str(err.value.__cause__)
    assert caplog.records and secret not in caplog.text


# ------------------------------------------------------------------------------------------- card
def test_the_card_comes_from_the_packaged_template(folder, monkeypatch, tmp_path):
    from optimum_statprune.sharing import card

    shipped = card.template_path()
    assert shipped.is_file() and "{{ card_data }}" in shipped.read_text()
    custom = tmp_path / "card.md"
    custom.write_text("---\n{{ card_data }}\n---\n\n{{ marker }}\n\nCUSTOM {{ title }} by {{ method }}\n")
    monkeypatch.setattr(card, "template_path", lambda: custom)
    made = model_card(folder)
    assert "CUSTOM model by wanda" in made.text and made.data.base_model == BASE and "pruned" in made.data.tags


def test_a_card_is_rewritten_only_while_its_marker_is_there(folder):
    from huggingface_hub import ModelCard

    readme = write_model_card(folder)
    text = readme.read_text()
    assert CARD_MARKER in text
    readme.write_text(text.replace("## Sparsity", "## Edited"))  # edited, marker kept: rewritten
    write_model_card(folder)
    assert "## Edited" not in readme.read_text() and "## Sparsity" in readme.read_text()
    readme.write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My own card\n")  # no marker: kept
    write_model_card(folder)
    kept = ModelCard.load(readme)
    assert "# My own card" in kept.text and "## Sparsity" not in kept.text
    assert kept.data.license == "mit" and {"mine", "pruned", "2:4-sparsity"} <= set(kept.data.tags)
    assert kept.data.base_model == BASE and kept.data.library_name == "transformers"


def test_the_reproduce_command_names_flags_as_the_cli_does(folder):
    """Non-default booleans, lists and a regex that a shell would mangle, through the real CLI parser."""
    import shlex

    from optimum_statprune import StatPruneConfig, cli
    from optimum_statprune.cli import config_flags
    from optimum_statprune.flags import command_line_args, flag_for

    assert flag_for("ec_clamp") == "--ec-clamp" == config_flags.flag_for("ec_clamp")
    assert command_line_args({"ec_clamp": [1, 3], "sequential": False, "targets": None, "ignore": []}) == [
        "--ec-clamp", "1", "3", "--no-sequential"]
    manifest = read_manifest(folder)
    config = StatPruneConfig(method="wanda", pattern="2:4", ec_centered=False, ec_clamp=(1.0, 3.0),
                             sequential=True, ignore=[r"(q|k)_proj$"], batch_size=2)
    manifest["config"] = config.resolved()
    write_manifest(folder, manifest)
    text = str(model_card(folder))
    line = next(x for x in text.splitlines() if x.startswith("optimum-statprune prune "))
    assert "--no-ec-centered" in line and "--sequential" in line and "'(q|k)_proj$'" in line
    args = cli.build_parser().parse_args(shlex.split(line)[1:])
    assert config_flags.build_config(args).resolved() == manifest["config"]


def test_an_unknown_error_holding_a_secret_is_redacted():
    from optimum_statprune.sharing.transport import call

    def leaking():
        raise ValueError("bad answer from http://bob:hunter2@hub.example.com/api")

    with pytest.raises(HubError) as err:
        call(leaking, "read x", "org/x", endpoint="https://hub.example.com", token="tok-123456")
    assert "hunter2" not in str(err.value) and "http://***@hub.example.com" in str(err.value)
    assert err.value.__cause__ is None

    def plain():
        raise ValueError("not a Hub problem")

    with pytest.raises(ValueError, match="not a Hub problem"):  # nothing secret: raised as it is
        call(plain, "read x", "org/x", endpoint="https://hub.example.com")
