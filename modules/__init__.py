"""Model code: the Mamba core (``modules.mamba``), the ConMamba and Mamba encoders, the Mamba
decoder, SpeechBrain's TransformerASR with them plugged in, and stateful beam search."""
