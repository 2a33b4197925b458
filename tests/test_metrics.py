import csv
import io
import math

import pytest
import torch

from lightning_taylor.metrics import (
    AccuracyMatrix,
    ContinualAccuracy,
    continual_accuracy_counts,
)

NAN = math.nan

# 3 tasks × 2 classes, evaluated after 2 tasks (classes 0..3 seen, 4..5 unseen). Per sample:
# class-IL = argmax over classes 0..3, task-IL = argmax within the sample's own task.
LOGITS = torch.tensor([
    [5.0, 1.0, 4.0, 0.0, 0.0, 9.0],  # y=0: class-IL 0 ✓ (unseen class 5 would win unmasked), task-IL 0 ✓
    [1.0, 2.0, 3.0, 0.0, 0.0, 0.0],  # y=1: class-IL 2 ✗, task-IL 1 ✓ (the two differ)
    [0.0, 0.0, 1.0, 3.0, 0.0, 0.0],  # y=2: class-IL 3 ✗, task-IL 3 ✗
    [0.0, 0.0, 0.0, 2.0, 8.0, 0.0],  # y=3: class-IL 3 ✓ (unseen class 4 would win unmasked), task-IL 3 ✓
    [6.0, 0.0, 2.0, 1.0, 0.0, 0.0],  # y=2: class-IL 0 ✗, task-IL 2 ✓
])
TARGET = torch.tensor([0, 1, 2, 3, 2])


def test_counts_by_hand():
    class_il, task_il, total = continual_accuracy_counts(LOGITS, TARGET, 2, 2, 3)
    assert class_il.tolist() == [1, 1, 0] and task_il.tolist() == [2, 2, 0] and total.tolist() == [2, 3, 0]
    # Logits of the seen classes only give the same counts.
    assert [c.tolist() for c in continual_accuracy_counts(LOGITS[:, :4], TARGET, 2, 2, 3)] == [
        [1, 1, 0], [2, 2, 0], [2, 3, 0]]


def test_continual_accuracy_by_hand_over_batches():
    metric = ContinualAccuracy(num_tasks=3, classes_per_task=2)
    metric.update(LOGITS[:2], TARGET[:2], seen_tasks=2)
    metric.update(LOGITS[2:], TARGET[2:], seen_tasks=2)
    result = metric.compute()
    assert result["class_il"].dtype == torch.float64
    assert result["class_il"][:2].tolist() == [1 / 2, 1 / 3] and result["task_il"][:2].tolist() == [1.0, 2 / 3]
    assert result["class_il"][2].isnan() and result["task_il"][2].isnan()

    # Unmasked, the unseen logits would have won samples 0 and 3: class-IL after all 3 tasks differs.
    full = ContinualAccuracy(num_tasks=3, classes_per_task=2)
    full.update(LOGITS, TARGET, seen_tasks=3)
    assert full.compute()["class_il"][:2].tolist() == [0.0, 0.0]

    metric.reset()
    assert metric.total.tolist() == [0, 0, 0]


def test_continual_accuracy_states_are_sums():
    whole, first, second = (ContinualAccuracy(3, 2) for _ in range(3))
    whole.update(LOGITS, TARGET, 2)
    first.update(LOGITS[:3], TARGET[:3], 2)
    second.update(LOGITS[3:], TARGET[3:], 2)
    # What the cross-process reduction does (sum), here between two metric objects.
    first.merge_state(second)
    for key in ("class_il", "task_il"):
        assert torch.equal(first.compute()[key].nan_to_num(-1), whole.compute()[key].nan_to_num(-1))
    assert {whole._reductions[k].__name__ for k in ("class_il_correct", "task_il_correct", "total")} == {"dim_zero_sum"}


def test_continual_accuracy_errors():
    metric = ContinualAccuracy(3, 2)
    with pytest.raises(ValueError, match=r"labels of the seen tasks' classes \[0, 4\), but got \[5\]"):
        metric.update(LOGITS, torch.tensor([0, 1, 2, 3, 5]), seen_tasks=2)
    with pytest.raises(ValueError, match="seen_tasks"):
        metric.update(LOGITS, TARGET, seen_tasks=0)
    with pytest.raises(ValueError, match="seen_tasks"):
        metric.update(LOGITS, TARGET, seen_tasks=4)
    with pytest.raises(ValueError, match="one per logits row"):
        metric.update(LOGITS, TARGET[:3], seen_tasks=2)
    with pytest.raises(ValueError, match="logits"):
        metric.update(LOGITS[:, :3], TARGET, seen_tasks=2)
    with pytest.raises(ValueError, match="num_tasks"):
        ContinualAccuracy(0, 2)


@pytest.fixture
def matrix() -> AccuracyMatrix:
    matrix = AccuracyMatrix("class_il")
    matrix.add_row(0, [0.9])
    matrix.add_row(1, torch.tensor([0.8, 0.95, NAN], dtype=torch.float64))  # entries of unseen tasks are ignored
    matrix.add_row(2, [0.85, 0.7, 0.9])
    return matrix


def test_average_accuracy_and_forgetting_by_hand(matrix):
    assert matrix.rows == [[0.9], [0.8, 0.95], [0.85, 0.7, 0.9]]
    assert matrix.average_accuracy(0) == pytest.approx(0.9)
    assert matrix.average_accuracy(1) == pytest.approx(0.875)
    assert matrix.average_accuracy() == pytest.approx((0.85 + 0.7 + 0.9) / 3)
    assert math.isnan(matrix.forgetting(0))
    assert matrix.forgetting(1) == pytest.approx(0.1)  # 0.9 − 0.8
    # j=0: max(0.9, 0.8) − 0.85 = 0.05;  j=1: 0.95 − 0.7 = 0.25
    assert matrix.forgetting() == pytest.approx(0.15)
    # Improvement counts as negative forgetting (backward transfer).
    other = AccuracyMatrix()
    other.add_row(0, [0.5])
    other.add_row(1, [0.7, 0.6])
    assert other.forgetting() == pytest.approx(-0.2)


def test_add_row_rules(matrix):
    matrix.add_row(2, [0.85, 0.75, 0.9])  # the last row again replaces it
    assert matrix.rows[2] == [0.85, 0.75, 0.9] and len(matrix) == 3
    with pytest.raises(ValueError, match="the next task 3"):
        matrix.add_row(4, [0.5] * 5)
    with pytest.raises(ValueError, match="the next task 3"):
        matrix.add_row(1, [0.5] * 2)
    with pytest.raises(ValueError, match="Divide percentages by 100"):
        matrix.add_row(3, [90.0, 80.0, 70.0, 60.0])
    with pytest.raises(ValueError, match="at least 4 values"):
        matrix.add_row(3, [0.9, 0.8])
    with pytest.raises(ValueError, match="task index"):
        matrix.average_accuracy(3)
    with pytest.raises(ValueError, match="add_row first"):
        AccuracyMatrix().forgetting()


def test_to_tensor(matrix):
    tensor = matrix.to_tensor()
    assert tensor.shape == (3, 3)
    assert tensor[1, :2].tolist() == [0.8, 0.95] and tensor[0, 1:].isnan().all()


def test_csv_content(matrix, tmp_path):
    path = tmp_path / "class_il.csv"
    matrix.to_csv(path)
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["after_task", "task_0", "task_1", "task_2", "average_accuracy", "forgetting"]
    assert rows[1][:4] == ["0", "0.9", "", ""] and rows[1][5] == "nan"
    assert rows[2][:4] == ["1", "0.8", "0.95", ""]
    assert [float(v) for v in rows[3][1:4]] == [0.85, 0.7, 0.9]
    assert float(rows[3][4]) == pytest.approx(matrix.average_accuracy())
    assert float(rows[3][5]) == pytest.approx(0.15)


def test_png_written(matrix, tmp_path):
    path = tmp_path / "class_il.png"
    matrix.to_png(path, title="Split digits, ITA")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_contains_numbers(matrix):
    table = matrix.format_table()
    lines = table.splitlines()
    assert lines[0] == "class_il accuracy (%)"
    assert "task 2" in lines[1] and "avg" in lines[1] and "forget" in lines[1]
    assert "90.00" in lines[3] and lines[3].rstrip().endswith("-")  # no forgetting at t = 0
    assert all(v in lines[5] for v in ("85.00", "70.00", "90.00", "81.67", "15.00"))
    assert len({len(line) for line in lines[3:]}) == 1  # fixed width


def test_state_round_trip(matrix):
    buffer = io.BytesIO()
    torch.save(matrix.state_dict(), buffer)
    buffer.seek(0)
    restored = AccuracyMatrix("other")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.name == "class_il" and restored.rows == matrix.rows
    assert restored.forgetting() == matrix.forgetting()
    assert restored.format_table() == matrix.format_table()
