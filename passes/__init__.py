"""Passes on the ONNX IR (calibrate, measure, allocate, outliers, quantize, fuse) and the weight formats."""
