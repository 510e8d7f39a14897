"""Text generation: a causal language model, its decoding loop and the text it streams out.

`text.py` turns token ids into the text a client sees (incrementally, holding back what may become a
stop sequence); `sampling.py` picks the next token of each sequence; `model.py` loads a chat model (a
GGUF file or a transformers directory); `engine.py` runs the decoding loop on a worker thread, several
sequences decoded together, and hands each request its events on the event loop.
"""
