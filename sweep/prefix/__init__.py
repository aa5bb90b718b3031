"""Prefix reuse: a point that perturbs block L decodes from a stage file of blocks S..N-1 (S <= L) fed the stored
residual stream, bit-identical to the full decode. Which stages pay, in seconds and bytes, chosen before launch
(plan, with the exact solver in solve); the stages, their residuals and each point's stage or fallback (reuse).
The C-facing stage code stays in sweep/llama/ (stage_file, stage_view, embd, stage_check, block_timing);
docs/prefix.md."""
