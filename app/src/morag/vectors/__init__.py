"""Ingestion: Markdown-aware chunking, sentence embeddings and the Qdrant vector store."""
