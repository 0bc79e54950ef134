"""audiohash: distributed batch indexing for audio retrieval with supervised deep hashing."""
__version__ = "0.1.0"
