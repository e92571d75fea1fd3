"""Readers of model files made elsewhere: GGUF (llama.cpp, ollama) for Llama-family language models."""
