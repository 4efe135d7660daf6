"""Model card and push / download against a fake Hub served on 127.0.0.1 (see fake_hub.py)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from fake_hub import READ_ONLY_TOKEN, USER, VALID_TOKEN, fake_hub_session
from tiny_models import build, tiny_tokenizer, token_ids

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.sharing.hub import (
    HubError,
    download,
    layer_type,
    model_card,
    push_to_hub,
    sparsity_by_type,
)
from optimum_statprune.sharing.manifest import MANIFEST_NAME, read_manifest, write_manifest
from optimum_statprune.sharing.verify import load_manifest

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

    text = str(model_card(folder))
    line = next(x for x in text.splitlines() if x.startswith("optimum-statprune prune "))
    args = cli.build_parser().parse_args(shlex.split(line)[1:])
    assert args.model == BASE and args.output == "pruned-model"
    assert cli.build_config(args).resolved() == read_manifest(folder)["config"]


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
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HubError, match="could not be reached"):
        push_to_hub(folder, REPO, token=VALID_TOKEN, endpoint=f"http://127.0.0.1:{port}", max_retries=1, retry_wait=0.01)


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
