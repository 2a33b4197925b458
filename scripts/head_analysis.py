"""Where a finished run's class-IL accuracy goes: backbone deltas against head, and the head's calibration.

    python scripts/head_analysis.py runs/digits/ita/version_0 [more runs ...]

For each run (a run directory of an ITA / IEL fit, with its `pretuned_head.safetensors`) it evaluates the
final class-IL and task-IL average accuracy of four models that cross the two backbones with the two heads:

- backbone: the run's composition θ0 + (1/T) Σ τ_t, or θ0 alone (no delta);
- head: the trained head h (what the run deploys), or the pre-tuned head h̃ (linear probe + alignment on
  synthetic features of every class, the head the penalty pulls h towards).

"θ0 + h̃" is the linear-probe baseline. A gap between class-IL and task-IL accuracy is the head's calibration
*across* tasks; the last table shows it directly: for the test images of each task, the share predicted
into each task's classes (rows: true task, columns: predicted task), for the run's own model.

``--logits`` adds, for the trained head on θ0 and on the composition, the mean over every test image of the
largest logit among each task's rows (a task whose rows give larger logits on *every* image wins class-IL).

``--align`` re-aligns the trained head after the fact (``align_head``, the pre-tuning's step 4, 30 epochs) on
synthetic features drawn from class mixtures of the *composed* model's features of the training images, two ways:

- ``per task``: task t's classes from the composition of tasks 0..t (what an end-of-task alignment could see in
  a stream: each delta is fixed once its task ends, so this is exact for ITA and IEL);
- ``oracle``: every class from the final composition (needs every task's data at the end: an upper bound);
- ``drift-compensated``: as ``per task``, each older class's mixture moved at every later task by the drift that
  task's images show (what ``head_alignment="drift_compensated"`` does in a run), for several kernel bandwidths;
- the oracle head on the compositions θ0 + w Σ τ for w = 0.4, 0.6, 1 (the run's own is w = 1/T): what the
  best linear head could reach on other compositions of the same deltas.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_taylor.callbacks.protocol import resolve_classifier  # noqa: E402
from lightning_taylor.deltas.composition import uniform  # noqa: E402
from lightning_taylor.head import ClassMixtures, align_head, fit_class_mixtures  # noqa: E402
from lightning_taylor.head.drift import compensate_drift  # noqa: E402
from lightning_taylor.head.pretuning import extract_features  # noqa: E402
from lightning_taylor.runs.evaluate import accuracies, eval_loader, predict  # noqa: E402
from lightning_taylor.runs.load import load_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--logits", action="store_true", help="mean largest logit of each task's rows")
    parser.add_argument("--align", action="store_true", help="re-align the trained head on composed features")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| run | backbone | head | class-IL avg (%) | task-IL avg (%) |\n|---|---|---|---|---|")
    confusions = {}
    for path in args.runs:
        run = load_run(path)
        data, model, head = run.datamodule, run.model, run.model.head
        trained = {k: v.clone() for k, v in head.state_dict().items()}
        pretuned = run.pretuned_heads().last  # h̃ of the last boundary, over all classes
        loader = eval_loader(data, max(run.tasks) + 1)
        for backbone, composition in (("θ0 + (1/T) Σ τ", uniform(run.tasks)), ("θ0", {})):
            for head_name, state in (("trained h", trained), ("pre-tuned h̃", pretuned)):
                head.load_state_dict({k: v.to(head.weight) for k, v in state.items()})
                logits, targets = predict(model, loader, composition)
                result = accuracies(logits, targets, data.num_tasks, data.classes_per_task)
                class_il = 100 * sum(result["class_il"]) / len(result["class_il"])
                task_il = 100 * sum(result["task_il"]) / len(result["task_il"])
                print(f"| {path} | {backbone} | {head_name} | {class_il:.1f} | {task_il:.1f} |")
                if composition and head_name == "trained h":
                    k = data.classes_per_task
                    predicted, true = logits.argmax(1) // k, targets // k
                    tasks = max(run.tasks) + 1
                    confusions[path] = [[float(((true == t) & (predicted == p)).sum() / (true == t).sum())
                                         for p in range(tasks)] for t in range(tasks)]
        head.load_state_dict(trained)
        if args.logits:
            logit_scale(path, run, loader)
        if args.align:
            realign(path, run, loader, trained)
    for path, rows in confusions.items():
        tasks = len(rows)
        print(f"\n{path}: share of each task's test images predicted into each task's classes (%)")
        print("| true task | " + " | ".join(f"→ {p}" for p in range(tasks)) + " |\n|---|" + "---|" * tasks)
        for t, row in enumerate(rows):
            print(f"| {t} | " + " | ".join(f"{100 * v:.0f}" for v in row) + " |")


def class_il(run, loader, composition: dict | None = None) -> float:
    data = run.datamodule
    logits, targets = predict(run.model, loader, uniform(run.tasks) if composition is None else composition)
    result = accuracies(logits, targets, data.num_tasks, data.classes_per_task)
    return 100 * sum(result["class_il"]) / len(result["class_il"])


def logit_scale(path: str, run, loader) -> None:
    data, tasks = run.datamodule, max(run.tasks) + 1
    for backbone, composition in (("θ0", {}), ("θ0 + (1/T) Σ τ", uniform(run.tasks))):
        logits, _ = predict(run.model, loader, composition)
        top = logits[:, : tasks * data.classes_per_task].view(len(logits), tasks, -1).amax(2).mean(0)
        print(f"{path}: trained head on {backbone}, mean largest logit of each task's rows: "
              + ", ".join(f"task {t} {v:.2f}" for t, v in enumerate(top.tolist())))


def composed_features(run, tasks_of: dict[int, list[int] | dict[int, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (pre-logits) of each task's training images (test transforms) under ``tasks_of[t]``: the uniform
    composition of a list of tasks, or a composition ``{task: weight}``."""
    classifier, data = resolve_classifier(run.model), run.datamodule
    device = next(run.model.parameters()).device
    features, labels = [], []
    for task, composed in tasks_of.items():
        run.model.task_deltas.compose(composed if isinstance(composed, dict) else uniform(composed))
        loader = DataLoader(data.tasks_dataset([task], "train", augment=False), batch_size=256)
        task_features, task_labels = extract_features(classifier, loader, device)
        features.append(task_features)
        labels.append(task_labels)
    return torch.cat(features), torch.cat(labels)


def realign(path: str, run, loader, trained: dict) -> None:
    tasks = max(run.tasks) + 1
    classes = list(range(tasks * run.datamodule.classes_per_task))
    print(f"{path}: trained head {class_il(run, loader):.1f} % class-IL")
    for name, tasks_of in (("per task", {t: list(range(t + 1)) for t in range(tasks)}),
                           ("oracle", {t: list(run.tasks) for t in range(tasks)})):
        features, labels = composed_features(run, tasks_of)
        mixtures = fit_class_mixtures(features, labels, n_components=5, seed=0)
        run.model.head.load_state_dict(trained)
        align_head(run.model.head, mixtures, classes, epochs=30, generator=torch.Generator().manual_seed(0))
        print(f"{path}: trained head re-aligned on composed features ({name}) {class_il(run, loader):.1f} % class-IL")
    for bandwidth in (100.0, 1.0, 0.5, 0.25):
        mixtures = drift_compensated(run, tasks, bandwidth)
        run.model.head.load_state_dict(trained)
        align_head(run.model.head, mixtures, classes, epochs=30, generator=torch.Generator().manual_seed(0))
        print(f"{path}: re-aligned on composed features (per task, drift-compensated, bandwidth {bandwidth}) "
              f"{class_il(run, loader):.1f} % class-IL")
    for weight in (0.4, 0.6, 1.0):  # the oracle head on other compositions: what any head could do there
        composition = {t: weight for t in run.tasks}
        features, labels = composed_features(run, {t: composition for t in range(tasks)})
        mixtures = fit_class_mixtures(features, labels, n_components=5, seed=0)
        run.model.head.load_state_dict(trained)
        align_head(run.model.head, mixtures, classes, epochs=30, generator=torch.Generator().manual_seed(0))
        print(f"{path}: oracle-aligned head on θ0 + {weight} Σ τ "
              f"{class_il(run, loader, composition):.1f} % class-IL")
    run.model.head.load_state_dict(trained)


def drift_compensated(run, tasks: int, bandwidth: float) -> ClassMixtures:
    """What ``head_alignment="drift_compensated"`` builds at the end of the last task, from the finished deltas."""
    mixtures = ClassMixtures()
    for t in range(tasks):
        after, labels = composed_features(run, {t: list(range(t + 1))})
        if t > 0:
            before, _ = composed_features(run, {t: list(range(t))})
            mixtures = compensate_drift(mixtures, before, after, bandwidth)
        mixtures.update(fit_class_mixtures(after, labels, n_components=5, seed=0))
    return mixtures


if __name__ == "__main__":
    main()
