"""ICT-FaceKit's 53 expressions <-> Apple ARKit's 52 blendshapes.

Left/right is the subject's own on both sides (ICT ``_L`` = ARKit ``...Left``); nothing is mirrored.
The mapping is a fixed linear map, ``arkit = exp @ ICT_TO_ARKIT``.
"""
from __future__ import annotations

import numpy as np

# ARKit / Live Link index order (protocols.md section 2a; UE EARFaceBlendShape).
ARKIT_NAMES: tuple[str, ...] = (
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft",
    "eyeSquintLeft", "eyeWideLeft", "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight",
    "eyeLookOutRight", "eyeLookUpRight", "eyeSquintRight", "eyeWideRight", "jawForward",
    "jawLeft", "jawRight", "jawOpen", "mouthClose", "mouthFunnel",
    "mouthPucker", "mouthLeft", "mouthRight", "mouthSmileLeft", "mouthSmileRight",
    "mouthFrownLeft", "mouthFrownRight", "mouthDimpleLeft", "mouthDimpleRight", "mouthStretchLeft",
    "mouthStretchRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthPressLeft", "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthUpperUpLeft",
    "mouthUpperUpRight", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft",
    "browOuterUpRight", "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "noseSneerLeft",
    "noseSneerRight", "tongueOut",
)

# ICT-FaceKit expression names in the model file's order (ict_face_model.npz `exp_names`).
ICT_EXP_NAMES: tuple[str, ...] = (
    "browDown_L", "browDown_R", "browInnerUp_L", "browInnerUp_R", "browOuterUp_L",
    "browOuterUp_R", "cheekPuff_L", "cheekPuff_R", "cheekSquint_L", "cheekSquint_R",
    "eyeBlink_L", "eyeBlink_R", "eyeLookDown_L", "eyeLookDown_R", "eyeLookIn_L",
    "eyeLookIn_R", "eyeLookOut_L", "eyeLookOut_R", "eyeLookUp_L", "eyeLookUp_R",
    "eyeSquint_L", "eyeSquint_R", "eyeWide_L", "eyeWide_R", "jawForward",
    "jawLeft", "jawOpen", "jawRight", "mouthClose", "mouthDimple_L",
    "mouthDimple_R", "mouthFrown_L", "mouthFrown_R", "mouthFunnel", "mouthLeft",
    "mouthLowerDown_L", "mouthLowerDown_R", "mouthPress_L", "mouthPress_R", "mouthPucker",
    "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthSmile_L", "mouthSmile_R", "mouthStretch_L", "mouthStretch_R", "mouthUpperUp_L",
    "mouthUpperUp_R", "noseSneer_L", "noseSneer_R",
)

MAPPING_NOTES = (
    "ICT-FaceKit (53) -> ARKit (52). Left/right is the subject's own on both sides: ICT X_L -> ARKit XLeft, "
    "X_R -> XRight; the other 47 names map one to one. Merged: ARKit browInnerUp = mean(browInnerUp_L, "
    "browInnerUp_R) and cheekPuff = mean(cheekPuff_L, cheekPuff_R) (ARKit has one symmetric shape for "
    "each). Missing: ARKit tongueOut has no ICT shape and is always 0. Not used: ICT's extra cheekRaiser_L/_R "
    "and PupilDilate_L/_R shapes are outside the 53-expression list (ICT maps AU6 to cheekSquint). The inverse "
    "(arkit_to_ict) copies browInnerUp and cheekPuff to both halves and drops tongueOut. Gaze (eyeLook*) "
    "moves only the eyelids in ICT; eyeball rotation is separate (FaceModel.eyeball_rotate)."
)


def _ict_to_arkit_name(name: str) -> str:
    if name.endswith("_L"):
        return name[:-2] + "Left"
    if name.endswith("_R"):
        return name[:-2] + "Right"
    return name


def _build_matrix() -> np.ndarray:
    M = np.zeros((len(ICT_EXP_NAMES), len(ARKIT_NAMES)), np.float32)
    for i, name in enumerate(ICT_EXP_NAMES):
        target = _ict_to_arkit_name(name)
        if target in ARKIT_NAMES:
            M[i, ARKIT_NAMES.index(target)] = 1.0
        else:  # a pair ARKit keeps as one symmetric shape: average the halves
            merged = name[:-2]
            assert merged in ARKIT_NAMES, name
            M[i, ARKIT_NAMES.index(merged)] = 0.5
    return M


ICT_TO_ARKIT: np.ndarray = _build_matrix()  # (53, 52)
ICT_TO_ARKIT.setflags(write=False)
# (52, 53): the merged ARKit shapes go to both ICT halves; tongueOut is dropped.
ARKIT_TO_ICT: np.ndarray = (ICT_TO_ARKIT > 0).T.astype(np.float32)
ARKIT_TO_ICT.setflags(write=False)

MERGED = {"browInnerUp": ("browInnerUp_L", "browInnerUp_R"), "cheekPuff": ("cheekPuff_L", "cheekPuff_R")}
MISSING = ("tongueOut",)


def ict_to_arkit(exp, clip: bool = True) -> np.ndarray:
    """ICT expression weights (..., 53) -> ARKit blendshapes (..., 52) in ``ARKIT_NAMES`` order.

    With ``clip`` (default) the result is clamped to [0, 1], the ARKit range; inputs in [0, 1]
    already give outputs in [0, 1].
    """
    exp = np.asarray(exp, np.float32)
    if exp.shape[-1:] != (len(ICT_EXP_NAMES),):
        raise ValueError(f"expected (..., {len(ICT_EXP_NAMES)}) ICT weights, got {exp.shape}")
    out = exp @ ICT_TO_ARKIT
    return np.clip(out, 0.0, 1.0) if clip else out


def arkit_to_ict(arkit) -> np.ndarray:
    """ARKit blendshapes (..., 52) -> ICT weights (..., 53) (merged shapes copied to both halves)."""
    arkit = np.asarray(arkit, np.float32)
    if arkit.shape[-1:] != (len(ARKIT_NAMES),):
        raise ValueError(f"expected (..., {len(ARKIT_NAMES)}) ARKit weights, got {arkit.shape}")
    return arkit @ ARKIT_TO_ICT


def ict_to_arkit_dict(exp) -> dict[str, float]:
    """One face's ICT weights (53,) -> {ARKit name: value}, ARKit order."""
    return dict(zip(ARKIT_NAMES, (float(v) for v in ict_to_arkit(exp))))
