"""What is applied: the number formats (formats, ggml_types for the GGUF quant types), which tensor or graph node
(targets, with its node-name rules), how it is applied with its proof (apply), and the files the quantizers read:
recipe.json as a per-tensor map of types (recipe_types) and llama.cpp's importance matrix (imatrix_file)."""
