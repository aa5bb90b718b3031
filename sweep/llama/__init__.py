"""llama.cpp: the one owner of llama_cpp. A context and its decode with the eval hook and the matmul observer
(backend), the tensor struct it reads and the matmul view (ggml_tensor), ggml's quantizers and llama_model_quantize
(quantize), GGUF files over the C API (gguf_reader), the containers a model is scored in (container), the model
file's header and hash (model_file), and the RPC backend (rpc)."""
