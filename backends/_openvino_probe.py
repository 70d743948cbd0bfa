"""Child process: which nodes OpenVINO's ONNX frontend leaves unconverted.

``python -P backends/_openvino_probe.py MODEL.onnx`` (it imports nothing of adapter's) prints one JSON line
``{"framework_nodes": [...]}``, or ``{"error": "..."}`` when the frontend rejects the
file. It runs apart from adapter's process because the frontend is native code reading
a user's model: a damaged file has crashed it (SIGSEGV), and that must end this probe,
not the command the user ran (SECURITY.md: untrusted compiles in a subprocess).
"""

from __future__ import annotations

import json
import sys


def framework_nodes(path: str) -> list[str]:
    import openvino as ov

    frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")
    converted = frontend.convert_partially(frontend.load(path))
    names: set[str] = set()
    for op in converted.get_ops():
        if "FrameworkNode" in op.get_type_name():
            # a node feeding a graph output takes the output's name as its friendly name,
            # so its output tensor names identify it too
            names.add(op.get_friendly_name())
            for output in op.outputs():
                names.update(output.get_names())
    return sorted(names)


def main(argv: list[str]) -> int:
    try:
        answer = {"framework_nodes": framework_nodes(argv[0])}
    except Exception as exc:  # the frontend's own refusal, reported to the parent
        text = " ".join(str(exc).split())
        answer = {"error": f"{type(exc).__name__}: {text[:600]}"}
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
