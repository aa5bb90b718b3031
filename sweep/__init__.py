"""sweep: which layers and tensors of a GGUF model are sensitive to reduced precision.

The pipeline, one module per step:
  model_file  -> find, validate and describe the GGUF file; build its F32 container
  text        -> the evaluation text (WikiText-2 test)
  formats     -> *which format*: fake quantizers built on ml_dtypes
  targets     -> *which tensor*: weight tensors and graph nodes, resolved per layer
  backend     -> *how to apply it*: the only module that talks to llama.cpp
  perplexity  -> llama-perplexity's protocol on top of the backend
"""

__version__ = "0.1.0"
