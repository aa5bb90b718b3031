"""Scoring: the text (text), llama.cpp's perplexity protocol in windows (windows, perplexity), the window math
(window_math), the metrics and their statistics (metrics), a recipe's additivity prediction (additivity) and the
greedy generation check (generation)."""
