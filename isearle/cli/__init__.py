"""`isearle` command line: parses arguments and calls the library, nothing else.

Each sub-command is (name, help, add-arguments function, run function), by reference; the run
functions import the library lazily, so that `isearle --help` stays fast. Expected failures (missing
weights, a bad image, a damaged artifact: `isearle.errors.IsearleError`; a missing file or a full disk)
end in one line on stderr and exit 1; a bug too, naming its type ("internal error"), and
ISEARLE_DEBUG=1 shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from isearle.cli import evaluate, gallery, inspector, training, world

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: list[Command] = [
    ("concepts", "top-k vocabulary concepts of each image (prompt-ensembled CLIP text features)",
     training.add_concepts_arguments, training.concepts_main),
    ("phrases", "phrases 'a photo of {concept} that ...' for the GPT loss (LM or offline generator)",
     training.add_phrases_arguments, training.phrases_main),
    ("oti", "optimisation-based textual inversion of a set of images (resumable)",
     training.add_oti_command_arguments, training.oti_main),
    ("train-phi", "distil the textual inversion network phi from OTI tokens",
     training.add_train_phi_arguments, training.train_phi_main),
    ("index", "build a FAISS gallery index from an image folder or a Hugging Face dataset",
     gallery.add_index_arguments, gallery.index_main),
    ("query", "composed retrieval: reference image + relative caption -> top-K gallery images",
     gallery.add_query_arguments, gallery.query_main),
    ("inspect", "describe the pseudo-words of a folder of images: a static HTML report (and --json)",
     inspector.add_inspect_arguments, inspector.inspect_main),
    ("eval", "evaluate on CIRR, CIRCO, FashionIQ, ImageNet-R or ShapesCIR",
     evaluate.add_eval_arguments, evaluate.eval_main),
    ("train-clip", "train the tiny CLIP of the offline shapes world",
     world.add_train_clip_arguments, world.train_clip_main),
    ("build-shapes", "generate the ShapesCIR benchmark (annotations + gallery specs)",
     world.add_build_arguments, world.build_main),
]


def build_parser() -> argparse.ArgumentParser:
    """The `isearle` parser: one sub-parser per command, its run function as the `run` default."""
    parser = argparse.ArgumentParser(
        prog="isearle", description="iSEARLE zero-shot composed image retrieval (OTI + phi textual inversion)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


class _Messages(logging.Formatter):
    """The library's log records as CLI lines: "message", or "warning: message"."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the command; exit status 0, 1 (an expected failure, one line) or 130."""
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_Messages("%(message)s"))
    logging.getLogger("isearle").addHandler(handler)
    logging.getLogger("isearle").setLevel(logging.INFO)
    from isearle.errors import IsearleError

    try:
        return int(args.run(args) or 0)
    except IsearleError as err:  # every one-line user error: bad image, weights, artifact, caption...
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: resumable commands continue where they stopped when run again", file=sys.stderr)
        return 130
    except OSError as err:  # disk full, permission denied...: the file and the reason, no traceback
        if os.environ.get("ISEARLE_DEBUG"):
            raise
        print(f"error: {err.filename or ''}{': ' if err.filename else ''}{err.strerror or err}", file=sys.stderr)
        return 1
    except Exception as err:  # a bug: one line for the user; ISEARLE_DEBUG=1 shows the traceback
        if os.environ.get("ISEARLE_DEBUG"):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:200]
        print(f"error: internal error ({type(err).__name__}: {first}); run again with ISEARLE_DEBUG=1 "
              "for the traceback and report it", file=sys.stderr)
        return 1
    finally:
        logging.getLogger("isearle").removeHandler(handler)
