"""The warm query's text pass on ONNX Runtime (optional): a caption's tokens after a cached prompt start.

At batch 1 and a dozen tokens, PyTorch's eager CPU path spends a text pass in matrix products whose
weights are re-packed at every call and in per-operator overhead. ONNX Runtime runs the same graph
with pre-packed weights and fused kernels. The graph is `prefix_cache.continue_blocks` (the text
blocks after a prefix's keys/values, then the final LayerNorm and projection), exported once per
weights by `torch.onnx.export` (dynamo) with the caption and the prefix lengths left free, and kept
on disk (`paths.CACHE_DIR`/onnx, keyed by `keys.cache_key`: the weights' fingerprint and the torch
version that exported it), so a second start reads it instead of exporting again. It computes in
fp32 and equals the PyTorch pass up to rounding (tests/test_onnx_text.py). `tuning.tune("auto")`
uses it only where onnxruntime is installed, the model is a supported CPU text tower, and it
measures faster.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
from pathlib import Path

import torch

from isearle import paths
from isearle.artifacts import atomic_path
from isearle.backbone import Backbone
from isearle.keys import cache_key
from isearle.prefix_cache import continue_blocks, supported

#: Version of the exported graph's inputs and outputs; part of its cache key.
GRAPH_FORMAT = 1

log = logging.getLogger(__name__)


def available(backbone: Backbone) -> bool:
    """Whether the continuation can run on ONNX Runtime: the packages are installed, the model is on
    the CPU and its text tower has the structure `prefix_cache` re-implements."""
    have = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript"))
    return have and backbone.device.type == "cpu" and backbone.precision != "bf16" and supported(backbone)


class _Continuation(torch.nn.Module):
    """x [1, T, W], keys/values [layers, 2, 1, P, W] -> feature [1, D]: what gets exported."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return continue_blocks(self.backbone, x, [(past[i, 0], past[i, 1]) for i in range(past.shape[0])])


class OnnxText:
    """The exported continuation graph in an ONNX Runtime session; call it as `engine(x, past)`.

    Threads: as many as torch uses; ONNX Runtime's workers spin between calls unless
    OMP_WAIT_POLICY=PASSIVE asks the process not to (the same choice as torch's OpenMP threads).
    """

    def __init__(self, backbone: Backbone, threads: int | None = None, cache: bool = True) -> None:
        import onnxruntime as ort

        path = graph_path(backbone) if cache else None
        graph = path.read_bytes() if path is not None and path.is_file() else None
        self.exported = graph is None  # False: read from the disk cache
        if graph is None:
            graph = export(backbone)
            if path is not None:
                with atomic_path(path) as tmp:  # a crash never leaves half a graph
                    Path(tmp).write_bytes(graph)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        except Exception:  # a damaged cached graph: export it again (ONNX Runtime raises its own types)
            if self.exported:
                raise
            log.warning("the cached ONNX graph %s is unreadable: exporting it again", path)
            graph, self.exported = export(backbone), True
            with atomic_path(path) as tmp:
                Path(tmp).write_bytes(graph)
            self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        log.info("text continuation %s ONNX Runtime (%d threads)", "exported to" if self.exported else "read from disk for",
                 options.intra_op_num_threads)

    def __call__(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """Feature [1, D] of the last position of x [1, T >= 2, W] after keys/values [L, 2, 1, P >= 2, W]."""
        feeds = {self.names[0]: x.detach().float().cpu().numpy(), self.names[1]: past.detach().float().cpu().numpy()}
        return torch.from_numpy(self.session.run(None, feeds)[0])


def graph_path(backbone: Backbone) -> Path | None:
    """Where the exported graph of these weights is kept; None for random-init weights (never cached)."""
    key = cache_key(backbone.name, backbone.pretrained, graph="text-continuation", format=GRAPH_FORMAT,
                    torch=torch.__version__)
    return None if key is None else paths.CACHE_DIR / "onnx" / f"{key}.onnx"


def export(backbone: Backbone) -> bytes:
    """The continuation graph of `backbone` as ONNX bytes (caption and prefix lengths free)."""
    text = backbone.text
    layers, width = len(text.transformer.resblocks), backbone.token_width
    context = backbone.context_length
    x, past = torch.zeros(1, 8, width), torch.zeros(layers, 2, 1, 6, width)
    t, p = torch.export.Dim("caption", min=2, max=context), torch.export.Dim("prefix", min=2, max=context)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its steps
        program = torch.onnx.export(_Continuation(backbone).eval(), (x, past), dynamo=True, verbose=False,
                                    dynamic_shapes=({1: t}, {3: p}))
        program.optimize()
    return program.model_proto.SerializeToString()
