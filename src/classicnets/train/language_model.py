"""Recurrent language models, trained by truncated back-propagation through time.

The recipe of Zaremba, Sutskever & Vinyals 2014 as the TensorFlow PTB tutorial codes it
(tensorflow/models ``tutorials/rnn/ptb/ptb_word_lm.py``):

- the training stream is cut into ``batch_size`` rows (``data.ptb.batchify``) and read in
  windows of ``num_steps`` tokens; the hidden state is carried from one window to the next and
  detached between them (gradients flow back ``num_steps`` steps at most), and reset to zeros at
  the start of each epoch;
- the loss of a window is its summed negative log-likelihood over the time steps, averaged over
  the batch (the tutorial's ``sequence_loss(average_across_timesteps=False)``): with plain SGD
  at learning rate 1 this is the scale the published rates assume (pytorch/examples averages
  over the time steps too and needs a 20 times larger rate);
- gradients are clipped by their global norm (the norm before clipping is logged);
- the learning rate is ``lr * decay ** max(epoch + 1 - epochs_at_full_lr, 0)``
  (``schedules.ExponentialAfterEpoch``);
- after every epoch, the perplexity of the validation and test splits.

**Perplexity** is ``exp(total NLL / number of predicted tokens)``, where the total runs over
every token of the split but the first (which has no left context), each token counted exactly
once whatever the evaluation batch size (``data.ptb.evaluation_rows``); per-token NLLs are summed
in float64. ``evaluate_perplexity`` returns the total and the count with it.

**Exact resume**: ``fit`` drives the step (``LanguageModelTask``). The epoch structure, the hidden
state carried into the next window (every row's: under ``torchrun`` each process trains its rows
of the stream) and the running sums of the loss are the task's state, in every checkpoint with
the weights, optimizer, schedule and RNG states (dropout); the data position is a function of the
step. A resumed run continues bit for bit like an uninterrupted one (CPU, deterministic mode).

**Divergence** (the ReLU RNN's activations overflow): a non-finite training loss or gradient norm
stops the model with status ``"diverged"``; the step, epoch and value are logged (a record with
``split == "diverged"``) and returned instead of raised, so an experiment goes on with its other
models. Losses are checked at every log interval and before every checkpoint, so a checkpoint
never holds a diverged model.

Metrics records (``metrics.jsonl``) all carry ``variant``, ``epoch`` (1-based), ``step`` (global,
counted from the start of training) and ``split``:

- ``train``: every ``log_every`` steps and at each epoch end, the mean ``loss`` (nats per token)
  and ``perplexity`` over the steps since the previous record, ``lr`` and ``grad_norm`` (mean
  norm before clipping);
- ``train_epoch``: the epoch's training perplexity (as the tutorial prints it);
- ``valid``, ``test``: ``perplexity``, ``loss`` and ``tokens`` (predicted tokens) after each epoch;
- ``diverged``: where training stopped, with the non-finite ``loss`` or ``grad_norm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from classicnets.data.ptb import batchify, evaluation_rows, num_windows, window
from classicnets.models.rnnlm import Hidden, detach_hidden
from classicnets.train.fit import Cadence, Task, fit, optimize
from classicnets.train.loop import NonFiniteLossError
from classicnets.train.precision import Precision
from classicnets.train.run import RunDir
from classicnets.train.schedules import ExponentialAfterEpoch
from classicnets.train.state import TrainState

__all__ = [
    "LMTrainSettings",
    "LanguageModelTask",
    "evaluate_perplexity",
    "perplexity",
    "token_nll",
    "train_language_model",
]


@dataclass
class LMTrainSettings:
    """How one language model is trained (defaults: Zaremba et al.'s small configuration).

    Attributes:
        epochs: passes over the training stream.
        batch_size: rows of the batchified training stream.
        num_steps: window length (back-propagation through this many steps).
        lr: SGD learning rate at full rate.
        lr_decay: factor per epoch once decay starts.
        epochs_at_full_lr: epochs at ``lr`` before decaying (the tutorial's ``max_epoch``).
        clip_grad_norm: clip gradients to this global norm (the tutorial's ``max_grad_norm``);
            None: no clipping.
        precision: "fp32", "bf16" or "fp16" (autocast of the forward pass).
        eval_batch_size: rows of the evaluation streams (1: each token with its full left
            context, the tutorial's test protocol; more: faster, ``eval_batch_size - 1`` tokens
            lose their left context, none is skipped).
        eval_num_steps: window length of evaluation (no effect on the result beyond rounding).
        log_every, checkpoint_every, keep_checkpoints, progress, stop_after: as ``fit.Cadence``'s
            (a ``train`` record and a checkpoint also at each epoch's end).
    """

    epochs: int = 13
    batch_size: int = 20
    num_steps: int = 20
    lr: float = 1.0
    lr_decay: float = 0.5
    epochs_at_full_lr: int = 4
    clip_grad_norm: float | None = 5.0
    precision: str = "fp32"
    eval_batch_size: int = 1
    eval_num_steps: int = 35
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    progress: bool = True
    stop_after: int | None = None


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token negative log-likelihood (nats), in ``logits``' dtype.

    Args:
        logits: ``[..., V]`` unnormalized scores.
        targets: ``[...]`` int64 ids, the same leading shape.

    Returns:
        ``[N]`` NLLs, ``N = targets.numel()``.
    """
    vocab = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none")


def perplexity(total_nll: float, count: int) -> float:
    """``exp(total_nll / count)``: the perplexity of ``count`` predicted tokens."""
    if count < 1:
        raise ValueError("perplexity of no predicted token")
    return _exp(total_nll / count)


def _exp(x: float) -> float:
    """``math.exp`` that gives inf instead of raising (a diverging model's NLL can exceed 709)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _row_of(hidden: Hidden, row: int) -> Hidden:
    if isinstance(hidden, Tensor):
        return hidden[:, row : row + 1].contiguous()  # [L, 1, H]
    return tuple(h[:, row : row + 1].contiguous() for h in hidden)


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module, ids: Tensor, batch_size: int = 1, num_steps: int = 35
) -> tuple[float, float, int]:
    """Perplexity of ``model`` on the stream ``ids``, every token but the first predicted once.

    The stream is cut by ``data.ptb.evaluation_rows``: ``batch_size`` rows read in windows of
    ``num_steps`` with the hidden state carried along, then the few leftover tokens as a
    continuation of the last row. Per-token NLLs are computed in the model's dtype and summed in
    float64; the model is in eval mode (no dropout) and its previous mode is restored.

    Args:
        model: ``model(tokens [B, T], hidden) -> (logits [B, T, V], hidden)`` with
            ``init_hidden(batch_size)``.
        ids: 1-d int64 stream (on the model's device or not).
        batch_size: evaluation rows, in ``[1, len(ids) - 1]``.
        num_steps: window length.

    Returns:
        ``(perplexity, total_nll, count)`` with ``count == len(ids) - 1``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows, tail = evaluation_rows(ids.to(device), batch_size)
    total = torch.zeros((), dtype=torch.float64, device=device)
    hidden = model.init_hidden(rows.shape[0])
    length = rows.shape[1] - 1  # predicted tokens per row
    for start in range(0, length, num_steps):
        n = min(num_steps, length - start)
        inputs = rows[:, start : start + n]  # [B, n]
        targets = rows[:, start + 1 : start + 1 + n]  # [B, n]
        logits, hidden = model(inputs, hidden)
        total += token_nll(logits, targets).double().sum()
    count = rows.shape[0] * length
    if len(tail) > 1:  # the leftover pairs continue the last row
        hidden = _row_of(hidden, rows.shape[0] - 1)
        for start in range(0, len(tail) - 1, num_steps):
            piece = tail[start : start + num_steps + 1]
            logits, hidden = model(piece[None, :-1], hidden)  # [1, n] -> [1, n, V]
            total += token_nll(logits, piece[None, 1:]).double().sum()
        count += len(tail) - 1
    model.train(was_training)
    total_nll = total.item()
    return perplexity(total_nll, count), total_nll, count


def _diverged_record(run: RunDir | None, variant: str) -> dict[str, Any] | None:
    if run is None:
        return None
    for record in run.read_metrics():
        if record.get("variant") == variant and record.get("split") == "diverged":
            return record
    return None


def _parts(hidden: Hidden) -> list[Tensor]:
    return [hidden] if isinstance(hidden, Tensor) else list(hidden)


class LanguageModelTask(Task):
    """One window of truncated BPTT, the hidden state carried to the next; an epoch's end logs
    the training perplexity and evaluates the validation and test streams."""

    values = ("nll", "grad_norm")
    watch = {"nll": "loss", "grad_norm": "grad_norm"}
    losses = ("nll",)
    buffer_dtype = torch.float64

    def __init__(
        self,
        model: nn.Module,
        train_ids: Tensor,
        settings: LMTrainSettings,
        run: RunDir | None,
        variant: str,
        valid_ids: Tensor | None,
        test_ids: Tensor | None,
    ) -> None:
        super().__init__(next(model.parameters()).device)
        self.model, self.settings, self.run, self.variant = model, settings, run, variant
        self.global_batch = settings.batch_size
        data = batchify(train_ids.to(self.device), settings.batch_size)  # [B, L]
        self.steps_per_epoch = num_windows(data.shape[1], settings.num_steps)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training stream ({len(train_ids)} tokens) is too short for batch_size "
                f"{settings.batch_size}"
            )
        self.data = data[self.local]  # this process's rows
        self.rows = len(self.data)
        splits = {"valid": valid_ids, "test": test_ids}
        self.evaluations = [
            (k, ids.to(self.device)) for k, ids in splits.items() if ids is not None
        ]
        self.optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr)
        self.schedule = ExponentialAfterEpoch(settings.lr_decay, settings.epochs_at_full_lr)
        self.precision = Precision(settings.precision, str(self.device))
        self.modules, self.optimizers = {"model": model}, {"model": self.optimizer}
        self.schedules = {"lr": self.schedule}
        self.hidden: Hidden = model.init_hidden(self.rows)
        self._no_norm = torch.zeros((), dtype=torch.float64, device=self.device)  # no clipping
        every_row = _parts(model.init_hidden(settings.batch_size))  # what checkpoints hold
        self.tensors = {"epoch_nll": torch.zeros((), dtype=torch.float64, device=self.device)}
        self.tensors.update({f"hidden.{i}": h for i, h in enumerate(every_row)})
        self.extra = {"log_tokens": 0, "epoch_tokens": 0, "tokens_seen": 0,
                      "train_perplexity": None, "last_eval": {}}  # fmt: skip
        self.cadence = Cadence(
            steps=settings.epochs * self.steps_per_epoch,
            log_every=settings.log_every,
            checkpoint_every=settings.checkpoint_every,
            keep_checkpoints=settings.keep_checkpoints,
            progress=settings.progress,
            stop_after=settings.stop_after,
        )

    def train_step(self, step: int) -> dict[str, Tensor]:
        settings, extra = self.settings, self.state.extra
        epoch_nll = self.state.extra_tensors["epoch_nll"]
        epoch, index = divmod(step, self.steps_per_epoch)
        if index == 0:  # each epoch starts from the zero state (TF tutorial)
            self.hidden = self.model.init_hidden(self.rows)
            epoch_nll.zero_()
            extra["epoch_tokens"] = 0
        inputs, targets = window(self.data, index, settings.num_steps)  # [B, n], [B, n]
        self.schedule.apply(self.optimizer, step, epoch)
        self.model.train()
        hidden = detach_hidden(self.hidden)  # truncated BPTT: no gradient into the last window
        with self.precision.autocast():
            logits, self.hidden = self.model(inputs, hidden)  # [B, n, V]
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )  # [B * n, V] -> summed NLL of the window
        loss = nll / self.rows  # sum over time steps, mean over rows (TF)
        clip, params = settings.clip_grad_norm, self.model.parameters()
        norm = optimize(loss, self.optimizer, self.precision, clip, params)
        self.precision.update()
        epoch_nll += nll.detach().double()
        for key in ("log_tokens", "epoch_tokens", "tokens_seen"):
            extra[key] += targets.numel()
        norm = self._no_norm if norm is None else norm.double()
        return {"nll": nll.detach().double(), "grad_norm": norm}

    def log_due(self, step: int) -> bool:
        return step % self.cadence.ring == 0 or step % self.steps_per_epoch == 0

    def eval_due(self, step: int) -> bool:
        return step > 0 and step % self.steps_per_epoch == 0

    def checkpoint_due(self, step: int) -> bool:
        return super().checkpoint_due(step) or step % self.steps_per_epoch == 0

    def _epoch(self, step: int) -> int:
        """The 1-based epoch that step ``step`` (1-based) belongs to."""
        return (step - 1) // self.steps_per_epoch + 1

    def train_records(self, window: dict[str, Tensor], step: int) -> list[dict[str, Any]]:
        extra = self.state.extra
        mean_nll = window["nll"].sum().item() / extra["log_tokens"]
        record = {
            "epoch": self._epoch(step),
            "split": "train",
            "loss": mean_nll,
            "perplexity": _exp(mean_nll),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if self.settings.clip_grad_norm:
            record["grad_norm"] = window["grad_norm"].sum().item() / len(window["grad_norm"])
        extra["log_tokens"] = 0
        return [record]

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"ppl": f"{record['perplexity']:.1f}", "epoch": str(record["epoch"])}

    def evaluate(self, step: int) -> list[dict[str, Any]]:
        extra, epoch = self.state.extra, self._epoch(step)
        epoch_nll = self.state.extra_tensors["epoch_nll"]
        if self.context.enabled:  # every process's rows
            epoch_nll = epoch_nll.clone()
            dist.all_reduce(epoch_nll)
            epoch_nll /= self.context.world_size
        train_nll = epoch_nll.item() / extra["epoch_tokens"]
        extra["train_perplexity"] = _exp(train_nll)
        records = [{
            "epoch": epoch,
            "split": "train_epoch",
            "loss": train_nll,
            "perplexity": _exp(train_nll),
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens": extra["epoch_tokens"] * self.context.world_size,
        }]  # fmt: skip
        settings = self.settings
        for split, ids in self.evaluations:
            ppl, total, count = evaluate_perplexity(
                self.model, ids, settings.eval_batch_size, settings.eval_num_steps
            )
            records.append({"epoch": epoch, "split": split, "perplexity": ppl,
                            "loss": total / count, "tokens": count})  # fmt: skip
            extra["last_eval"][split] = ppl
        extra["last_eval"]["epoch"] = epoch
        return records

    def after_resume(self, resumed: bool) -> dict[str, Any] | None:
        record = _diverged_record(self.run, self.variant)
        if record is not None:  # deterministic: training it again would diverge again
            return _result(self.state, self.steps_per_epoch, "diverged", record)
        if resumed:  # this process's rows of the hidden state carried into the next window
            tensors = self.state.extra_tensors
            parts = [tensors[f"hidden.{i}"][:, self.local] for i in range(len(_parts(self.hidden)))]
            self.hidden = parts[0] if isinstance(self.hidden, Tensor) else tuple(parts)
        return None

    def before_checkpoint(self) -> None:
        tensors = self.state.extra_tensors
        for i, h in enumerate(_parts(self.hidden)):
            h = h.detach()
            if self.context.enabled:  # the rows of every process, in order (zeros elsewhere)
                h, rows = h.new_zeros(h.shape[0], self.global_batch, *h.shape[2:]), h
                h[:, self.local] = rows
                dist.all_reduce(h)
            tensors[f"hidden.{i}"] = h
        if self.context.enabled:  # the mean of the processes' sums: the epoch's mean is kept
            dist.all_reduce(tensors["epoch_nll"])
            tensors["epoch_nll"] /= self.context.world_size

    def result(self) -> dict[str, Any]:
        status = "complete" if self.state.complete else "stopped"
        return _result(self.state, self.steps_per_epoch, status)


def train_language_model(
    model: nn.Module,
    train_ids: Tensor,
    settings: LMTrainSettings,
    run: RunDir | None = None,
    variant: str = "model",
    valid_ids: Tensor | None = None,
    test_ids: Tensor | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``model`` on the stream ``train_ids``; evaluate on valid/test after every epoch.

    Args:
        model: an ``RNNLanguageModel`` (or any module with its ``forward(tokens, hidden)`` and
            ``init_hidden``), on the device to train on, initialized from the caller's seed.
        train_ids: 1-d int64 training stream.
        settings: epochs, windows, learning rate and its decay, clipping, intervals.
        run: the run folder to log to and checkpoint into (None: no files).
        variant: the model's name in the run (prefix of its checkpoints, ``variant`` field).
        valid_ids, test_ids: 1-d evaluation streams (None: not evaluated).
        resume: continue from the newest valid checkpoint of ``variant`` if there is one; a
            variant whose divergence is on record is not trained again.

    Returns:
        ``{"status": "complete" | "stopped" | "diverged", "step", "epoch" (epochs completed),
        "steps_per_epoch", "train_perplexity", "valid_perplexity", "test_perplexity" (latest),
        "train_time_s", "tokens_per_s", "diverged" (None or {"step", "epoch", "loss",
        "grad_norm"})}``.

    Raises:
        StopRequested: as ``fit``.
    """
    task = LanguageModelTask(model, train_ids, settings, run, variant, valid_ids, test_ids)
    try:
        return fit(task, run, variant, resume)
    except NonFiniteLossError as exc:
        record = {"epoch": task._epoch(exc.step), "step": exc.step, "split": "diverged",
                  "loss": exc.values["loss"]}  # fmt: skip
        if settings.clip_grad_norm:
            record["grad_norm"] = exc.values["grad_norm"]
        if run is not None:
            run.log({"variant": variant, **record})
        return _result(task.state, task.steps_per_epoch, "diverged", record)


def _result(
    state: TrainState, steps_per_epoch: int, status: str, diverged: dict | None = None
) -> dict[str, Any]:
    extra = state.extra
    last_eval = extra.get("last_eval") or {}
    train_time = extra.get("train_time_s") or 0.0
    tokens = extra.get("tokens_seen") or 0
    step = state.step
    if diverged is not None:  # metrics.jsonl stores nan and inf as strings
        norm = diverged.get("grad_norm")
        diverged = {"step": int(diverged["step"]), "epoch": int(diverged["epoch"]),
                    "loss": float(diverged["loss"]), "grad_norm": norm and float(norm)}  # fmt: skip
        step = diverged["step"]  # the step whose loss (or gradient) was not finite
    return {
        "status": status,
        "step": step,
        "epoch": step // steps_per_epoch if diverged is None else int(diverged["epoch"]) - 1,
        "steps_per_epoch": steps_per_epoch,
        "train_perplexity": extra.get("train_perplexity"),
        "valid_perplexity": last_eval.get("valid"),
        "test_perplexity": last_eval.get("test"),
        "train_time_s": train_time,
        "tokens_per_s": tokens / train_time if train_time > 0 else None,
        "diverged": diverged,
    }
