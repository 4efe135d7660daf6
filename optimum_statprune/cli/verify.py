"""``verify``: check a pruned model's tensors against its manifest (hashes, sparsity, N:M)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..sharing.transport import is_hub_id
from .errors import UsageError, install_one_line_errors
from .options import add_common_arguments, add_token_arguments


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    install_one_line_errors(parser)
    parser.add_argument("target", metavar="DIR_OR_REPO", help="a pruned model directory or Hub repository")
    parser.add_argument("--revision", metavar="REV", help="Hub branch, tag or commit")
    add_token_arguments(parser, what="Hub token for private repositories")
    parser.add_argument("--no-hashes", action="store_true", help="check sparsity and patterns only (e.g. after fine-tuning)")
    add_common_arguments(parser)
    parser.set_defaults(_command="verify", _prog=parser.prog)


def cmd_verify(args: argparse.Namespace) -> int:
    target = args.target
    if not Path(target).expanduser().exists() and not is_hub_id(target):
        raise UsageError(f"{target}: no such directory; give a pruned model directory or a Hub repository id (org/name)")
    from ..sharing.verify import verify

    report = verify(target, revision=args.revision, token=args.token, hashes=not args.no_hashes,
                    token_file=args.token_file)
    print(report.summary())
    return 0 if report.ok else 1
