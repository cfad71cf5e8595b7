"""A client's own data: read it from a file, fit it to the model, split it.

A data set is a CSV file or a NumPy ``.npz`` archive:

- CSV: a header row naming the columns, then one row per example. One
  column is the label (``label_column``: a name or an index, default the
  last); every other column is a numeric feature.
- ``.npz``: an array ``x`` (one row per example, any row shape) and an array
  ``y``, either class numbers (one per row) or one-hot rows.

A label is a class number, 0 to the model's output width minus one, or a
class name when ``classes`` lists the names in output order. Labels become
one-hot rows only once the model is known (``Dataset.fit``), since the
model's output width is the number of classes.

Every problem with a file is a ``DataError`` whose message is one line that
names the file and says what is wrong, for the console scripts to show as is.

``partition`` and ``split_holdout`` divide row indices among clients and a
held-out set, for ``simulate.py``.

Plain numpy and the standard library, cheap to import; nothing is shared
between threads.
"""

from __future__ import annotations

import csv
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Partitions ``partition`` knows.
PARTITIONS = ("iid", "label-skew")


class DataError(ValueError):
    """A data file cannot be read, or does not fit the model; the message is
    one line naming the file and the problem."""


@dataclass(frozen=True)
class Dataset:
    """Examples read from one file: features and class numbers."""

    # Where the examples come from, as error messages name it.
    source: str
    # Features, float32, one row per example.
    features: np.ndarray
    # Class number of each example, int64, 0 to the number of classes - 1.
    labels: np.ndarray
    # Number of classes the file declares (one-hot width, or the names given);
    # None when the labels are plain class numbers.
    num_classes: int | None = None
    # Names of the feature columns, and of the label column.
    feature_names: tuple[str, ...] = ()
    label_name: str = "label"
    # How a row is named in messages: "line" (CSV, 1-based with the header
    # as line 1) or "row" (an array, 0-based).
    row_word: str = "row"

    def __len__(self) -> int:
        return len(self.labels)

    def where(self, index: int) -> str:
        """The position of one example as a person finds it in the file."""
        if self.row_word == "line":
            return f"line {index + 2}"
        return f"row {index}"

    def fit(
        self, input_shape: Sequence[int], num_outputs: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Features shaped for the model's input and one-hot labels of its
        output width; DataError when the file does not fit the model."""
        input_shape = tuple(int(d) for d in input_shape)
        row_shape = self.features.shape[1:]

        # Features: the model's row shape, or a flat row of the same size.
        if row_shape != input_shape:
            if math.prod(row_shape) != math.prod(input_shape):
                raise DataError(
                    f"{self.source}: {_describe_row(row_shape)} per example, "
                    f"the model takes {_describe_row(input_shape)}"
                )
            features = self.features.reshape((len(self), *input_shape))
        else:
            features = self.features

        # Labels: every class number must be one of the model's outputs.
        if self.num_classes is not None and self.num_classes != num_outputs:
            raise DataError(
                f"{self.source}: labels name {self.num_classes} classes, "
                f"the model has {num_outputs} outputs"
            )
        outside = np.flatnonzero(self.labels >= num_outputs)
        if outside.size:
            first = int(outside[0])
            raise DataError(
                f"{self.source}: label {int(self.labels[first])} on "
                f"{self.where(first)} is not one of the model's {num_outputs} "
                f"classes (0 to {num_outputs - 1})"
            )
        one_hot = np.eye(num_outputs, dtype=np.float32)[self.labels]
        return features, one_hot

    def subset(self, indices: np.ndarray) -> Dataset:
        """The examples at ``indices``, in that order."""
        return Dataset(
            source=self.source,
            features=self.features[indices],
            labels=self.labels[indices],
            num_classes=self.num_classes,
            feature_names=self.feature_names,
            label_name=self.label_name,
        )


def from_arrays(source: str, features: np.ndarray, labels: np.ndarray) -> Dataset:
    """A data set from arrays in memory; labels are class numbers or one-hot
    rows."""
    return _checked(source, np.asarray(features), np.asarray(labels), "row")


def load_dataset(
    path: str | Path,
    label_column: str | None = None,
    classes: Sequence[str] | None = None,
) -> Dataset:
    """Read a CSV file or an ``.npz`` archive; DataError when it cannot be
    read or holds no usable examples."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        return _load_npz(path, classes)
    return _load_csv(path, label_column, classes)


def write_csv(path: Path, dataset: Dataset) -> None:
    """Write a data set as a CSV file that ``load_dataset`` reads back: the
    features flattened, the class number last."""
    names = list(dataset.feature_names)
    width = math.prod(dataset.features.shape[1:])
    if len(names) != width:
        names = [f"x{i}" for i in range(width)]
    flat = dataset.features.reshape(len(dataset), width)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*names, dataset.label_name])
        for row, label in zip(flat, dataset.labels, strict=True):
            # str of a float32 is its shortest exact form: 5.8, not 5.80000019.
            writer.writerow([*(str(v) for v in row), int(label)])


# CSV -------------------------------------------------------------------------


def _load_csv(
    path: Path, label_column: str | None, classes: Sequence[str] | None
) -> Dataset:
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: the file is empty")
    header, body = rows[0], rows[1:]
    if len(header) < 2:
        raise DataError(
            f"{path}: needs a header with at least one feature column and a "
            f"label column, found {len(header)} column(s)"
        )
    if all(_is_number(cell) for cell in header):
        raise DataError(
            f"{path}: the first line must be a header naming the columns; "
            "it holds numbers"
        )
    if not body:
        raise DataError(f"{path}: has a header but no examples")
    label_index = _label_index(path, header, label_column)

    # Every row: as many fields as the header, numeric features.
    feature_index = [i for i in range(len(header)) if i != label_index]
    features = np.empty((len(body), len(feature_index)), dtype=np.float32)
    raw_labels = []
    for row_number, row in enumerate(body):
        line = row_number + 2
        if len(row) != len(header):
            raise DataError(
                f"{path}: line {line} has {len(row)} fields, the header has "
                f"{len(header)}"
            )
        for j, i in enumerate(feature_index):
            value = _number(row[i])
            if value is None:
                raise DataError(
                    f"{path}: line {line}, column {header[i]!r}: "
                    f"{row[i]!r} is not a finite number"
                )
            features[row_number, j] = value
        raw_labels.append(row[label_index].strip())

    labels, num_classes = _class_numbers(path, raw_labels, classes, "line", 2)
    return Dataset(
        source=str(path),
        features=features,
        labels=labels,
        num_classes=num_classes,
        feature_names=tuple(header[i] for i in feature_index),
        label_name=header[label_index],
        row_word="line",
    )


def _read_rows(path: Path) -> list[list[str]]:
    """Every non-blank row of a CSV file, cells stripped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [
                [cell.strip() for cell in row]
                for row in csv.reader(handle)
                if any(cell.strip() for cell in row)
            ]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text CSV file (not UTF-8)") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a valid CSV file: {exc}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file: {exc.strerror}") from None
    return rows


def _label_index(path: Path, header: list[str], label_column: str | None) -> int:
    """The index of the label column, named or numbered (negative from the
    end); the last column when none is given."""
    if label_column is None:
        return len(header) - 1
    if label_column in header:
        return header.index(label_column)
    try:
        index = int(label_column)
    except ValueError:
        index = None
    if index is not None and -len(header) <= index < len(header):
        return index % len(header)
    raise DataError(
        f"{path}: no label column {label_column!r}; the columns are "
        + ", ".join(header)
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str) -> float | None:
    """The finite float in ``text``, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# NPZ -------------------------------------------------------------------------


def _load_npz(path: Path, classes: Sequence[str] | None) -> Dataset:
    # allow_pickle=False: an archive cannot make this process run code.
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single array, not a .npz archive of x and y")
        with loaded as archive:
            arrays = {name: archive[name] for name in archive.files}
    except DataError:
        raise
    except OSError as exc:
        reason = exc.strerror or "not a NumPy .npz archive"
        raise DataError(f"{path}: cannot read the file: {reason}") from None
    except (ValueError, zipfile.BadZipFile, EOFError) as exc:
        if "Object arrays" in str(exc):
            raise DataError(
                f"{path}: holds object arrays, which are refused; "
                "save x and y as numeric arrays"
            ) from None
        raise DataError(f"{path}: not a NumPy .npz archive") from None
    for name in ("x", "y"):
        if name not in arrays:
            found = ", ".join(sorted(arrays)) or "none"
            raise DataError(
                f"{path}: no array {name!r} in the archive (arrays: {found})"
            )
    x, y = arrays["x"], arrays["y"]
    if classes is None or y.dtype.kind not in "US":
        return _checked(str(path), x, y, "row")

    # Class names: their positions in ``classes`` are the class numbers.
    labels, num_classes = _class_numbers(path, list(y), classes, "row", 0)
    return _checked(str(path), x, labels, "row", num_classes)


def _checked(
    source: str,
    x: np.ndarray,
    y: np.ndarray,
    row_word: str,
    num_classes: int | None = None,
) -> Dataset:
    """A Dataset from feature and label arrays, or DataError saying which
    array is wrong and how."""
    if x.ndim < 2:
        raise DataError(
            f"{source}: x must have one row per example (2 or more dimensions), "
            f"it has shape {x.shape}"
        )
    if x.dtype.kind not in "biuf":
        raise DataError(f"{source}: x must be numeric, it has dtype {x.dtype}")
    if len(x) == 0:
        raise DataError(f"{source}: has no examples")
    if y.ndim == 0 or len(y) != len(x):
        raise DataError(f"{source}: x has {len(x)} rows but y has {y.size}")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{source}: x holds NaN or infinite values")

    # Labels: one-hot rows, or one class number per example.
    if y.ndim == 2 and y.shape[1] > 1:
        if not _is_one_hot(y):
            raise DataError(
                f"{source}: y has {y.shape[1]} columns but its rows are not "
                "one-hot (one 1, the rest 0)"
            )
        num_classes = int(y.shape[1])
        labels = np.argmax(y, axis=1)
    else:
        flat = np.asarray(y).reshape(len(y), -1)[:, 0] if y.ndim > 1 else y
        labels = _whole_numbers(source, flat, row_word)
    return Dataset(
        source=source,
        features=np.asarray(x, dtype=np.float32),
        labels=labels.astype(np.int64),
        num_classes=num_classes,
        row_word=row_word,
    )


def _is_one_hot(y: np.ndarray) -> bool:
    if y.dtype.kind not in "biuf":
        return False
    return bool(np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1))


def _whole_numbers(source: str, values: np.ndarray, row_word: str) -> np.ndarray:
    """Class numbers from an array of labels, or DataError at the first one
    that is not a whole number >= 0."""
    numbers = np.full(len(values), np.nan)
    if values.dtype.kind in "biuf":
        numbers = values.astype(np.float64)
    else:
        for index, value in enumerate(values):
            number = _number(str(value))
            numbers[index] = np.nan if number is None else number
    with np.errstate(invalid="ignore"):
        wrong = ~np.isfinite(numbers) | (numbers < 0) | (numbers != np.round(numbers))
    if wrong.any():
        index = int(np.flatnonzero(wrong)[0])
        where = f"line {index + 2}" if row_word == "line" else f"row {index}"
        raise DataError(
            f"{source}: label {str(values[index])!r} on {where} is not a class "
            "number (0, 1, 2, ...); name the classes in order with --classes"
        )
    return numbers.astype(np.int64)


def _class_numbers(
    path: Path,
    raw: list[str],
    classes: Sequence[str] | None,
    row_word: str,
    first_row: int,
) -> tuple[np.ndarray, int | None]:
    """Class numbers for raw labels: the position in ``classes`` when names
    are given, the number itself otherwise."""
    if classes is None:
        labels = _whole_numbers(str(path), np.asarray(raw, dtype=object), row_word)
        return labels, None
    position = {name: i for i, name in enumerate(classes)}
    labels = np.empty(len(raw), dtype=np.int64)
    for index, label in enumerate(raw):
        label = str(label)
        if label not in position:
            raise DataError(
                f"{path}: label {label!r} on {row_word} {index + first_row} is "
                f"not one of the classes {', '.join(classes)}"
            )
        labels[index] = position[label]
    return labels, len(classes)


def _describe_row(shape: Sequence[int]) -> str:
    if len(shape) == 1:
        return f"{shape[0]} feature(s)"
    return f"features of shape {tuple(shape)}"


# Splits ----------------------------------------------------------------------


def split_holdout(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices for training and for a held-out set of about ``fraction``
    of the rows, drawn from every class in proportion."""
    rng = np.random.default_rng(seed)
    train, holdout = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(fraction * len(rows)))
        holdout.append(rows[:count])
        train.append(rows[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(holdout))


def partition(
    labels: np.ndarray,
    num_clients: int,
    how: str,
    seed: int,
    alpha: float = 0.5,
    min_rows: int = 2,
) -> list[np.ndarray]:
    """Divide row indices among ``num_clients``.

    ``iid``: shuffled, equal shares. ``label-skew``: each class is divided
    among the clients in proportions drawn from Dirichlet(``alpha``), so a
    client holds mostly a few classes (smaller ``alpha``, more skew; Hsu et
    al. 2019, arXiv:1909.06335). Draws are repeated until every client has
    at least ``min_rows`` rows.
    """
    if how not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {how!r}")
    if num_clients * min_rows > len(labels):
        raise ValueError(
            f"{len(labels)} rows cannot give {num_clients} clients {min_rows} rows each"
        )
    rng = np.random.default_rng(seed)
    if how == "iid":
        shuffled = rng.permutation(len(labels))
        return [np.sort(s) for s in np.array_split(shuffled, num_clients)]

    for _ in range(1000):
        shares: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(rows)).astype(int)
            for share, part in zip(shares, np.split(rows, cuts), strict=True):
                share.extend(part.tolist())
        if min(len(s) for s in shares) >= min_rows:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]
    raise ValueError(
        f"no label-skew draw gave every one of {num_clients} clients "
        f"{min_rows} rows; raise alpha or use fewer clients"
    )
