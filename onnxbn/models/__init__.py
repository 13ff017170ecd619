"""Model definitions onnxbn can export itself."""
