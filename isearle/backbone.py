"""One loading path for every CLIP backbone: open_clip models by name and pretrained tag.

The paper's backbones (ViT-B/32 and ViT-L/14 with OpenAI weights), any other open_clip model, the
project's own configs in `isearle/model_configs/` (the bundled offline shapes model, a random-init
test model) all go through `load_backbone`. Where weights cannot be had, `WeightsUnavailable` says
which model and what to do, after a cache check instead of the hub client's retries.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import open_clip
import torch
import torchvision.transforms.functional as TF
from open_clip.transformer import text_global_pool
from PIL import Image
from torchvision import transforms as T

from isearle import paths
from isearle.artifacts import check_legacy
from isearle.errors import IsearleError
from isearle.runtime import hub_offline

#: The paper's OpenAI weights were trained with QuickGELU; plain "ViT-B-32" + "openai" silently
#: builds GELU and loses accuracy, so those names are mapped to their QuickGELU variants.
QUICKGELU_ALIASES = {"ViT-B-32": "ViT-B-32-quickgelu", "ViT-L-14": "ViT-L-14-quickgelu",
                     "ViT-B-16": "ViT-B-16-quickgelu", "RN50": "RN50-quickgelu"}

#: Pretrained tags that name a file shipped with the project instead of a hub download.
BUNDLED_WEIGHTS = {"isearle-shapes": "models/isearle-shapes.safetensors"}

PLACEHOLDER = "$"


class WeightsUnavailable(IsearleError, RuntimeError):
    """The requested weights are neither cached nor downloadable; the message says what to do."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_registered = False


def register_model_configs(path: Path = paths.CONFIG_DIR) -> None:
    """Make the project's model configs loadable by name (idempotent)."""
    global _registered  # cache flag: registration is process-wide in open_clip too
    if not _registered:
        open_clip.add_model_config(path)
        _registered = True


def targetpad_transform(size: int, ratio: float = 1.25) -> Callable[[Image.Image], Image.Image]:
    """SEARLE's "targetpad": pad with black to aspect `ratio` when the image is more elongated."""

    def pad(image: Image.Image) -> Image.Image:
        w, h = image.size
        if max(w, h) / min(w, h) < ratio:
            return image
        side = max(w, h)
        target = int(side / ratio)
        pw, ph = max(0, (target - w) // 2), max(0, (target - h) // 2)
        return TF.pad(image, [pw, ph, pw, ph], fill=0, padding_mode="constant")

    return pad


def build_preprocess(kind: str, size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Image -> normalised tensor, "targetpad" (SEARLE default) or "clip" (resize + centre crop)."""
    steps: list[Callable] = []
    if kind == "targetpad":
        steps.append(targetpad_transform(size))
    elif kind != "clip":
        raise ValueError(f"unknown preprocess {kind!r}: use 'targetpad' or 'clip'")
    steps += [
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        lambda im: im.convert("RGB"),
        T.ToTensor(),
        T.Normalize(mean, std),
    ]
    return T.Compose(steps)


@dataclass
class Backbone:
    """A CLIP model with its preprocessing and tokenizer, ready for inference on `device`."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    name: str
    pretrained: str | None
    device: torch.device
    #: One of `isearle.precision.COMPUTE_PRECISIONS`, meaning the same on every device: "fp32": none
    #: (SEARLE's validate.py, `isearle eval`); "fp16": fp16 autocast (on CUDA, `load_backbone`'s default
    #: there; on CPU only where torch supports it, else fp32); "bf16": bf16 weights and autocast (the
    #: query path's copy, see `with_precision`). `load_backbone` sets fp16 on CUDA and fp32 on CPU.
    precision: str = "fp32"
    _placeholder_id: int | None = field(default=None, repr=False)

    @property
    def text(self) -> torch.nn.Module:
        """The text tower (open_clip.CLIP keeps it on the model, CustomTextCLIP under .text)."""
        return getattr(self.model, "text", self.model)

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        return self.text.token_embedding

    @property
    def token_width(self) -> int:
        """Size of a (pseudo-)token embedding: phi's output size."""
        return self.token_embedding.embedding_dim

    @property
    def embed_dim(self) -> int:
        """Size of the joint image/text feature: phi's input size."""
        proj = self.text.text_projection
        return proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1]

    @property
    def context_length(self) -> int:
        return self.text.positional_embedding.shape[0]

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def placeholder_id(self) -> int:
        """Token id of the standalone placeholder "$" (259 for CLIP's BPE)."""
        if self._placeholder_id is None:
            ids = self.tokenize([PLACEHOLDER])[0]
            inner = ids[1 : int(ids.argmax())]
            if inner.numel() != 1:
                raise ValueError(f"placeholder {PLACEHOLDER!r} is not a single token for {self.name}")
            self._placeholder_id = int(inner[0])
        return self._placeholder_id

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        """The inference autocast of `precision`: none in fp32, fp16 / bf16 autocast otherwise."""
        from isearle.precision import compute_autocast

        return compute_autocast(self.device, self.precision)

    def with_precision(self, precision: str) -> Backbone:
        """This backbone in `precision` ("fp32", "fp16" or "bf16"): a bf16 copy keeps its weights in bf16
        (half the bytes each query reads; no cast per call), the original stays fp32 for OTI."""
        if precision == self.precision:
            return self
        from isearle.precision import COMPUTE_PRECISIONS

        if precision not in COMPUTE_PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(COMPUTE_PRECISIONS)}")
        if precision == "bf16":
            return replace(self, model=copy.deepcopy(self.model).to(torch.bfloat16), precision=precision)
        if self.precision == "bf16":
            raise ValueError("a bf16 copy cannot go back to full precision: use the original backbone")
        return replace(self, precision=precision)  # same fp32 weights, another autocast

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Un-normalised image features of a preprocessed batch (what phi takes as input)."""
        with self.autocast:
            return self.model.encode_image(pixels.to(self.device)).float()

    @torch.inference_mode()
    def encode_pil(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.encode_images(torch.stack([self.preprocess(im) for im in images]))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Un-normalised text features (plain prompts, no placeholder)."""
        with self.autocast:
            return encode_tokens(self, self.tokenize(texts)).float()


def encode_tokens(
    backbone: Backbone,
    tokens: torch.Tensor,
    pseudo_tokens: torch.Tensor | None = None,
    truncate: bool = True,
) -> torch.Tensor:
    """Text features (un-normalised) of token ids, with S* in place of "$" when given.

    `pseudo_tokens` is [B, width] (one per row) or [width] (broadcast to every row); it replaces the
    first "$" of a row, as SEARLE's `encode_with_pseudo_tokens` does. With
    `truncate`, positions after the batch's last end-of-text token are never computed.
    """
    text = backbone.text
    tokens = tokens.to(backbone.device)
    eot = tokens.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
    mask = getattr(text, "attn_mask", None)
    length = int(eot.max()) + 1 if truncate and mask is not None else tokens.shape[1]
    tokens = tokens[:, :length]
    x = text.transformer(embed_tokens(backbone, tokens, pseudo_tokens),
                         attn_mask=None if mask is None else mask[:length, :length])
    pool_type = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
    return project_text(text, text_global_pool(text.ln_final(x), tokens, pool_type))


def embed_tokens(backbone: Backbone, tokens: torch.Tensor, pseudo_tokens: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """The text transformer's input [B, L, W] for token ids [B, L] starting at position 0: token
    embeddings, S* (`pseudo_tokens` [B, W] or [W]) in place of each row's first "$" (as SEARLE
    does), then the position embeddings."""
    text = backbone.text
    cast = text.transformer.get_cast_dtype()
    x = text.token_embedding(tokens).to(cast)
    if pseudo_tokens is not None:
        found = tokens == backbone.placeholder_id
        where = (found & (found.cumsum(dim=1) == 1)).unsqueeze(-1)  # the first "$" of each row (SEARLE)
        pseudo = pseudo_tokens.to(cast)
        pseudo = pseudo.expand(tokens.shape[0], -1) if pseudo.dim() == 1 else pseudo
        x = torch.where(where, pseudo.unsqueeze(1), x)
    return x + text.positional_embedding[: tokens.shape[1]].to(cast)


def project_text(text: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled text states [B, W] -> features [B, D] through the text projection (a matrix or a Linear)."""
    proj = text.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


def _resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    """Map a tag to a local file, checking the cache when offline; raise WeightsUnavailable."""
    if pretrained is None or Path(pretrained).is_file():
        return pretrained
    if pretrained in BUNDLED_WEIGHTS:
        path = paths.ASSETS_DIR / BUNDLED_WEIGHTS[pretrained]
        if not path.is_file():
            raise WeightsUnavailable(
                f"bundled weights for {name!r} are missing at {path}: restore assets/ from git "
                f"(git lfs / git checkout) or retrain them with `isearle train-clip`"
            )
        check_legacy(path, "restore assets/ from git (git checkout assets/models) or retrain them with "
                           "`isearle train-clip`")  # a flipped bit would change every answer silently
        return str(path)
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = [t for n, t in open_clip.list_pretrained() if n == name]
        raise WeightsUnavailable(
            f"no pretrained weights {pretrained!r} for {name!r}; known tags: {', '.join(tags) or 'none'}"
        )
    if not _cached(cfg) and (hub_offline() or not _hub_reachable()):
        raise WeightsUnavailable(
            f"weights {name}/{pretrained} are not cached and the hub cannot be reached: "
            f"run once with network access, or pass a local checkpoint path as pretrained"
        )
    return pretrained


def _hub_reachable(timeout: float = 1.5) -> bool:
    """A one-connection probe, so that a machine without network fails in seconds, not after the hub client's long timeout."""
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached(cfg: dict) -> bool:
    """Whether open_clip would find these weights without the network."""
    from huggingface_hub import try_to_load_from_cache

    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id = "/".join(hub.rstrip("/").split("/")[:2])
        for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo_id, fname), str):
                return True
    url = cfg.get("url", "")
    if url:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip"
        return (cache / os.path.basename(url)).is_file()
    return False


def canonical_name(name: str | None, pretrained: str | None) -> str | None:
    """The model name `load_backbone` builds: ViT-B-32 + openai -> ViT-B-32-quickgelu (as trained)."""
    if pretrained == "openai" and name in QUICKGELU_ALIASES:
        return QUICKGELU_ALIASES[name]
    return name


def load_backbone(
    name: str = "ViT-B-32",
    pretrained: str | None = "openai",
    device: str | torch.device | None = None,
    preprocess: str = "targetpad",
) -> Backbone:
    """Load an open_clip model for inference; `pretrained=None` gives random init (tests, speed)."""
    register_model_configs()
    name = canonical_name(name, pretrained)
    if name not in open_clip.list_models() and not name.startswith("hf-hub:"):
        raise WeightsUnavailable(f"unknown model {name!r}; see `open_clip.list_models()`")
    device = pick_device(device)
    weights = _resolve_pretrained(name, pretrained)
    try:
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
    except (OSError, RuntimeError) as err:  # network failures surface as these from the hub client
        if isinstance(err, WeightsUnavailable):
            raise
        raise WeightsUnavailable(
            f"could not load weights {name}/{pretrained}: {str(err).splitlines()[0]} "
            f"(check the network, or set HF_HUB_OFFLINE=1 and use cached or local weights)"
        ) from err
    model.eval().requires_grad_(False)
    cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    from isearle.precision import default_compute_precision

    return Backbone(
        model=model,
        preprocess=build_preprocess(preprocess, size, mean, std),
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        pretrained=pretrained,
        device=device,
        precision=default_compute_precision(device),
    )
