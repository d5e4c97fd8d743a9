"""Data files of the ONNX backend (the all-MiniLM-L6-v2 tokenizer); a package so setuptools ships them."""
