"""Passes on the ONNX IR: calibrate, measure, allocate, outliers, quantize (GPTQ), fuse; and the weight formats."""
