"""Int8 post-training quantisation of the bundled network (OpenVINO + NNCF) against fp32 (issue 30).

Not part of the product (``research/`` is not installed; NNCF is not a dependency:
``pip install nncf``). It quantises ``model.onnx`` with NNCF's default post-training
quantisation on a few windows of a prepared pair, then runs one static window with each model on
the CPU, several times, and prints the fastest run and the outputs' agreement (segmentation
arg-max, DVF difference).

Usage::

    python research/int8_ptq.py --model models/crossstitch/3 --pair PAIR.npz [--window 140]

``PAIR.npz`` holds ``fixed``, ``moving`` and ``labels`` (nz, ny, nx) arrays on the 1 mm network
grid, network intensities (as `jrs.inference.preprocess.prepare_pair` makes them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np


def _window(pair: Any, start: tuple[int, int, int], n: int) -> dict[str, np.ndarray]:
    z, y, x = start
    s = np.s_[z : z + n, y : y + n, x : x + n]
    return {
        "fixed": pair["fixed"][s][None, None].astype(np.float32),
        "moving": pair["moving"][s][None, None].astype(np.float32),
        "moving_labels": pair["labels"][s][None, None].astype(np.float32),
    }


def main() -> None:
    """Quantise, time and compare (prints a few lines)."""
    import nncf
    import openvino as ov

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--pair", type=Path, required=True)
    parser.add_argument("--window", type=int, default=140)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    core = ov.Core()
    model = core.read_model(str(args.model / "model.onnx"))
    pair = np.load(args.pair)
    n = args.window
    dz, dy, dx = (max(s - n, 0) for s in pair["fixed"].shape)
    calib = [_window(pair, (z, y, 0), n) for z in (0, dz) for y in (0, dy)]
    same = _window(pair, (dz // 2, dy // 2, dx // 2), n)
    same["fixed"] = same["moving"]  # a null pair among the calibration windows
    calib.append(same)
    test = _window(pair, (dz // 3, dy // 3, dx // 3), n)
    t0 = time.perf_counter()
    quantised = nncf.quantize(model, nncf.Dataset(calib), subset_size=len(calib))
    print(f"quantisation: {time.perf_counter() - t0:.1f} s on {len(calib)} windows of {n}^3")  # noqa: T201
    outputs: dict[str, dict[str, np.ndarray]] = {}
    for name, m in (("fp32", model), ("int8", quantised)):
        m = m.clone()
        m.reshape({p.get_any_name(): [1, 1, n, n, n] for p in m.inputs})
        compiled = core.compile_model(
            m, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        )
        request = compiled.create_infer_request()
        request.infer(test)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            request.infer(test)
            times.append(time.perf_counter() - t)
        outputs[name] = {
            o.get_any_name(): np.array(request.get_tensor(o.get_any_name()).data)
            for o in compiled.outputs
        }
        print(f"{name}: fastest of {args.repeats} runs {min(times):.2f} s")  # noqa: T201
    for key, a in outputs["fp32"].items():
        b = outputs["int8"][key]
        line = f"{key}: max |diff| {np.abs(a - b).max():.3f}, mean {np.abs(a - b).mean():.4f}"
        if a.shape[1] == 5:
            line += f", arg-max agreement {(a.argmax(1) == b.argmax(1)).mean():.4f}"
        print(line)  # noqa: T201


if __name__ == "__main__":
    main()
