"""OTI: optimisation-based textual inversion of a batch of images into pseudo-tokens S*.

For each image a pseudo-token v is optimised so that (a) "a photo of $" (a random template) with
v in place of "$" encodes close to the image (content loss, with iSEARLE's Gaussian noise on the
text feature to bridge CLIP's modality gap) and (b) a phrase about one of the image's concepts,
with the concept replaced by "$", encodes close to the phrase itself (GPT loss: keeps v a word
that composes with language). The exponential moving average of v is the result (SEARLE).

Speed, with the losses of SEARLE's step unchanged: the phrase targets are constant, so they are
encoded once per batch; template and phrase prompts share one text-encoder pass; the transformer
runs only up to the longest end-of-text token (see `pseudo_word`).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from isearle.backbone import Backbone
from isearle.precision import compute_autocast, effective_precision
from isearle.precision import grad_scaler as precision_scaler
from isearle.prefix_cache import PrefixCache, supported
from isearle.pseudo_word import encode_tokens, tokenize_prompts
from isearle.templates import PALAVRA_TEMPLATES as CONCEPT_TEMPLATES

log = logging.getLogger(__name__)

#: Content-loss templates: SEARLE's OTI draws one of PALAVRA's 24 per image and step, formatted
#: with " $ " (src/oti_inversion.py); the same list as concept ensembling.
TEMPLATES: tuple[str, ...] = tuple(t.format(" $ ") for t in CONCEPT_TEMPLATES)


@dataclass
class OTIConfig:
    """OTI hyper-parameters; defaults are SEARLE's, plus iSEARLE's noise scale `gamma`."""

    steps: int = 350
    lr: float = 2e-2
    weight_decay: float = 0.01
    ema_decay: float = 0.99
    init_std: float = 0.02
    lambda_content: float = 1.0
    lambda_gpt: float = 0.5
    #: std of the Gaussian noise added to the (L2-normalised) text feature before the content loss;
    #: 0 disables it (plain SEARLE). OPEN in the paper: chosen on ShapesCIR val, see README.
    gamma: float = 0.1
    #: Cap on ||v|| as a multiple of the mean norm of the real token embeddings (v is projected
    #: back into that ball after every step); 0: no cap (SEARLE). OPEN in the paper: see README.
    max_norm: float = 0.0
    top_k_concepts: int = 15
    batch_size: int = 32
    seed: int = 0
    templates: tuple[str, ...] = field(default=TEMPLATES)
    #: How a concept is found in its GPT phrases (`CONCEPT_MATCHES`): "word" (ours), "substring" (SEARLE).
    concept_match: str = "word"
    #: Speed only: cache the keys/values of the positions before "$" and run the transformer on the
    #: packed suffixes (`isearle.prefix_cache`; exact in fp32). False: the plain fused pass.
    prefix_cache: bool = True
    #: `isearle.precision.COMPUTE_PRECISIONS`: "fp16" (SEARLE's oti_inversion.py: fp16 autocast + GradScaler),
    #: "fp32", or "bf16" (autocast of forward and backward; faster on CPUs with AVX512-BF16/AMX, losses
    #: close to fp32's, not equal); None: the backbone's precision (fp16 on CUDA, fp32 on CPU).
    precision: str | None = None


@dataclass
class PhraseTask:
    """For one image: phrases about its top concepts, and the same phrases with the concept as "$"."""

    phrases: list[str]
    pseudo_phrases: list[str]


#: How a concept is found in its phrases (`OTIConfig.concept_match`, `PhiTrainConfig.concept_match`):
#: "word" (a standalone word) or "substring" (SEARLE's `str.replace`, which also finds "cat" in "category").
CONCEPT_MATCHES = ("word", "substring")


def replace_concept(phrase: str, concept: str, count: int = 1, match: str = "word") -> str | None:
    """The phrase with its first `count` (0: every) mentions of `concept` as " $ ", or None.

    SEARLE uses `phrase.replace(concept, " $ ", 1)` in OTI and `phrase.replace(concept, " $ ")` in phi
    training (case-sensitive): `match="substring"`. "word" matches whole words only, so that S* never
    stands for a piece of another word ("cat" in "category" -> " $ egory", a prompt with a second
    literal "$" whose S* learns from a word fragment).
    """
    if match == "substring":
        return phrase.replace(concept, " $ ", count or -1) if concept and concept in phrase else None
    if match != "word":
        raise ValueError(f"unknown concept match {match!r}: use one of {', '.join(CONCEPT_MATCHES)}")
    pattern = re.compile(r"(?<![\w$])" + re.escape(concept) + r"(?![\w])")
    out, n = pattern.subn(" $ ", phrase, count=count)
    return out if n else None


def usable_concepts(phrase_bank: Mapping[str, Sequence[str]], match: str = "word") -> set[str]:
    """Concepts whose phrases all name them (SEARLE filters out a concept when one phrase does not)."""
    return {c for c, ps in phrase_bank.items() if ps and all(replace_concept(p, c, match=match) for p in ps)}


def phrase_tasks(
    image_concepts: Sequence[Sequence[str]], phrase_bank: Mapping[str, Sequence[str]], top_k: int = 15,
    match: str = "word",
) -> list[PhraseTask]:
    """Per image, every (phrase, phrase-with-$) pair of its top-k distinct usable concepts (SEARLE's OTI);
    duplicate phrases are kept (they weight the draw, as in SEARLE)."""
    usable = usable_concepts(phrase_bank, match)
    tasks = []
    for concepts in image_concepts:
        pairs = []
        for concept in list(dict.fromkeys(str(c).strip() for c in concepts))[:top_k]:
            if concept in usable:
                pairs += [(p, replace_concept(p, concept, match=match)) for p in phrase_bank[concept]]
        tasks.append(PhraseTask([p for p, _ in pairs], [q for _, q in pairs]))
    return tasks


def cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(a_i, b_i) (CosineEmbeddingLoss with target 1)."""
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


class OTIObjective:
    """SEARLE's OTI loss for a fixed batch of images, with cached tokens and phrase targets.

    `sample(step)` draws the step's templates and phrases from a seeded generator, so that two
    objectives built with the same seed see the same prompts (used to compare implementations).
    """

    def __init__(
        self,
        backbone: Backbone,
        image_features: torch.Tensor,
        tasks: Sequence[PhraseTask] | None,
        config: OTIConfig,
        rng: random.Random,
    ) -> None:
        self.backbone, self.config = backbone, config
        self.precision = oti_precision(backbone, config)
        self.image_features = image_features.to(backbone.device).float()
        n = self.image_features.shape[0]
        self.template_tokens = tokenize_prompts(backbone, list(config.templates))
        use_gpt = config.lambda_gpt > 0 and tasks is not None
        self.tasks = list(tasks) if use_gpt else [PhraseTask([], []) for _ in range(n)]
        # Draw every step's choices up front, in SEARLE's order (per step: templates, then phrases):
        # the targets needed are then known and encoded once.
        self.template_choice, self.phrase_choice = [], []
        for _ in range(config.steps):
            self.template_choice.append(rng.choices(range(len(config.templates)), k=n))
            self.phrase_choice.append([rng.choice(range(len(t.phrases))) if t.phrases else -1 for t in self.tasks])
        self.template_choice = torch.tensor(self.template_choice)
        seed = rng.randrange(2**31) if config.gamma > 0 else 0
        self.noise_gen = torch.Generator(device="cpu").manual_seed(seed)
        self._encode_phrases()
        self.prefix_cache = None  # rows: the templates, then the phrase slots
        if config.prefix_cache and supported(backbone):
            rows = self.template_tokens if self.phrase_tokens is None else torch.cat(
                [self.template_tokens, self.phrase_tokens.to(self.template_tokens.device)])
            self.prefix_cache = PrefixCache(backbone, rows)

    def _encode_phrases(self) -> None:
        """Encode each distinct phrase target once (SEARLE re-encodes them every step)."""
        used = sorted({(i, c) for row in self.phrase_choice for i, c in enumerate(row) if c >= 0})
        self.slot = {key: j for j, key in enumerate(used)}
        if not used:
            self.phrase_targets = self.phrase_tokens = None
            return
        texts = [self.tasks[i].phrases[c] for i, c in used]
        pseudo = [self.tasks[i].pseudo_phrases[c] for i, c in used]
        with torch.no_grad(), compute_autocast(self.backbone.device, self.precision):
            targets = [
                encode_tokens(self.backbone, self.backbone.tokenize(texts[s : s + 256])).float()
                for s in range(0, len(texts), 256)
            ]
        self.phrase_targets = torch.cat(targets)
        self.phrase_tokens = tokenize_prompts(self.backbone, pseudo)

    def loss(self, step: int, pseudo_tokens: torch.Tensor) -> torch.Tensor:
        """(lambda_content * L_content + lambda_gpt * L_gpt) / (lambda_content + lambda_gpt)."""
        cfg, n = self.config, pseudo_tokens.shape[0]
        tokens = self.template_tokens[self.template_choice[step]]
        rows = [i for i, c in enumerate(self.phrase_choice[step]) if c >= 0]
        which = self.template_choice[step]
        if rows:
            slots = torch.tensor([self.slot[(i, self.phrase_choice[step][i])] for i in rows])
            tokens = torch.cat([tokens, self.phrase_tokens[slots]])
            which = torch.cat([which, slots + len(self.template_tokens)])
            pseudo = torch.cat([pseudo_tokens, pseudo_tokens[rows]])
        else:
            pseudo = pseudo_tokens
        # one fused pass, in the run's precision (SEARLE: under fp16 autocast on CUDA)
        with compute_autocast(self.backbone.device, self.precision):
            if self.prefix_cache is not None:
                feats = self.prefix_cache.encode(which, pseudo).float()
            else:
                feats = encode_tokens(self.backbone, tokens, pseudo).float()
        text = F.normalize(feats[:n], dim=-1)
        if cfg.gamma > 0:
            noise = torch.randn(text.shape, generator=self.noise_gen) * cfg.gamma
            text = text + noise.to(text.device)
        content = cosine_loss(text, self.image_features)
        total = cfg.lambda_content * content
        weight = cfg.lambda_content
        if rows:
            gpt = cosine_loss(feats[n:], self.phrase_targets[slots.to(feats.device)])
            total = total + cfg.lambda_gpt * gpt
            weight += cfg.lambda_gpt
        return total / weight


def token_norm(backbone: Backbone) -> float:
    """Mean L2 norm of the model's real token embeddings (the scale S* is compared with)."""
    return float(backbone.token_embedding.weight.detach().float().norm(dim=-1).mean())


@torch.no_grad()
def _project(v: torch.Tensor, cap: float) -> None:
    """Scale rows of `v` whose norm exceeds `cap` back onto the sphere of radius `cap` (in place)."""
    v.mul_((cap / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))


def oti_precision(backbone: Backbone, config: OTIConfig) -> str:
    """The precision an OTI run computes in: the config's, else the backbone's (what fp16 means on
    this device included, `isearle.precision.effective_precision`)."""
    return effective_precision(config.precision or backbone.precision, backbone.device)


def grad_scaler(backbone: Backbone, config: OTIConfig | None = None) -> torch.amp.GradScaler:
    """SEARLE's GradScaler when OTI runs under fp16 autocast (gradients of S* would underflow in
    fp16 otherwise); a pass-through scaler in fp32 / bf16."""
    return precision_scaler(backbone.device, oti_precision(backbone, config or OTIConfig()))


@dataclass
class OTIStep:
    """The state of an OTI run after `step` optimisation steps (step 0: the initial token, loss nan)."""

    step: int
    #: this step's mean loss (detached, on the backbone's device; float() it to read it)
    loss: torch.Tensor
    #: the EMA pseudo-tokens [N, token_width] so far: the run's result at this step (the live tensor:
    #: clone it to keep it past the next step)
    token: torch.Tensor


def invert_steps(
    backbone: Backbone,
    image_features: torch.Tensor,
    config: OTIConfig | None = None,
    tasks: Sequence[PhraseTask] | None = None,
    init: torch.Tensor | None = None,
) -> Iterator[OTIStep]:
    """OTI one step at a time: yields the initial state, then the state after every step.

    `invert` is this generator run to its end, so a run watched step by step (the demo's streamed
    view) ends with exactly the tokens of a plain run. Gradients are enabled inside, whatever the
    caller's grad mode; `image_features` must not be inference tensors (clone them).
    """
    config = config or OTIConfig()
    rng = random.Random(config.seed)
    objective = OTIObjective(backbone, image_features, tasks, config, rng)
    n = image_features.shape[0]
    if init is None:
        gen = torch.Generator().manual_seed(config.seed)
        init = torch.randn(n, backbone.token_width, generator=gen) * config.init_std
    with torch.inference_mode(False):
        v = torch.nn.Parameter(init.detach().clone().float().to(backbone.device))
        cap = config.max_norm * token_norm(backbone) if config.max_norm > 0 else None
        if cap is not None:
            _project(v, cap)
        ema = v.detach().clone()
        optimizer = torch.optim.AdamW([v], lr=config.lr, weight_decay=config.weight_decay)
        scaler = grad_scaler(backbone, config)
    yield OTIStep(0, torch.tensor(float("nan")), ema)
    for step in range(config.steps):
        with torch.inference_mode(False), torch.enable_grad():
            optimizer.zero_grad(set_to_none=True)
            loss = objective.loss(step, v)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if cap is not None:
                _project(v, cap)
            ema.mul_(config.ema_decay).add_(v.detach(), alpha=1 - config.ema_decay)
        yield OTIStep(step + 1, loss.detach(), ema)


def invert(
    backbone: Backbone,
    image_features: torch.Tensor,
    config: OTIConfig | None = None,
    tasks: Sequence[PhraseTask] | None = None,
    init: torch.Tensor | None = None,
    progress: bool = False,
    history: list[float] | None = None,
) -> torch.Tensor:
    """Pseudo-tokens [N, token_width] for un-normalised image features [N, D] (one batch).

    `tasks` gives each image's GPT phrases (see `phrase_tasks`); without them only the content
    loss is used. `init` warm-starts from given tokens (e.g. phi's prediction) instead of
    N(0, init_std). Mean losses per step are appended to `history` when given.
    """
    config = config or OTIConfig()
    token = None
    bar = tqdm(total=config.steps, desc="OTI", leave=False, disable=not progress)
    for state in invert_steps(backbone, image_features, config, tasks, init):
        token = state.token
        if state.step > 0:
            bar.update()
            if history is not None:
                history.append(float(state.loss))
    bar.close()
    return token
