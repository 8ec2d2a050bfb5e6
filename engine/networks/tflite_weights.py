"""Minimal reader for the MediaPipe .tflite files: ops, tensor shapes, constant weights.

Only what the PyTorch ports need: the operator list (in file order) with input/output tensor
indices and the few builtin options the ports check (stride, padding, fused activation), constant
buffers as float32 numpy arrays (a FLOAT16 constant followed by DEQUANTIZE is resolved to the
float32 tensor the DEQUANTIZE produces), and the FlexBuffer options of custom ops.

Weights are pulled into the torch modules by *walking the data flow*: a module knows which tensor
feeds it, asks for the op of a given kind that consumes that tensor (`TFLiteGraph.consumer`), checks
the weight shapes and returns the op's output tensor. A wrong guess fails on a shape assert.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_PADDING = {0: "SAME", 1: "VALID"}
_ACT = {0: None, 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH"}
# tflite.TensorType values -> numpy dtypes (FLOAT32 0, FLOAT16 1, INT32 2, UINT8 3, INT64 4, INT8 9)
_NP_DTYPE = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
# builtin name -> (options class, fields read as {key: getter name})
_OPTIONS = {
    "CONV_2D": ("Conv2DOptions", {"padding": "Padding", "stride_h": "StrideH", "stride_w": "StrideW",
                                  "act": "FusedActivationFunction"}),
    "DEPTHWISE_CONV_2D": ("DepthwiseConv2DOptions", {"padding": "Padding", "stride_h": "StrideH",
                                                      "stride_w": "StrideW", "act": "FusedActivationFunction",
                                                      "depth_multiplier": "DepthMultiplier"}),
    "MAX_POOL_2D": ("Pool2DOptions", {"padding": "Padding", "stride_h": "StrideH", "stride_w": "StrideW",
                                      "filter_h": "FilterHeight", "filter_w": "FilterWidth",
                                      "act": "FusedActivationFunction"}),
    "ADD": ("AddOptions", {"act": "FusedActivationFunction"}),
    "MUL": ("MulOptions", {"act": "FusedActivationFunction"}),
    "CONCATENATION": ("ConcatenationOptions", {"axis": "Axis", "act": "FusedActivationFunction"}),
}


@dataclass
class Op:
    index: int                 # position in the file's operator list
    kind: str                  # builtin name ("CONV_2D") or custom code ("TransformLandmarks")
    inputs: tuple[int, ...]    # tensor indices (-1 = optional input absent)
    outputs: tuple[int, ...]
    options: dict = field(default_factory=dict)
    custom: bool = False
    custom_options: object = None  # decoded FlexBuffer (dict) for custom ops


class TFLiteGraph:
    """Subgraph 0 of a .tflite file."""

    def __init__(self, path: str | Path):
        import tflite  # imported here so the torch modules load without it (e.g. from a state_dict)

        self.path = Path(path)
        self._buf = self.path.read_bytes()
        model = tflite.Model.GetRootAsModel(self._buf, 0)
        g = model.Subgraphs(0)
        self.names = [g.Tensors(i).Name().decode() for i in range(g.TensorsLength())]
        self.shapes = [tuple(int(s) for s in g.Tensors(i).ShapeAsNumpy()) if g.Tensors(i).ShapeLength() else ()
                       for i in range(g.TensorsLength())]
        self.inputs = [int(i) for i in g.InputsAsNumpy()]
        self.outputs = [int(i) for i in g.OutputsAsNumpy()]

        self._const: dict[int, np.ndarray] = {}
        for i in range(g.TensorsLength()):
            t = g.Tensors(i)
            data = model.Buffers(t.Buffer()).DataAsNumpy() if t.Buffer() > 0 else 0
            if isinstance(data, np.ndarray) and data.size:
                arr = np.frombuffer(data.tobytes(), dtype=_NP_DTYPE[t.Type()]).reshape(self.shapes[i])
                self._const[i] = arr

        self.ops: list[Op] = []
        for k in range(g.OperatorsLength()):
            o = g.Operators(k)
            code = model.OperatorCodes(o.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            name = tflite.opcode2name(builtin)
            ins = tuple(int(i) for i in o.InputsAsNumpy())
            outs = tuple(int(i) for i in o.OutputsAsNumpy())
            if name == "DEQUANTIZE" and ins[0] in self._const:
                self._const[outs[0]] = self._const[ins[0]].astype(np.float32)
                continue
            op = Op(index=k, kind=name, inputs=ins, outputs=outs)
            if name == "CUSTOM":
                op.kind = code.CustomCode().decode()
                op.custom = True
                if not o.CustomOptionsIsNone():
                    from flatbuffers import flexbuffers
                    op.custom_options = flexbuffers.Loads(o.CustomOptionsAsNumpy().tobytes())
            elif name in _OPTIONS:
                op.options = _read_options(o, *_OPTIONS[name])
            self.ops.append(op)
        self._consumers: dict[int, list[Op]] = {}
        self._producer: dict[int, Op] = {}
        for op in self.ops:
            for t in op.inputs:
                self._consumers.setdefault(t, []).append(op)
            for t in op.outputs:
                self._producer[t] = op

    # ---------------------------------------------------------------- queries
    def is_const(self, t: int) -> bool:
        return t in self._const

    def const(self, t: int) -> np.ndarray:
        """Constant tensor t (float weights as float32; int constants keep their dtype)."""
        arr = self._const[t]
        return arr.astype(np.float32) if arr.dtype == np.float16 else arr

    def consumers(self, t: int, kind: str | None = None) -> list[Op]:
        return [op for op in self._consumers.get(t, []) if kind is None or op.kind == kind]

    def consumer(self, t: int, kind: str, branch: int = 0) -> Op:
        """The `branch`-th op (file order) of type `kind` reading tensor t; raises if absent."""
        found = self.consumers(t, kind)
        if len(found) <= branch:
            raise ValueError(f"{self.path.name}: no {kind} #{branch} consumes tensor {t} "
                             f"({self.names[t]}); consumers: {[o.kind for o in self.consumers(t)]}")
        return found[branch]

    def producer(self, t: int) -> Op | None:
        return self._producer.get(t)

    def op_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            out[op.kind] = out.get(op.kind, 0) + 1
        return out

    def weights(self, op: Op) -> list[np.ndarray]:
        """The constant inputs of op, in input order."""
        return [self.const(t) for t in op.inputs if t >= 0 and self.is_const(t)]

    def data_input(self, op: Op, k: int = 0) -> int:
        """The k-th non-constant input tensor of op."""
        return [t for t in op.inputs if t >= 0 and not self.is_const(t)][k]


def _read_options(o, cls_name: str, fields: dict) -> dict:
    import tflite

    table = o.BuiltinOptions()
    if table is None:
        return {}
    opt = getattr(tflite, cls_name)()
    opt.Init(table.Bytes, table.Pos)
    out = {k: getattr(opt, getter)() for k, getter in fields.items()}
    if "padding" in out:
        out["padding"] = _PADDING[out["padding"]]
    if "act" in out:
        out["act"] = _ACT.get(out["act"], out["act"])
    return out
