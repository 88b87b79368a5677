"""Knowledge distillation: train a compressed Graph (the student) against the model it came
from (the teacher), the standard way to recover accuracy after a lossy pass.

    s = graphc.run_pipeline(g, "factorize(ratio=0.5)")[0]
    r = graphc.distill(s, g, batches, epochs=2, loss="kl", temperature=4.0,
                       features=["relu_1"], plot="kd.png")
    r.student            # the trained copy (s itself is left alone)
    r.curve["loss"]      # total loss per step; r.curve["soft"/"features"/"hard"] per term

The student's weights are the get_attr parameters of its graph module, so the loop is
plain PyTorch: Adam on those parameters (fake-quant scales at lr / 100, as graphc.qat
does), the student run as a module that also returns the tapped feature nodes.
"""

from __future__ import annotations

import fnmatch
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from graphc.distill_taps import (
    OUTPUT_LOSSES,
    ModuleTaps,
    as_tuple,
    feature_pairs,
    split_item,
    tap_graph,
)
from graphc.errors import GraphcError
from graphc.ir import Graph
from graphc.qat import own_parameters, param_groups


class Distilled(NamedTuple):
    student: Graph                 # the trained copy
    curve: dict[str, list[float]]  # per step: "loss" (total) and each term used


def distill(student: Graph, teacher, data: Iterable, *, epochs: int = 1,
            loss: str | Callable = "kl", temperature: float | None = None,
            alpha: float = 0.5, features=None, feature_weight: float = 1.0,
            lr: float = 3e-4, scale_lr: float | None = None,
            trainable: tuple[str, ...] | list[str] | None = None,
            hard_loss: Callable = F.cross_entropy, progress: bool | None = None,
            plot=None) -> Distilled:
    """Train a copy of `student` to match `teacher` (an nn.Module or Graph) on `data`.

    data: re-iterable of items, each the student's inputs (a tensor or tuple) or
    (inputs, labels). loss: "kl" (soft targets at `temperature`, default 2), "mse" or
    "cosine" (for embedding outputs), or fn(student_out, teacher_out) -> scalar; applied to
    every output pair. With labels, total = alpha * soft + (1 - alpha) * hard_loss(out,
    labels). features: node names shared by both graphs, or {student node: teacher node or
    submodule name}; each adds feature_weight * MSE. trainable: fnmatch patterns on
    parameter names (default: all). progress: rich bar (default: on a terminal). plot: a
    path to save the loss curve to (needs matplotlib; skipped with a warning without it).
    """
    temperature = _check(student, teacher, epochs, loss, temperature, alpha, lr,
                         feature_weight)
    if plot is not None and not _has_matplotlib():
        warnings.warn(f"distill: plot={str(plot)!r} asked, but matplotlib is not installed; "
                      "the curve is returned without a plot (pip install matplotlib)",
                      stacklevel=2)
        plot = None
    s = own_parameters(student)
    pairs = feature_pairs(features)
    run_student = tap_graph(s, [a for a, _ in pairs], "student")
    run_teacher = _teacher_runner(teacher, [b for _, b in pairs])
    loss_fn = OUTPUT_LOSSES[loss] if isinstance(loss, str) else (lambda a, b, t: loss(a, b))
    opt = torch.optim.Adam([g for g in param_groups(s, lr, scale_lr, _names(s, trainable))
                            if g["params"]])
    items = list(data)
    if not items:
        raise GraphcError("distill: `data` is empty; give batches of the student's inputs")
    curve: dict[str, list[float]] = {"loss": []}
    n_out = len(s.outputs)
    with _bar(progress) as bar:
        task = bar.add_task("distilling", total=epochs * len(items), loss=float("nan"))
        run_student.train()
        for _ in range(epochs):
            for item in items:
                inputs, labels = split_item(item, s)
                with torch.no_grad():
                    t_out, t_feat = run_teacher(inputs)
                out = as_tuple(run_student(*inputs))
                terms = _terms(out[:n_out], out[n_out:], t_out, t_feat, pairs, loss_fn,
                               temperature, labels, hard_loss, alpha, feature_weight)
                total = sum(terms.values())
                opt.zero_grad()
                total.backward()
                opt.step()
                _clamp_scales(opt)
                _record(curve, total, terms)
                bar.update(task, advance=1, loss=curve["loss"][-1])
    run_student.eval()
    steps = len(items)
    s.meta["distill"] = {
        "epochs": epochs, "lr": lr, "loss": loss if isinstance(loss, str) else "custom",
        "temperature": temperature, "features": [list(p) for p in pairs],
        "epoch_losses": [sum(curve["loss"][e * steps:(e + 1) * steps]) / steps
                         for e in range(epochs)]}
    if plot is not None:
        save_plot(curve, plot, steps)
    return Distilled(s, curve)


def _terms(out, s_feat, t_out, t_feat, pairs, loss_fn, temperature, labels, hard_loss,
           alpha, feature_weight) -> dict[str, torch.Tensor]:
    """The loss terms of one step, each already weighted (the total is their sum)."""
    if len(out) != len(t_out):
        raise GraphcError(f"distill: the student returns {len(out)} outputs and the teacher "
                          f"{len(t_out)}; they must match one to one")
    soft = sum(loss_fn(a, b.detach().to(a.dtype), temperature) for a, b in zip(out, t_out))
    terms = {"soft": soft if labels is None else alpha * soft}
    if labels is not None:
        terms["hard"] = (1 - alpha) * hard_loss(out[0], labels)
    if pairs:
        for (sn, tn), a, b in zip(pairs, s_feat, t_feat):
            if a.shape != b.shape:
                raise GraphcError(f"distill: feature %{sn} of the student is {list(a.shape)} "
                                  f"but teacher '{tn}' is {list(b.shape)}; match layers of "
                                  "equal shape")
        terms["features"] = feature_weight * sum(F.mse_loss(a, b) for a, b in
                                                 zip(s_feat, t_feat))
    return terms


def _teacher_runner(teacher, names: list[str]):
    """inputs -> (teacher outputs, [feature values in `names` order])."""
    if isinstance(teacher, Graph):
        gm = tap_graph(teacher, names, "teacher").eval()
        n = len(teacher.outputs)

        def run_graph(inputs):
            out = as_tuple(gm(*inputs))
            return out[:n], list(out[n:])
        return run_graph
    teacher.eval()
    taps = ModuleTaps(teacher, names) if names else None

    def run_module(inputs):
        out = as_tuple(teacher(*inputs))
        return out, [taps.values[n] for n in names] if taps else []
    return run_module


def _check(student, teacher, epochs, loss, temperature, alpha, lr, feature_weight) -> float:
    if not isinstance(student, Graph):
        raise GraphcError(f"distill: the student must be a graphc.Graph (got "
                          f"{type(student).__name__}); trace it with graphc.trace(model, (x,))")
    if not isinstance(teacher, (Graph, torch.nn.Module)):
        raise GraphcError(f"distill: the teacher must be an nn.Module or a graphc.Graph, not "
                          f"{type(teacher).__name__}")
    if isinstance(loss, str) and loss not in OUTPUT_LOSSES:
        raise GraphcError(f"distill: loss={loss!r} is unknown; choose from "
                          f"{list(OUTPUT_LOSSES)} or pass fn(student_out, teacher_out)")
    if temperature is not None and loss != "kl":
        raise GraphcError(f"distill: temperature={temperature} applies to loss='kl' only "
                          f"(loss={loss!r}); leave it out")
    temperature = 2.0 if temperature is None else temperature
    bad = [f"{k}={v}" for k, v, ok in (
        ("epochs", epochs, isinstance(epochs, int) and epochs >= 1), ("lr", lr, lr > 0),
        ("temperature", temperature, temperature > 0), ("alpha", alpha, 0 <= alpha <= 1),
        ("feature_weight", feature_weight, feature_weight >= 0)) if not ok]
    if bad:
        raise GraphcError(f"distill: {', '.join(bad)} out of range; need epochs >= 1 (an int), "
                          "lr > 0, temperature > 0, 0 <= alpha <= 1, feature_weight >= 0")
    return temperature


def _names(g: Graph, trainable) -> set[str] | None:
    if trainable is None:
        return None
    patterns = [trainable] if isinstance(trainable, str) else list(trainable)
    names = {n for n, _ in g.gm.named_parameters()
             if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    if not names:
        raise GraphcError(f"distill: trainable={patterns} matches no parameter of "
                          f"'{g.name}'; parameters: {[n for n, _ in g.gm.named_parameters()][:6]}")
    return names


def _clamp_scales(opt: torch.optim.Optimizer) -> None:
    if len(opt.param_groups) > 1:  # a step must not make a fake-quant scale <= 0
        with torch.no_grad():
            for p in opt.param_groups[1]["params"]:
                p.clamp_(min=1e-8)


def _record(curve: dict, total: torch.Tensor, terms: dict) -> None:
    curve["loss"].append(float(total.detach()))
    for k, v in terms.items():
        curve.setdefault(k, []).append(float(v.detach()))


def _bar(progress: bool | None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    show = progress if progress is not None else sys.stderr.isatty()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4g}"), disable=not show,
                    transient=True)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_plot(curve: dict[str, list[float]], path, steps_per_epoch: int) -> None:
    """The loss curve (every term per step, log scale) as an image at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in curve.items():
        ax.plot(values, label=name, linewidth=1.5 if name == "loss" else 0.8)
    ax.set_xlabel(f"step ({steps_per_epoch} per epoch)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
