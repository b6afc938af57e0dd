"""LLaMA-style decoder and its named sizes."""
from megareweight.model.llama import MODEL_SIZES, ModelArgs, Transformer, build_model, count_parameters, model_args

__all__ = ["MODEL_SIZES", "ModelArgs", "Transformer", "build_model", "count_parameters", "model_args"]
