"""One-command GPU check of the Mamba selective-scan backends and of training on them.

    python -m benchmarks.gpu_check          # one NVIDIA GPU, a few minutes (stops adding rows
                                            # after --budget-s, 420 s by default); one table
    python -m benchmarks.gpu_check --cpu-dry-run   # the script itself on CPU: tiny shapes and
                                                   # models, torch backend, no figures worth
                                                   # reading (for testing the script)

Without a CUDA GPU (and without --cpu-dry-run) it says so and exits 0.

Rows of the table, per backend (cuda = mamba-ssm's kernel, if installed; triton; torch; ref):
  parity     out, last state and every gradient against ``selective_scan_ref``: float32 with TF32
             off (SpeechBrain switches TF32 matmuls on at import; this script switches them off
             for the parity rows) and bf16 inputs (against the reference on the same bf16 values,
             computed in float32); the worst relative error and which tensor it is.
  scan       forward (no grad) and forward+backward time (median of 5 after a warm-up) and peak
             memory above the inputs, bf16 u/delta/B/C/z in the layout a BiMamba layer passes
             (channels innermost, B and C shared by two channel groups), batch 32, d_inner 1024,
             d_state 16, L 250 and 875 (10 s and 35 s of audio after 4x subsampling).
  train      one bf16 training step (forward, CTC [+ decoder] loss, backward, AdamW step) of
             hparams/S2S/conmamba_large.yaml, hparams/CTC/conmamba_large.yaml and
             hparams/S2S/conmambamamba_large.yaml (Mamba decoder) on a synthetic padded batch of
             16 utterances of up to 10 s: median time of 3 steps after a warm-up, peak memory.
  converge   30 training steps of S2S conmamba_large (auto backend) on one synthetic batch: the
             loss must fall.
The issue's targets: triton fwd+bwd within 2x of cuda and >= 10x torch at L 250; a triton S2S
training step within 1.3x of the cuda one.
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import speechbrain  # noqa: F401  (switches TF32 on at import: parity_rows turns it off)

import modules.mamba.scan as ss
from recipes.hparams import load_recipe

REPO = Path(__file__).resolve().parents[1]

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
LOW = ("u", "delta", "B", "C", "z")  # activations: bf16 under autocast
TRAIN_MODELS = ["S2S/conmamba_large", "CTC/conmamba_large", "S2S/conmambamamba_large"]
COLUMNS = ("check", "backend", "case", "result", "time ms", "peak MiB")


class Device:
    """Timing and memory on CUDA, or plain wall clock on CPU (dry run)."""

    def __init__(self, name):
        self.name = name
        self.cuda = name == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn, repeats=5):
        """(median ms over ``repeats`` calls after one warm-up, peak MiB above the start)."""
        fn()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if self.cuda else 0
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - start) * 1e3)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if self.cuda else float("nan")
        return statistics.median(times), peak


_CUDA_ERROR = []  # the first CUDA error: it is sticky, every later CUDA call fails with it


def guarded(check, backend, case, fn):
    """fn() -> rows; an exception becomes one FAIL row (the other rows still run). After a
    CUDA error (an illegal memory access...) the process's CUDA context is unusable: later rows
    say so instead of failing with the same error."""
    if _CUDA_ERROR:
        return [(check, backend, case, f"SKIP (after the CUDA error in {_CUDA_ERROR[0]})", "",
                 "")]
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 (report it in the table, carry on)
        message = " ".join(f"{type(err).__name__}: {err}".split())[:160]
        if "CUDA error" in message or type(err).__name__ == "AcceleratorError":
            _CUDA_ERROR.append(f"{check} {backend} {case}")
        return [(check, backend, case, f"FAIL {message}", "", "")]


def make_inputs(batch, d_inner, d_state, length, device, seed=0, training_layout=False):
    """Inputs in the ranges a trained Mamba block sees (float32). training_layout: as a BiMamba
    layer passes them (modules.mamba.mamba_blocks.BiMamba._both_directions): u, delta, z
    (batch, d_inner, L) views of (batch, L, d_inner) tensors (channels innermost), B and C
    (batch, 2, d_state, L) shared by the two halves of the channels (the two directions), views
    of (batch, L, 2, d_state) tensors; else contiguous tensors and B, C (batch, d_state, L)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def activation(scale=1.0):
        if training_layout:
            return (scale * randn(batch, length, d_inner)).to(device).transpose(1, 2)
        return (scale * randn(batch, d_inner, length)).to(device)

    def states():
        if training_layout:
            return randn(batch, length, 2, d_state).to(device).permute(0, 2, 3, 1)
        return randn(batch, d_state, length).to(device)

    A = -torch.arange(1, d_state + 1.0).expand(d_inner, -1)
    A = A * torch.exp(0.3 * randn(d_inner, d_state))
    inputs = {"u": activation(), "delta": activation(0.5), "A": A.to(device), "B": states(),
              "C": states(), "D": (1 + 0.1 * randn(d_inner)).to(device), "z": activation(),
              "delta_bias": (-2.3 - 4.5 * torch.rand(d_inner, generator=g)).to(device)}
    return inputs


def run_scan(backend, inputs, grad_out, backward=True):
    args = {k: v.detach().clone().requires_grad_(backward) for k, v in inputs.items()}
    out, last = ss.selective_scan(*(args[k] for k in ARG_NAMES), delta_softplus=True,
                                  return_last_state=True, backend=backend)
    if not backward:
        return {"out": out, "last": last}
    (out.float() * grad_out).sum().backward()
    return {"out": out, "last": last, **{f"d{k}": args[k].grad for k in ARG_NAMES}}


def timed_scan(backend, leaves, grad_out, backward):
    """One scan call for the timing rows on inputs made once (``leaves``, requiring grad for
    backward): no copies, grad_out in the output's dtype, gradients dropped after it, so the
    peak memory is the scan's own."""
    args = [leaves[k] for k in ARG_NAMES]
    if not backward:
        with torch.no_grad():
            ss.selective_scan(*args, delta_softplus=True, backend=backend)
        return
    out = ss.selective_scan(*args, delta_softplus=True, backend=backend)
    out.backward(grad_out)
    for leaf in args:
        leaf.grad = None


def worst_error(got, want):
    """(max relative error, tensor name) over the results."""
    errs = {name: ((got[name].double() - ref.double()).abs().max()
                   / ref.double().abs().max().clamp_min(1e-30)).item()
            for name, ref in want.items()}
    name = max(errs, key=errs.get)
    return errs[name], name


def parity_rows(backends, device, shape):
    """The parity rows, with TF32 off; the flags are restored after (training runs with them)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        return _parity_rows(backends, device, shape)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _parity_rows(backends, device, shape):
    rows = []
    inputs = make_inputs(*shape, device)
    grad_out = torch.randn(shape[0], shape[1], shape[3], device=device)
    low = {k: (v.bfloat16() if k in LOW else v) for k, v in inputs.items()}
    want = {"fp32": run_scan("ref", inputs, grad_out),
            "bf16": run_scan("ref", {k: v.float() for k, v in low.items()}, grad_out)}
    limits = {"fp32": 1e-4, "bf16": 2e-2}
    for backend in backends:
        if backend == "ref":
            continue
        for precision, data in (("fp32", inputs), ("bf16", low)):
            case = f"{precision} {shape}"

            def row(data=data, precision=precision, case=case):
                err, name = worst_error(run_scan(backend, data, grad_out), want[precision])
                verdict = "ok" if err < limits[precision] else f"FAIL (> {limits[precision]:g})"
                return [("parity", backend, case, f"max rel err {err:.1e} ({name}) {verdict}",
                         "", "")]

            rows += guarded("parity", backend, case, row)
    return rows


def scan_rows(backends, dev, shapes):
    rows = []
    for shape in shapes:
        inputs = make_inputs(*shape, dev.name, training_layout=True)
        # bf16 activations as under autocast, in the layout training passes (see make_inputs)
        leaves = {k: (v.bfloat16() if k in LOW else v).requires_grad_() for k, v in
                  inputs.items()}
        grad_out = torch.randn(shape[0], shape[1], shape[3], device=dev.name,
                               dtype=torch.bfloat16)
        for backend in backends:
            if backend == "ref":
                continue

            def timed(backend=backend):
                fwd_ms, fwd_mib = dev.measure(
                    lambda: timed_scan(backend, leaves, grad_out, backward=False))
                both_ms, both_mib = dev.measure(
                    lambda: timed_scan(backend, leaves, grad_out, backward=True))
                return [("scan fwd", backend, case, "", f"{fwd_ms:.1f}", f"{fwd_mib:.0f}"),
                        ("scan fwd+bwd", backend, case, "", f"{both_ms:.1f}", f"{both_mib:.0f}")]

            case = f"bf16 {shape}"
            rows += guarded("scan", backend, case, timed)
        del leaves, inputs
    return rows


class SyntheticTask:
    """A recipe's model with a synthetic padded batch and its training loss (bf16 autocast)."""

    def __init__(self, recipe, device, batch, frames, tokens, overrides=None):
        kind = recipe.split("/")[0]
        with tempfile.TemporaryDirectory() as tmp:
            hp, _, _ = load_recipe(str(REPO / "hparams" / f"{recipe}.yaml"),
                                   {"data_folder": tmp, "output_folder": tmp, **(overrides or {})},
                                   device=device.name)
        self.hp, self.kind, self.dev = hp, kind, device
        self.model = torch.nn.ModuleList(
            [hp["CNN"], hp["Transformer"], hp["ctc_lin"]]
            + ([hp["seq_lin"]] if kind == "S2S" else [])).to(device.name)
        g = torch.Generator().manual_seed(0)
        vocab = hp["output_neurons"]
        self.feats = torch.randn(batch, frames, hp["n_mels"], generator=g).to(device.name)
        self.wav_lens = torch.linspace(0.7, 1.0, batch).to(device.name)  # padded batch
        self.tokens = torch.randint(3, vocab, (batch, tokens), generator=g).to(device.name)
        self.token_lens = torch.linspace(0.6, 1.0, batch).to(device.name)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4)

    def loss(self):
        hp = self.hp
        with torch.autocast(self.dev.name, dtype=torch.bfloat16):
            src = self.model[0](self.feats)
            if self.kind == "CTC":
                enc, _ = self.model[1](src, tgt=None, wav_len=self.wav_lens)
            else:
                bos = torch.full_like(self.tokens[:, :1], hp["bos_index"])
                enc, dec = self.model[1](src, torch.cat([bos, self.tokens], 1), self.wav_lens,
                                         pad_idx=hp["pad_index"])
            p_ctc = hp["log_softmax"](self.model[2](enc)).float()
            loss = hp["ctc_cost"](p_ctc, self.tokens, self.wav_lens, self.token_lens).sum()
            if self.kind == "S2S":
                p_seq = hp["log_softmax"](self.model[3](dec)).float()
                eos = torch.full_like(self.tokens[:, :1], hp["eos_index"])
                tokens_eos = torch.cat([self.tokens, eos], 1)
                seq = hp["seq_cost"](p_seq, tokens_eos, length=self.token_lens).sum()
                loss = hp["ctc_weight"] * loss + (1 - hp["ctc_weight"]) * seq
        return loss

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.optimizer.step()
        return loss.detach()


def with_backend(backend, fn):
    old = os.environ.get("MAMBA_SCAN_BACKEND")
    os.environ["MAMBA_SCAN_BACKEND"] = backend
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["MAMBA_SCAN_BACKEND"]
        else:
            os.environ["MAMBA_SCAN_BACKEND"] = old


def train_rows(backends, dev, models, task_kwargs):
    rows = []
    for recipe in models:
        task = SyntheticTask(recipe, dev, **task_kwargs)
        for backend in backends:
            if backend == "ref":
                continue
            def step(backend=backend, task=task):
                ms, mib = with_backend(backend, lambda: dev.measure(task.step, repeats=3))
                return [("train step", backend, f"{recipe} bf16", "", f"{ms:.0f}", f"{mib:.0f}")]

            rows += guarded("train step", backend, f"{recipe} bf16", step)
        del task
        if dev.cuda:
            torch.cuda.empty_cache()
    return rows


def converge_rows(dev, recipe, steps, task_kwargs):
    task = SyntheticTask(recipe, dev, **task_kwargs)
    start = time.perf_counter()
    losses = [task.step().item() for _ in range(steps)]
    ms = (time.perf_counter() - start) * 1e3 / steps
    first, last = losses[0], statistics.mean(losses[-3:])
    verdict = "falls" if math.isfinite(last) and last < 0.7 * first else "does NOT fall"
    backend = ss.resolve_backend(None, task.feats)
    return [("converge", backend, f"{recipe} bf16, {steps} steps",
             f"loss {first:.1f} -> {last:.1f}: {verdict}", f"{ms:.0f}", "")]


def print_table(rows):
    widths = [max(len(str(r[i])) for r in [COLUMNS] + rows) for i in range(len(COLUMNS))]
    for i, row in enumerate([COLUMNS] + rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every section on CPU at tiny sizes (tests the script)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no new section after this many seconds")
    args = parser.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to "
              "check. Run it on a machine with an NVIDIA GPU.")
        return 0
    dev = Device("cpu" if args.cpu_dry_run else "cuda")
    begin = time.perf_counter()
    if dev.cuda:
        status = ss.cuda_backends_status()
        backends = [b for b in ("cuda", "triton") if status[b] is None] + ["torch", "ref"]
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        for name, why in status.items():
            print(f"  backend {name}: {'available' if why is None else 'not available: ' + why}")
        print(f"  {ss.describe_backend('cuda')}")
        parity_shape, scan_shapes = (4, 256, 16, 300), [(32, 1024, 16, 250), (32, 1024, 16, 875)]
        models, task_kwargs = TRAIN_MODELS, dict(batch=16, frames=1000, tokens=60)
        converge = "S2S/conmamba_large"
    else:
        backends = ["torch", "ref"]
        parity_shape, scan_shapes = (2, 8, 4, 20), [(2, 16, 4, 25)]
        models, task_kwargs = ["S2S/tiny", "CTC/tiny"], dict(batch=2, frames=60, tokens=5)
        converge = "S2S/tiny"
    rows, ok = [], True
    sections = [
        lambda: parity_rows(backends, dev.name, parity_shape),
        lambda: scan_rows(backends, dev, scan_shapes),
        lambda: train_rows(backends, dev, models, task_kwargs),
    ]
    for section in sections:
        if time.perf_counter() - begin > args.budget_s:
            rows.append(("(skipped)", "", "over --budget-s", "", "", ""))
            continue
        rows += section()
    if time.perf_counter() - begin <= args.budget_s:
        result = guarded("converge", "auto", converge,
                         lambda: converge_rows(dev, converge, 30, task_kwargs))
        rows += result
        ok = "falls" in result[0][3] and "NOT" not in result[0][3]
    else:
        rows.append(("converge", "auto", converge, "not run (over --budget-s): not checked",
                     "", ""))
        ok = False
    print_table(rows)
    print(f"total {time.perf_counter() - begin:.0f} s")
    failed = [r for r in rows if "FAIL" in r[3]] or not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
