"""`gptlab generate` for encoder-decoder Transformer checkpoints (cli.py); their decoding is gptlab.generation.seq2seq."""
