"""Bytes -> typed records with offsets: sources, toolstack wrappers, width and
guest inference, the reader and its records.  Knows nothing of guest images."""
