"""crawler: fetch image URLs, store each image once by content hash, thumbnail and hash it."""

__version__ = "0.1.0"
