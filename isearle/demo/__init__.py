"""The demo's library side: everything `app.py` does besides drawing widgets (no gradio here).

`app.py` wires widgets to a `DemoEngine` (engine): it opens the configured galleries (galleries:
the bundled offline shapes world, or a real CLIP over an image folder or a Hugging Face dataset,
built once and cached), checks inputs (inputs), runs composed queries through the cached
`Session`, marks ShapesCIR ground truths (examples), explains the pseudo-word S* (vocabulary,
charts) and serves thumbnails (media). Settings are CLI flags with ISEARLE_* defaults (settings);
`python -m isearle.demo` builds the offline gallery and the examples file.

The names below are the package's public surface, re-exported from the module that defines each.
"""

from isearle.demo.charts import bar_chart
from isearle.demo.engine import CONCEPT_TEMPLATE, DemoEngine
from isearle.demo.examples import (
    EXAMPLES_PATH,
    PHOTO_CAPTIONS,
    SHAPES_CAPTIONS,
    Example,
    Examples,
    GroundTruth,
    caption_key,
    load_examples,
    make_examples,
)
from isearle.demo.galleries import (
    BENCHMARK,
    GalleryEntry,
    build_shapes_gallery,
    build_test_world,
    ensure_offline_gallery,
    hub_gallery_dir,
    offline_gallery_stale,
    open_service,
)
from isearle.demo.inputs import (
    MAX_CAPTION_CHARS,
    MAX_UPLOAD_BYTES,
    CaptionError,
    PreparedCaption,
    clean_caption,
    load_reference,
    prepare_caption,
)
from isearle.demo.media import (
    REFERENCE_SIZE,
    THUMB_SIZE,
    ThumbnailCache,
    gallery_image,
    item_spec,
    render_spec,
)
from isearle.demo.results import METHOD_LABELS, Explanation, ResultItem, SearchResult
from isearle.demo.settings import (
    DEFAULT_OTI_STEPS,
    SETTINGS,
    Setting,
    add_arguments,
    entries_from_args,
    settings_table,
)
from isearle.demo.texts import (
    GLOSSARY,
    STEPS_RANGE,
    TOP_K_RANGE,
    WORDS_NOTE,
    SharedQuery,
    intro,
    read_query,
    share_link,
)
from isearle.errors import IsearleError
from isearle.paths import ASSETS_DIR, public_name
from isearle.runtime import set_threads
from isearle.service import (
    SHAPES_MODELS,
    Session,
    TokenTable,
    readable_token,
    trained_token_ids,
    world_token_ids,
)

__all__ = [
    "BENCHMARK", "CONCEPT_TEMPLATE", "DEFAULT_OTI_STEPS", "EXAMPLES_PATH", "MAX_CAPTION_CHARS", "MAX_UPLOAD_BYTES",
    "METHOD_LABELS", "PHOTO_CAPTIONS", "REFERENCE_SIZE", "SETTINGS", "SHAPES_CAPTIONS", "SHAPES_MODELS",
    "THUMB_SIZE", "CaptionError", "DemoEngine", "Example", "Examples", "Explanation", "GalleryEntry",
    "GroundTruth", "IsearleError", "PreparedCaption", "ResultItem", "SearchResult", "Session", "Setting", "ThumbnailCache",
    "TokenTable", "add_arguments", "bar_chart", "build_shapes_gallery", "build_test_world", "caption_key",
    "clean_caption", "ensure_offline_gallery", "entries_from_args", "gallery_image", "hub_gallery_dir",
    "item_spec", "load_examples", "load_reference", "make_examples", "offline_gallery_stale", "open_service",
    "prepare_caption", "readable_token", "render_spec", "set_threads", "settings_table", "trained_token_ids", "world_token_ids",
    "ASSETS_DIR", "GLOSSARY", "STEPS_RANGE", "TOP_K_RANGE", "WORDS_NOTE", "SharedQuery", "intro",
    "public_name", "read_query", "share_link",
]
