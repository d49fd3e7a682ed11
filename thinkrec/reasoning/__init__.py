"""Thinking-activation data (paper appendix C.1, C.2): reasoning traces from a teacher through the reflect
loop (`synth`), and item keywords (`keywords`); `python -m thinkrec.reasoning synth|keywords`.

Layers: `teacher` (OpenAI-compatible HTTP client with retries, a local transformers model) -> `reflect` (one
sample's conversation) -> `synth` (selection, concurrency, resumable JSON Lines) and `keywords`.
"""
