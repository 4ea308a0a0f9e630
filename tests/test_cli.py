"""The `isearle` command line: help for every command and option, and an end-to-end run on a folder."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from isearle.cli import COMMANDS, build_parser, main
from isearle.oti_runs import load_run
from isearle.phi import load_phi

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "isearle-tiny-test", "--pretrained", "none", "--device", "cpu"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def test_python_m_isearle_help():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "isearle", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: isearle")
    for name, *_ in COMMANDS:
        assert name in result.stdout


def test_main_help_exits_0(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "COMMAND" in capsys.readouterr().out


def test_every_command_is_listed_and_runs_its_function():
    subs = _subparsers(build_parser())
    assert list(subs) == [name for name, *_ in COMMANDS]
    for name, _, _, run in COMMANDS:
        assert callable(run) and subs[name].get_default("run") is run


@pytest.mark.parametrize("name", [name for name, *_ in COMMANDS])
def test_subcommand_help_exits_0(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: isearle {name}")


def test_every_option_has_a_help_string():
    parser = build_parser()
    missing = []
    for name, sub in {"": parser, **_subparsers(parser)}.items():
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help: {missing}"


def test_oti_flags_are_declared_once():
    """`isearle oti --steps ...` and `isearle eval --oti-steps ...` are one declaration and one OTIConfig."""
    from isearle.cli.common import oti_config_from
    from isearle.oti import OTIConfig

    subs = _subparsers(build_parser())
    values = ["steps", "7", "batch-size", "5", "lr", "0.1", "gamma", "0.3", "max-norm", "2", "seed", "3"]
    flags = [f"--{v}" if i % 2 == 0 else v for i, v in enumerate(values)]
    oti = subs["oti"].parse_args(["--images", "x", "--out", "y", *flags])
    ev = subs["eval"].parse_args(["--benchmark", "shapes", *[f.replace("--", "--oti-") for f in flags]])
    expected = OTIConfig(steps=7, batch_size=5, lr=0.1, gamma=0.3, max_norm=2.0, seed=3, lambda_gpt=0.0)
    assert oti_config_from(oti) == oti_config_from(ev, "oti_") == expected
    own = {o[2:] for a in subs["oti"]._actions for o in a.option_strings}
    prefixed = {o[6:] for a in subs["eval"]._actions for o in a.option_strings if o.startswith("--oti-")}
    assert prefixed <= own and {"steps", "gamma", "max-norm", "lambda-gpt", "phrases", "vocabulary"} <= prefixed


def test_a_bug_in_a_command_is_named_not_hidden(monkeypatch, capsys):
    """A bug in a command says "internal error" with its type (never "unavailable"); ISEARLE_DEBUG raises it."""
    import isearle.cli

    def broken(args):
        raise AttributeError("'NoneType' object has no attribute 'encode'")

    ghost = ("ghost", "a command with a bug", lambda p: None, broken)
    monkeypatch.setattr(isearle.cli, "COMMANDS", [*COMMANDS, ghost])
    assert main(["ghost"]) == 1
    assert "internal error (AttributeError" in capsys.readouterr().err
    monkeypatch.setenv("ISEARLE_DEBUG", "1")
    with pytest.raises(AttributeError, match="encode"):
        main(["ghost"])


def test_errors_are_one_line_and_exit_1(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    assert main(["oti", "--model", "no-such-model", "--pretrained", "none", "--images", str(folder),
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no-such-model" in err
    assert main(["query", "--caption", "is red", "--gallery", str(tmp_path / "no-gallery")]) == 1
    assert "isearle index" in capsys.readouterr().err


def test_end_to_end_on_an_image_folder(tmp_path, capsys):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    for i, colour in enumerate(colours):
        folder = images / "sub" if i % 2 else images
        Image.new("RGB", (40 + 8 * i, 32), colour).save(folder / f"{colour}.png")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["dog", "cat", "car", "tree", "red ball", "house"]), encoding="utf-8")
    phrases = tmp_path / "phrases.json"
    out = tmp_path / "oti"
    phi_path = tmp_path / "phi" / "phi.safetensors"

    assert main(["phrases", "--vocabulary", str(vocab), "--generator", "offline", "--samples", "8",
                 "--out", str(phrases)]) == 0
    bank = json.loads(phrases.read_text())
    assert set(bank) == {"dog", "cat", "car", "tree", "red ball", "house"}
    assert all(len(v) == 8 for v in bank.values())

    concepts = tmp_path / "concepts.json"
    assert main(["concepts", *TINY, "--images", str(images), "--vocabulary", str(vocab), "--top-k", "3",
                 "--out", str(concepts)]) == 0
    top = json.loads(concepts.read_text())
    assert len(top) == 6 and all(len(v) == 3 for v in top.values())

    assert main(["oti", *TINY, "--images", str(images), "--vocabulary", str(vocab), "--phrases", str(phrases),
                 "--steps", "5", "--batch-size", "4", "--out", str(out)]) == 0
    ids, features, tokens, image_concepts = load_run(out)
    assert sorted(ids) == sorted(top) and len(ids) == 6
    assert "sub/green.png" in ids
    assert features.shape == (6, 64) and tokens.shape == (6, 48)
    assert torch.isfinite(tokens).all()
    assert image_concepts is not None and all(len(c) == 6 for c in image_concepts)  # top 150 of 6
    assert len(list(out.glob("shard_*.safetensors"))) == 2
    assert json.loads((out / "config.json").read_text())["steps"] == 5

    assert main(["train-phi", *TINY, "--oti", str(out), "--phrases", str(phrases), "--epochs", "2",
                 "--batch-size", "4", "--out", str(phi_path)]) == 0
    from isearle.phi import phi_settings

    assert phi_path.is_file() and not phi_path.with_name("phi.training.safetensors").exists()
    meta = phi_settings(phi_path)
    assert meta["backbone"] == "isearle-tiny-test" and meta["train"]["epochs"] == 2
    assert meta["final_losses"]["gpt"] > 0  # the phrases were used
    assert meta["oti"]["steps"] == 5 and meta["oti"]["max_norm"] == 0.0  # the targets' OTI settings
    capsys.readouterr()
    assert main(["train-phi", *TINY, "--oti", str(out), str(out), "--epochs", "1", "--batch-size", "4",
                 "--out", str(tmp_path / "phi2.safetensors")]) == 0  # several runs are concatenated
    assert "phi trained on 12 images" in capsys.readouterr().out
    phi = load_phi(phi_path)
    with torch.no_grad():
        pred = phi(features)
    assert pred.shape == (6, 48) and torch.isfinite(pred).all()

    # a second `oti` run over the same folder resumes: nothing is recomputed
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.safetensors")}
    assert main(["oti", *TINY, "--images", str(images), "--vocabulary", str(vocab), "--phrases", str(phrases),
                 "--steps", "5", "--batch-size", "4", "--out", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.safetensors")} == shards
    capsys.readouterr()


def test_a_phrase_bank_with_dollar_phrases_runs_through_oti_and_train_phi(tmp_path, capsys):
    """A GPT bank holds "... costs $5": both presets' OTI and phi training drop such phrases and run."""
    images = tmp_path / "images"
    images.mkdir()
    for colour in ["red", "green", "blue", "yellow"]:
        Image.new("RGB", (40, 32), colour).save(images / f"{colour}.png")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("dog\ncat\n", encoding="utf-8")
    phrases = tmp_path / "phrases.json"
    phrases.write_text(json.dumps({
        "dog": ["a photo of dog that costs $5", "a photo of dog that runs", "$ dog"],
        "cat": ["a photo of cat that is $ 3", "a photo of cat near a cat"],
    }))
    for preset in ("searle", "isearle"):
        out = tmp_path / f"oti_{preset}"
        assert main(["oti", *TINY, "--preset", preset, "--images", str(images), "--vocabulary", str(vocab),
                     "--phrases", str(phrases), "--steps", "3", "--batch-size", "2", "--out", str(out)]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["gamma"] == (0.0 if preset == "searle" else 0.1) and config["lambda_gpt"] == 0.5
        phi_path = tmp_path / f"phi_{preset}.safetensors"
        assert main(["train-phi", *TINY, "--preset", preset, "--oti", str(out), "--phrases", str(phrases),
                     "--epochs", "2", "--batch-size", "2", "--out", str(phi_path)]) == 0
        from isearle.phi import phi_settings

        meta = phi_settings(phi_path)
        assert meta["preset"] == preset and meta["final_losses"]["gpt"] > 0
        assert meta["train"]["hard_negatives"] == (preset == "isearle")
        assert meta["train"]["reg_form"] == ("none" if preset == "searle" else "norm")
    assert "error" not in capsys.readouterr().err
