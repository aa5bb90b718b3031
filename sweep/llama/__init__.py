"""llama.cpp: the one owner of llama_cpp. A context and its decode (backend), its eval callback and the node observers
and replacements registered with it (observe), the tensor struct it reads and the matmul view (ggml_tensor), ggml's
quantizers and llama_model_quantize (quantize), GGUF files over the C API (gguf_reader), a tensor's block in its
name (gguf_names), the cache's layout (cache), the containers a model is scored in (container), the model file's
header and hash (model_file), what a model needs in memory and on disk (capacity), MoE routing read from the graph
(routing), native weights' deltas (weight_delta), the RPC backend (rpc), and prefix reuse's C side: stage files
(stage_file), decoding from embeddings (embd), a stage under the full model's names (stage_view), a stage's
preconditions and probe (stage_check), a window timed per block (block_timing)."""
