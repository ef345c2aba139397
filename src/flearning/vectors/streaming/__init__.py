"""Knowledge vectors for checkpoints bigger than RAM: θ + λ·Δ and Δ = FT(θ) − θ, streamed from files.

Inputs are safetensors model directories (one file or sharded); nothing is loaded as a model, and
memory is a few blocks of rows whatever the model size. The format and the reasons are in
``docs/STREAMING.md``. Reading and writing safetensors is ``flearning.io.safetensors``; here: names
(``names``), fingerprints (``fingerprint``), block math (``blocks``), delta sources (``sources``),
``stream_apply`` (``apply``) and ``stream_difference`` / ``stream_lora_vector`` (``compute``).
"""

from flearning.vectors.streaming.apply import stream_apply
from flearning.vectors.streaming.blocks import StreamResult
from flearning.vectors.streaming.compute import stream_difference, stream_lora_vector
from flearning.vectors.streaming.fingerprint import checkpoint_fingerprint
from flearning.vectors.streaming.sources import VectorFiles, open_delta_source

__all__ = [
    "StreamResult",
    "VectorFiles",
    "checkpoint_fingerprint",
    "open_delta_source",
    "stream_apply",
    "stream_difference",
    "stream_lora_vector",
]
