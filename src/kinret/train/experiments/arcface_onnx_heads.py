"""The `sface_heads` grid on a competitor's own ONNX face network (insightface's buffalo_l `w600k_r50.onnx`,
antelopev2's `glintr100.onnx`, or an export of your own), frozen, its features computed once and cached.

The graph is not shipped: give it with `--set weights=FILE.onnx` (`python -m kinret.train` / `kinret.grid`) or
`--set arcface_onnx_heads:weights=FILE.onnx` (`make_submission.py`, `kinret.ensemble`); without it the run stops
with a message saying so. insightface's packs want RGB, (x - 127.5) / 127.5 (`input_convention=insightface`); a
network trained otherwise declares its own (`kinret.models.onnx_net.CONVENTIONS`). The same folds as the default
grid, so its variants join the default's table and blend: `make_submission.py --experiments sface_heads
sface_finetune arcface_onnx_heads --set arcface_onnx_heads:weights=FILE.onnx`.
"""
from dataclasses import replace

from kinret.train.experiments import load_experiment

_heads, GRID = load_experiment("sface_heads")
cfg = replace(_heads, name="arcface_onnx_heads", backbone="onnx", weights="", input_convention="insightface")
