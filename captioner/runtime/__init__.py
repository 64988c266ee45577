"""How a loaded model computes: the inference path chosen for this CPU, and ONNX.

    precision.py    the inference paths (fp32, bf16, int8) and `auto`'s choice among them
    cpu.py          what this CPU computes natively; glibc's allocator tuned for long-running programs
    onnx_export.py  ONNX export, and the encoder quantised to int8
    onnxrt.py       an export's files, run by ONNX Runtime

Nothing is imported here: ONNX Runtime loads only when a path needs it.
"""
