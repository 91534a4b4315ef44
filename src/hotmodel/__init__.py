"""hotmodel: a small, fast control plane for llama.cpp's llama-server router."""

__version__ = "0.1.0"
