"""Infrastructure for files: atomic writes and swaps of outputs (``atomic``), safetensors reading and
the refusal of pickled weights (``safetensors``)."""
