"""MoRAG: media and document processing on CPU and remote GPU workers."""

__version__ = "0.1.0"
