"""Phrases: short texts "a photo of {concept} that ..." used by the GPT loss of OTI and phi.

SEARLE samples them from GPT-Neo 2.7B (256 per concept in one call, max length 35, temperature 0.5,
no_repeat_ngram_size 2, fp16 on CUDA) and prepares each as src/gpt_phrases_generation.py does:
runs of newlines -> ". ", runs of dots -> ".", duplicates kept (they weight the draw of L_gpt); a concept one of
whose phrases lost it is dropped when the bank is used. Two preparations (`PHRASE_STYLES`):
"searle" exactly that; "isearle" (the default) replaces each newline alone, normalises spaces,
drops duplicates, and drops the concept already when the bank is made. In both, phrases that
hold the placeholder "$" are dropped (SEARLE's encoder would take their "$" for S*). Any
transformers causal LM can be configured; offline, a generator needs no download: the shapes
world's grammar, or templated continuations for other vocabularies.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from isearle.artifacts import ArtifactError, display, read_json, write_json, write_text
from isearle.backbone import PLACEHOLDER, WeightsUnavailable
from isearle.oti import replace_concept
from isearle.runtime import hub_offline

PROMPT = "a photo of {} that"
#: How generated texts become a bank (module docstring).
PHRASE_STYLES = ("searle", "isearle")
log = logging.getLogger(__name__)


@dataclass
class LMConfig:
    """Sampling settings of the paper (SEARLE, Sec. 4.1, and src/gpt_phrases_generation.py)."""

    model: str = "EleutherAI/gpt-neo-2.7B"
    samples: int = 256
    max_length: int = 35
    temperature: float = 0.5
    no_repeat_ngram_size: int = 2
    #: sequences per `generate` call (SEARLE: all 256 of a concept in one call)
    batch_size: int = 256
    seed: int = 0
    #: "cuda" when present, else "cpu" (None); fp16 weights on CUDA, as SEARLE's utils.dtype
    device: str | None = None


def process_phrase(text: str, style: str = "isearle") -> str:
    """One generated text as a phrase of the bank: "searle" as gpt_phrases_generation.py's
    `process_phrase` (runs of newlines -> ". ", runs of dots -> "."); "isearle" each newline -> ". ",
    spaces normalised."""
    if style == "searle":
        return re.sub(r"\.+", ".", re.sub(r"(\n)+", ". ", text))
    if style != "isearle":
        raise ValueError(f"unknown phrase style {style!r}: use one of {', '.join(PHRASE_STYLES)}")
    return " ".join(text.replace("\n", ". ").split())


def keep_valid(concept: str, phrases: Sequence[str]) -> list[str]:
    """Phrases that still name the concept as a standalone word (others can't hold "$"), spaces
    normalised and duplicates dropped (the "isearle" style)."""
    return [p for p in dict.fromkeys(" ".join(p.split()) for p in phrases) if replace_concept(p, concept)]


def without_placeholder(bank: Mapping[str, Sequence[str]], source: str = "phrase bank") -> dict[str, list[str]]:
    """The bank without phrases that already contain "$" ("... costs $5"): with the concept replaced
    they would hold two placeholders, which no prompt may. The number dropped is logged."""
    out = {c: [p for p in ps if PLACEHOLDER not in p] for c, ps in bank.items()}
    dropped = sum(len(ps) for ps in bank.values()) - sum(len(ps) for ps in out.values())
    if dropped:
        log.warning('%s: dropped %d phrase(s) containing "%s"', source, dropped, PLACEHOLDER)
    return out


def load_phrase_bank(path: str | Path) -> dict[str, list[str]]:
    """{concept: phrases} from an `isearle phrases` JSON, without phrases holding "$" (ArtifactError,
    one line, when the file is damaged)."""
    remedy = f"generate it again with `isearle phrases --out {display(path)}`"
    bank = read_json(path, remedy)
    if not isinstance(bank, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in bank.values()):
        raise ArtifactError(path, "is not a phrase bank ({concept: [phrases]})", remedy)
    return without_placeholder(bank, str(path))


def lm_generator(config: LMConfig) -> Callable[[str], list[str]]:
    """Concept -> raw generated texts from a transformers causal LM (loaded once: fp16 on CUDA when
    present, as SEARLE; fp32 on CPU), `config.batch_size` sequences per call."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise RuntimeError("the LM phrase generator needs transformers: pip install 'isearle[lm]'") from err
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(config.model, "config.json"), str):
            raise WeightsUnavailable(f"{config.model} is not cached and the hub is offline: "
                                     f"use --generator offline or run once online")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(config.model)
    model = AutoModelForCausalLM.from_pretrained(config.model, torch_dtype=dtype).to(device).eval()
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(config.seed)
    log.info("phrase generator %s on %s (%s), %d sequences per call", config.model, device, dtype, config.batch_size)

    def generate(concept: str) -> list[str]:
        out: list[str] = []
        ids = tok(PROMPT.format(concept), return_tensors="pt").to(device)
        for start in range(0, config.samples, config.batch_size):
            n = min(config.batch_size, config.samples - start)
            with torch.no_grad():
                seqs = model.generate(**ids, do_sample=True, temperature=config.temperature,
                                      max_length=config.max_length, num_return_sequences=n,
                                      no_repeat_ngram_size=config.no_repeat_ngram_size,
                                      pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(seqs, skip_special_tokens=True)
        return out

    return generate


#: Continuations for the offline generator on open vocabularies (the LM's role, without the LM).
OFFLINE_CONTINUATIONS: tuple[str, ...] = (
    "is on a table", "is in the middle of the picture", "is seen from the side", "is outdoors",
    "is indoors", "is next to a wall", "is in the sun", "is on the grass", "was taken at night",
    "is on a white background", "is in a city", "is close to the camera", "is far away",
    "is small", "is large", "is partly hidden", "is in the snow", "is near the water",
    "is on display", "is in black and white", "has a blurry background", "is in focus",
)


def offline_generator(samples: int = 16, seed: int = 0) -> Callable[[str], list[str]]:
    """Concept -> phrases without any download: templated continuations (the shapes world has its own,
    `isearle.shapes.captions.phrase_generator`)."""
    rng = random.Random(seed)
    return lambda concept: [f"{PROMPT.format(concept)} {c}" for c in rng.sample(OFFLINE_CONTINUATIONS, samples)]


def _journal(path: Path) -> Path:
    return path.with_name(path.name + ".partial.jsonl")


def _read_journal(path: Path) -> dict[str, list[str]]:
    """Concepts finished by an interrupted run: one JSON line each (a torn last line is ignored)."""
    done: dict[str, list[str]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[str(row["concept"])] = [str(p) for p in row["phrases"]]
            except (ValueError, KeyError, TypeError):
                continue
    return done


def _check_settings(path: Path, settings: dict) -> None:
    """A bank is resumed only with the settings it was started with (its `.settings.json`)."""
    side = path.with_name(path.name + ".settings.json")
    if side.is_file():
        old = read_json(side, f"delete {display(side)} and {display(path)} to start over")
        if old != settings:
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            raise ArtifactError(path, f"was made with other settings ({', '.join(diff)} differ)",
                                "use a new --out file, or the settings it was made with")
    write_text(side, json.dumps(settings, sort_keys=True))


def generate_phrases(concepts: Sequence[str], generator: Callable[[str], list[str]],
                     cache: str | Path | None = None, progress: bool = True, style: str = "isearle",
                     settings: Mapping[str, object] | None = None) -> dict[str, list[str]]:
    """{concept: phrases}, prepared in `style` (`PHRASE_STYLES`), resumable by concept through `cache`.

    "isearle": [] marks a concept dropped because a phrase lost it; "searle": every phrase is kept
    (duplicates included) and the filter runs where the bank is used, as in SEARLE. Finished
    concepts are appended to `{cache}.partial.jsonl` as they come, so a killed multi-hour run loses at
    most one concept; the bank JSON is written at the end. `settings` (the generator's) and `style`
    are recorded beside the bank: resuming with others is refused."""
    if style not in PHRASE_STYLES:
        raise ValueError(f"unknown phrase style {style!r}: use one of {', '.join(PHRASE_STYLES)}")
    path = Path(cache) if cache else None
    bank: dict[str, list[str]] = {}
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        bank = load_phrase_bank(path) if path.exists() else {}
        _check_settings(path, {"style": style, **(settings or {})})
        bank.update(_read_journal(_journal(path)))
    dropped, made, started = 0, 0, time.perf_counter()
    journal = open(_journal(path), "a", encoding="utf-8") if path else None  # noqa: SIM115 (closed below)
    try:
        bar = tqdm(concepts, desc="phrases", disable=not progress, unit="concept")
        for concept in bar:
            concept = concept.strip()  # SEARLE strips the display name before the prompt
            if concept in bank:
                continue
            generated = [process_phrase(p, style) for p in generator(concept)]
            made += len(generated)
            raw = [p for p in generated if PLACEHOLDER not in p]  # "$" is the placeholder: see without_placeholder
            dropped += len(generated) - len(raw)
            if style == "searle":
                bank[concept] = raw
            else:
                valid = keep_valid(concept, raw)
                complete = len(valid) == len(dict.fromkeys(" ".join(p.split()) for p in raw))
                bank[concept] = valid if complete else []  # [] marks a dropped concept (kept for resuming)
            if journal is not None:
                journal.write(json.dumps({"concept": concept, "phrases": bank[concept]}) + "\n")
                journal.flush()
            bar.set_postfix(phrases_per_s=f"{made / max(time.perf_counter() - started, 1e-9):.1f}", refresh=False)
    finally:
        if journal is not None:
            journal.close()
    seconds = time.perf_counter() - started
    if made:
        log.info("generated %d phrases in %.1f s (%.1f phrases/s)", made, seconds, made / max(seconds, 1e-9))
    if dropped:
        log.warning('dropped %d generated phrase(s) containing "%s"', dropped, PLACEHOLDER)
    if path:
        write_json(path, bank, indent=0)
        _journal(path).unlink(missing_ok=True)
    return bank
