"""Phrases: short texts "a photo of {concept} that ..." used by the GPT loss of OTI and phi.

SEARLE samples them from GPT-Neo 2.7B (256 per concept, max length 35, temperature 0.5,
no_repeat_ngram_size 2; newlines become ". ") and drops a concept when a phrase loses it. Any
transformers causal LM can be configured; offline, a generator needs no download: the shapes
world's grammar, or templated continuations for other vocabularies.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from isearle.artifacts import ArtifactError, display, read_json, write_json
from isearle.backbone import PLACEHOLDER, WeightsUnavailable
from isearle.oti import replace_concept
from isearle.runtime import hub_offline

PROMPT = "a photo of {} that"
log = logging.getLogger(__name__)


@dataclass
class LMConfig:
    """Sampling settings of the paper (SEARLE, Sec. 4.1)."""

    model: str = "EleutherAI/gpt-neo-2.7B"
    samples: int = 256
    max_length: int = 35
    temperature: float = 0.5
    no_repeat_ngram_size: int = 2
    batch_size: int = 32
    seed: int = 0


def keep_valid(concept: str, phrases: Sequence[str]) -> list[str]:
    """Phrases that still name the concept as a standalone word (others can't hold "$")."""
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
    """Concept -> phrases from a transformers causal LM (loaded once)."""
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
    tok = AutoTokenizer.from_pretrained(config.model)
    model = AutoModelForCausalLM.from_pretrained(config.model).eval()
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(config.seed)

    def generate(concept: str) -> list[str]:
        prompt = PROMPT.format(concept)
        out: list[str] = []
        ids = tok(prompt, return_tensors="pt")
        for start in range(0, config.samples, config.batch_size):
            n = min(config.batch_size, config.samples - start)
            with torch.no_grad():
                seqs = model.generate(**ids, do_sample=True, temperature=config.temperature,
                                      max_length=config.max_length, num_return_sequences=n,
                                      no_repeat_ngram_size=config.no_repeat_ngram_size,
                                      pad_token_id=tok.pad_token_id)
            out += [t.replace("\n", ". ") for t in tok.batch_decode(seqs, skip_special_tokens=True)]
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


def generate_phrases(concepts: Sequence[str], generator: Callable[[str], list[str]],
                     cache: str | Path | None = None, progress: bool = True) -> dict[str, list[str]]:
    """{concept: phrases}, [] for concepts dropped because a phrase lost them; resumable through a JSON cache."""
    path = Path(cache) if cache else None
    bank = load_phrase_bank(path) if path and path.exists() else {}
    dropped = 0
    for i, concept in enumerate(tqdm(concepts, desc="phrases", disable=not progress)):
        if concept in bank:
            continue
        generated = generator(concept)
        raw = [p for p in generated if PLACEHOLDER not in p]  # "$" is the placeholder: see without_placeholder
        dropped += len(generated) - len(raw)
        valid = keep_valid(concept, raw)
        complete = len(valid) == len(dict.fromkeys(" ".join(p.split()) for p in raw))
        bank[concept] = valid if complete else []  # [] marks a dropped concept (kept for resuming)
        if path and i % 50 == 49:
            write_json(path, bank)
    if dropped:
        log.warning('dropped %d generated phrase(s) containing "%s"', dropped, PLACEHOLDER)
    if path:
        write_json(path, bank, indent=0)
    return bank

