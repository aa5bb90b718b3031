"""llama.cpp's importance matrix computed inside llama.cpp's own graph (compute); `python -m sweep.imatrix`."""
