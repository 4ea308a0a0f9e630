"""The method's prompt templates, declared once: PALAVRA's 24 (OTI's content loss and concept
ensembling), the composed query's and S* alone's."""

from __future__ import annotations

#: PALAVRA's 24 prompt templates, as SEARLE lists them (src/utils.py `get_templates`, spelling kept):
#: concept ensembling formats each with the concept padded by spaces, OTI's content loss with " $ ".
PALAVRA_TEMPLATES: tuple[str, ...] = (
    "This is a photo of a {}", "This photo contains a {}", "A photo of a {}", "This is an illustration of a {}",
    "This illustration contains a {}", "An illustrations of a {}", "This is a sketch of a {}",
    "This sketch contains a {}", "A sketch of a {}", "This is a diagram of a {}", "This diagram contains a {}",
    "A diagram of a {}", "A {}", "We see a {}", "{}", "We see a {} in this photo", "We see a {} in this image",
    "We see a {} in this illustration", "We see a {} photo", "We see a {} image", "We see a {} illustration",
    "{} photo", "{} image", "{} illustration",
)

#: The composed query: S* ("$") and the relative caption ("{}"), as in SEARLE.
DEFAULT_TEMPLATE = "a photo of $ that {}"
#: The prompt of S* alone: what the inversion captured of the reference, without any caption.
ALONE_TEMPLATE = "a photo of $"
