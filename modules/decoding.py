"""Stateful beam search for the Mamba decoder.

SpeechBrain's S2STransformerBeamSearcher re-runs the decoder over the whole prefix at every step
(for a Mamba decoder the cross-Mamba rescans [memory; prefix]): a step costs
O(len(memory) + len(prefix)). S2SMambaBeamSearcher keeps, per hypothesis and layer, the self-Mamba
and cross-Mamba recurrent caches: the cross-Mamba state after each utterance's valid memory is
computed once, then every new token is one recurrent step, whatever the prefix length. Scores
equal the stateless recomputation.
"""

import torch

from speechbrain.decoders.seq2seq import S2STransformerBeamSearcher

from modules.mamba_decoder import MambaDecoderState


class S2SMambaBeamSearcher(S2STransformerBeamSearcher):
    """Drop-in replacement of S2STransformerBeamSearcher (same arguments).

    With a model whose ``decoder_module`` is "mamba" (modules.TransformerASR) decoding is stateful;
    with any other decoder, or ``stateful=False``, it is SpeechBrain's stateless search.

    Arguments
    ---------
    modules : [TransformerASR, seq_lin]
    temperature : float
        Softmax temperature, as in S2STransformerBeamSearcher.
    stateful : bool
        False forces the stateless recomputation (for comparisons and benchmarks).
    **kwargs
        S2SBeamSearcher arguments (bos_index, eos_index, beam_size, scorer, ...).
    """

    def __init__(self, modules, temperature=1.0, stateful=True, **kwargs):
        super().__init__(modules, temperature=temperature, **kwargs)
        self.stateful = stateful

    def _is_stateful(self):
        return self.stateful and getattr(self.model, "decoder_module", None) == "mamba"

    def reset_mem(self, batch_size, device):
        """No state yet: it needs the encoder states, which reset_mem does not receive, so it is
        built at the first forward_step."""
        return None

    def _initial_state(self, enc_states, enc_lens):
        """State for the (batch * beam) hypotheses; each utterance's memory is scanned once."""
        n, beam = enc_states.shape[0], self.beam_size
        if n % beam:  # not inflated by beam_size: scan every row
            return self.model.init_decoder_state(enc_states, enc_lens)
        state = self.model.init_decoder_state(enc_states[::beam], enc_lens[::beam])
        rows = torch.arange(n // beam, device=enc_states.device).repeat_interleave(beam)
        return state.index_select(rows)

    def forward_step(self, inp_tokens, memory, enc_states, enc_lens):
        """inp_tokens (N,) -> log-probs (N, vocab), new memory, attention (None for Mamba)."""
        if not self._is_stateful():
            return super().forward_step(inp_tokens, memory, enc_states, enc_lens)
        if memory is None:
            memory = self._initial_state(enc_states, enc_lens)
        pred = self.model.decode_step(inp_tokens, memory)  # (N, 1, D)
        log_probs = self.softmax(self.fc(pred) / self.temperature)
        return log_probs[:, -1, :], memory, None

    def permute_mem(self, memory, index):
        """Reorder the hypotheses' states after beam pruning (index: (N,) predecessors)."""
        if isinstance(memory, MambaDecoderState):
            return memory.index_select(index)
        return super().permute_mem(memory, index)
