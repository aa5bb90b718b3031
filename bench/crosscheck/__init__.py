"""Cross-checks: the same numbers computed two ways (llama.cpp's own tools, another backend, prefix reuse off, another
container)."""
