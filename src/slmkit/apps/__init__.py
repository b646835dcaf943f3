"""Task-specific model families built on slmkit's engine (formula solving, decompilation, vision-language):
a model or pipeline for one kind of input, with its own data handling and evaluation. See ``README.md``."""
