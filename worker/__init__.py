"""Worker process: loads one alignment engine once and aligns one file at a time on request."""
