"""The bundled example LM as a model directory: ``graphpress compress --model examples/tiny_llama``."""

from .model import TinyLlama, TinyLlamaConfig, calibration_batches, example_inputs, load_model, tokenize

__all__ = ["TinyLlama", "TinyLlamaConfig", "calibration_batches", "example_inputs", "load_model", "tokenize"]
