"""Mixed-precision recipes, step by step: read the tables (table), the sizes (sizes), solve (solve), export
recipe.txt/recipe.json (export), build with llama.cpp's quantizer (build), validate on held-out text (validate);
`python -m sweep.recipe` (command) runs them in that order."""
