"""MetaSchedule tuning of a fixed-shape ONNX graph, run in its own process.

``python -P backends/_tvm_tune.py MODEL.onnx TARGET_JSON TRIALS WORK_DIR`` (nothing of adapter's) imports the
graph with TVM's ONNX frontend and runs Relax's ``static_shape_tuning`` pipeline, which
writes MetaSchedule's JSON database (workloads and tuning records) into WORK_DIR. The TVM
backend then applies that database in its own process (``total_trials=0``). Tuning runs
apart because a crash inside MetaSchedule (apache-tvm 0.27.0.post1 segfaults here in
``tvm::ffi::ToJSONGraph`` on its first task) must not take the caller down with it.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    model_path, target_json, trials, work_dir = argv
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    target = tvm.target.Target(json.loads(target_json))
    mod = from_onnx(onnx.load(model_path), keep_params_in_input=False)
    with target:
        relax.get_pipeline("static_shape_tuning", target=target, total_trials=int(trials), work_dir=work_dir)(mod)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
