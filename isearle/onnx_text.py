"""The warm query's text pass on ONNX Runtime (optional): a caption's tokens after a cached prompt start.

At batch 1 and a dozen tokens, PyTorch's eager CPU path spends a text pass in matrix products whose
weights are re-packed at every call and in per-operator overhead. ONNX Runtime runs the same graph
with pre-packed weights and fused kernels. The graph is `prefix_cache.continue_blocks` (the text
blocks after a prefix's keys/values, then the final LayerNorm and projection), exported once per
backbone by `torch.onnx.export` (dynamo) with the caption and the prefix lengths left free. It
computes in fp32 and equals the PyTorch pass up to rounding (tests/test_onnx_text.py).
`Retriever.set_precision("auto")` uses it only where onnxruntime is installed, the model is a
supported CPU text tower, and it measures faster.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os

import torch

from isearle.backbone import Backbone
from isearle.prefix_cache import continue_blocks, supported

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

    def __init__(self, backbone: Backbone, threads: int | None = None) -> None:
        import onnxruntime as ort

        text = backbone.text
        layers, width = len(text.transformer.resblocks), backbone.token_width
        context = backbone.context_length
        x, past = torch.zeros(1, 8, width), torch.zeros(layers, 2, 1, 6, width)
        t, p = torch.export.Dim("caption", min=2, max=context), torch.export.Dim("prefix", min=2, max=context)
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its steps
            program = torch.onnx.export(_Continuation(backbone).eval(), (x, past), dynamo=True, verbose=False,
                                        dynamic_shapes=({1: t}, {3: p}))
            program.optimize()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(program.model_proto.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        log.info("text continuation exported to ONNX Runtime (%d threads)", options.intra_op_num_threads)

    def __call__(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """Feature [1, D] of the last position of x [1, T >= 2, W] after keys/values [L, 2, 1, P >= 2, W]."""
        feeds = {self.names[0]: x.detach().float().cpu().numpy(), self.names[1]: past.detach().float().cpu().numpy()}
        return torch.from_numpy(self.session.run(None, feeds)[0])
