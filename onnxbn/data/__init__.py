"""Calibration and training data: `sources` (open_data: folders, .npz, arrays, ONNX test-data folders),
`images` (decoding and the preprocessing presets), `streams` (iterables of batches, torch datasets)."""
