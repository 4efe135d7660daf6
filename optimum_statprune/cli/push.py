"""``push``: upload a pruned model with its manifest and a model card (also ``prune --push-to-hub``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import CLIError, install_one_line_errors
from .options import add_common_arguments, add_token_arguments


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    install_one_line_errors(parser)
    parser.add_argument("directory", metavar="DIR", help="a pruned model saved by optimum-statprune")
    parser.add_argument("repo_id", metavar="REPO", help="Hub repository, e.g. your-name/model-pruned")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    add_token_arguments(parser)
    parser.add_argument("--message", metavar="TEXT", help="commit message")
    parser.add_argument("--revision", metavar="BRANCH", help="branch to push to (default: main)")
    parser.add_argument("--no-check", action="store_true", help="upload without verifying the weights against the manifest")
    add_common_arguments(parser)
    parser.set_defaults(_command="push", _prog=parser.prog)


def push(folder: str | Path, repo_id: str, private: bool, token: str | None, message: str | None,
         revision: str | None, check: bool, token_file: str | None = None) -> None:
    """Upload ``folder`` and print where it went."""
    from ..sharing.hub import push_to_hub

    url = push_to_hub(folder, repo_id, private=private, token=token, commit_message=message, revision=revision,
                      check=check, token_file=token_file)
    print(f"pushed {folder} to {repo_id}: {getattr(url, 'commit_url', None) or url}")


def cmd_push(args: argparse.Namespace) -> int:
    if not Path(args.directory).is_dir():
        raise CLIError(f"{args.directory} is not a directory; give the folder a prune run wrote", 2)
    push(args.directory, args.repo_id, args.private, args.token, args.message, args.revision,
         check=not args.no_check, token_file=args.token_file)
    return 0
