"""Checkpoint formats: Hugging Face folders, GGUF files, and the registry of named models."""
