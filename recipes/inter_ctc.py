"""Intermediate CTC (Lee & Watanabe, ICASSP 2021, arXiv:2102.03216): the CTC loss is also taken
on the output of a middle encoder layer, through the encoder's final LayerNorm and the same
output layer, and mixed into the loss:

    loss = (1 - w) * CTC(final layer) + w * CTC(layer k)

It regularises the lower layers at the cost of one extra LayerNorm, linear layer and CTC loss per
batch, and changes nothing at inference (the exported model is the same). YAML keys of the CTC
recipe: ``inter_ctc_weight`` (w; 0 = off) and ``inter_ctc_layer`` (k, 1-based; null = half the
encoder layers).
"""

import contextlib

from recipes import RecipeError


def inter_ctc_layer(hparams):
    """The validated (weight, layer) of hparams; weight 0.0 means off (layer then None)."""
    weight = float(hparams.get("inter_ctc_weight") or 0.0)
    if not 0.0 <= weight < 1.0:
        raise RecipeError(f"inter_ctc_weight is {weight}: give a value in [0, 1) (0 turns "
                          "intermediate CTC off; 0.3 is the paper's)")
    if weight == 0.0:
        return 0.0, None
    layers = int(hparams["num_encoder_layers"])
    layer = hparams.get("inter_ctc_layer")
    layer = layers // 2 if layer is None else int(layer)
    if not 1 <= layer < layers:
        raise RecipeError(f"inter_ctc_layer is {layer} with num_encoder_layers {layers}: give a "
                          f"layer from 1 to {layers - 1} (null = {layers // 2}, the middle one)")
    return weight, layer


@contextlib.contextmanager
def layer_output(model, layer):
    """While active, the output (B, L, D) of layer ``layer`` (1-based) of model's encoder in a
    forward pass is kept (the first call's only: a checkpointed layer runs again in the
    backward); on leaving the block it goes through the encoder's final LayerNorm into the
    yielded dict under "out". The hook itself computes nothing: inside a gradient-checkpointed
    layer, an operation in the first forward only would change what the recomputation saves.
    model: the TransformerASR, or its DistributedDataParallel wrapper. Nothing is kept when
    layer is None or the layer was dropped (layerdrop)."""
    kept = {}
    if layer is None:
        yield kept
        return
    encoder = getattr(model, "module", model).encoder

    def keep(module, args, output):
        kept.setdefault("raw", output[0] if isinstance(output, tuple) else output)

    handle = encoder.layers[layer - 1].register_forward_hook(keep)
    try:
        yield kept
    finally:
        handle.remove()
    if "raw" in kept:
        kept["out"] = encoder.norm(kept.pop("raw"))
