"""Transcription with exported model folders: ``Transcriber`` (files, waveforms, long audio)
and CTC word-LM decoding (``inference.word_lm``).

    from inference import Transcriber
    asr = Transcriber.from_folder("demo_results/inference")
    print(asr.transcribe_files(["a.wav"]))
"""

from inference.transcriber import Transcriber, TranscriberError

__all__ = ["Transcriber", "TranscriberError"]
