"""Data larger than memory: the batches of an in-memory run, read by index through grain.

A streamed split is a random-access reader (`reader[row]` is one decoded (H, W, C) uint8 image: a
row of a prepared array_record split, a file of an image folder; `reader._getitems(rows)` several
at once, grain's batched read) with the rows and labels of the split's examples in it (`Split`).
grain reads it: `MapDataset.source(reader)`, arranged in batches by cnnjax's own order (`Batches`:
a process's rows of each global batch, a pure function of (seed, epoch, step) through
cnnjax/data/order.py, the order the in-memory batches take), iterated in the main process
(`data.workers=0`: one background thread reads ahead, `ThreadPrefetchIterDataset`) or by
`data.workers` grain worker processes (`mp_prefetch`: worker i builds batches i, i + W, ... and
grain interleaves them back in order). Augmentation stays on the device; the workers only read,
decode and resize.

Training reads one grain iterator over the run (every epoch's batches, this process's rows), so
the workers read the next epoch while the last is evaluated; its state (`get_state`) goes into
every checkpoint with the position it stands for and is set again on resume (`set_state`). Every
process's iterator stands at the same position (processes step together), so the state the first
process saves restores each of them. When a saved state does not fit (another worker count, an
in-memory checkpoint) the iterator is rebuilt at the position instead: the same batches either way.
Evaluation keeps a repeating iterator over the split last evaluated (its workers stay between
epochs), one pass per call.

Every wait for a batch has a deadline (`data.read_timeout_s`), and a worker that dies is noticed by
grain within a second: either ends the run with a `ReadError` naming what happened, never a hang.
Workers never outlive the process that started them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np
from absl import flags

from cnnjax.config import DataConfig
from cnnjax.data import order, store

_BATCHES_AHEAD = 1 << 40  # a training iterator covers the run: more batches than any run takes
_THREAD_BUFFER = 2  # batches read ahead by the main process's reader thread (workers=0)
_WORKER_BUFFER = 2  # batches each worker process keeps ready
_SCAN_CHUNK = 256  # images a scan element reads
_START_S = 120.0  # added to the deadline of a reader's first batch, while its workers start


class ReadError(OSError):
    """A streamed batch could not be read: a worker process died or hung, or a file went bad."""


@dataclasses.dataclass(frozen=True)
class Split:
    """A split's examples as rows of a random-access `reader`, in order, with their labels."""

    reader: Any  # len(reader), reader[row] -> (H, W, C) uint8 image
    rows: np.ndarray  # int64, one per example
    labels: np.ndarray  # int32, one per example

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray, labels: np.ndarray | None = None) -> "Split":
        """The examples at `positions`, in that order (with new `labels`, one per position)."""
        labels = self.labels[positions] if labels is None else labels.astype(np.int32)
        return Split(self.reader, self.rows[positions], labels)


def whole(reader, labels: np.ndarray) -> Split:
    """Every row of `reader`, in order."""
    return Split(reader, np.arange(len(labels), dtype=np.int64), np.asarray(labels, np.int32))


@dataclasses.dataclass(frozen=True)
class Stored:
    """What a dataset's module hands the input pipeline, read the way a run's settings ask: its
    spec, each stored split ('train', 'test') in memory as (images, labels) or by index as a
    `Split`, and the files left out as unreadable (`data.on_bad_image=skip`)."""

    spec: Any
    splits: Mapping[str, tuple[np.ndarray, np.ndarray] | Split]
    skipped: tuple[str, ...] = ()

    @property
    def streamed(self) -> bool:
        return isinstance(self.splits["train"], Split)


def wanted(cfg: DataConfig, decoded_bytes: int) -> bool:
    """Whether a run of `cfg` streams a dataset of `decoded_bytes` decoded pixels:
    `data.stream=on`, or 'auto' beyond `data.max_memory_gb`."""
    return cfg.stream == "on" or (cfg.stream == "auto" and decoded_bytes > cfg.max_memory_gb * 1e9)


def notice(message: str) -> None:
    """A line on stderr about slow one-time work (a scan of every image), so a wait is explained."""
    print(f"cnnjax: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the order


class TrainOrder:
    """Global batch b of a run -> the training split's positions in this process's `rows` of it:
    epoch 1 + b // steps, step b % steps, ordered by `order.epoch_permutation` (the in-memory
    batches' order)."""

    def __init__(self, n: int, batch_size: int, seed: int, rows: slice):
        self.n, self.batch_size, self.seed, self.rows = n, batch_size, seed, rows
        self.steps = order.steps_per_epoch(n, batch_size)
        self._perm: tuple[int, np.ndarray] | None = None  # this process's latest epoch's order

    def __getstate__(self):
        return {**self.__dict__, "_perm": None}

    def __call__(self, batch: int) -> np.ndarray:
        epoch, step = divmod(batch, self.steps)
        cached = self._perm
        if cached is None or cached[0] != epoch:
            cached = (epoch, order.epoch_permutation(self.n, self.seed, epoch + 1))
            self._perm = cached
        first = step * self.batch_size
        return cached[1][first + self.rows.start:first + self.rows.stop]


class EvalOrder:
    """Evaluation batch b -> the positions in this process's `rows` of it, in file order; those
    past the split's end pad the last batch."""

    def __init__(self, batch_size: int, rows: slice):
        self.batch_size, self.rows = batch_size, rows

    def __call__(self, batch: int) -> np.ndarray:
        first = batch * self.batch_size
        return np.arange(first + self.rows.start, first + self.rows.stop)


class Batches(grain.MapDataset):
    """A grain MapDataset of a process's batches over a split's images (`parent`, which is
    `MapDataset.source(reader)`), arranged by cnnjax's order: element i is batch `first + i` of
    `arrange`, its images read in one batched read (grain's `_getitems`, which an array_record
    reader serves with parallel reads), as the in-memory batches hold it: {'image', 'label',
    'index'} for training; {'image', 'label', 'mask'} for evaluation, where a position past the
    split is a zero image with mask 0."""

    def __init__(self, parent: grain.MapDataset, split: Split, arrange: Callable[[int], np.ndarray],
                 first: int, length: int, shape: tuple[int, ...], train: bool):
        super().__init__(parent)
        self._split, self._arrange, self._first, self._length = split, arrange, first, length
        self._shape, self._train = tuple(shape), train

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"Batches(first={self._first}, length={self._length}, train={self._train})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        positions = self._arrange(self._first + index % self._length)  # grain's repeat: mod len
        split = self._split
        if self._train:
            images = np.stack(self._parent._getitems(split.rows[positions].tolist()))
            return {"image": images, "label": split.labels[positions],
                    "index": positions.astype(np.int32)}
        real = positions < len(split)
        images = np.zeros((len(positions), *self._shape), np.uint8)
        labels = np.zeros(len(positions), np.int32)
        if real.any():
            images[real] = np.stack(self._parent._getitems(split.rows[positions[real]].tolist()))
            labels[real] = split.labels[positions[real]]
        return {"image": images, "label": labels, "mask": real.astype(np.float32)}


# ----------------------------------------------------------------------------- reading


def _watch_parent(parent: int, index: int, count: int) -> None:
    """A worker's start: it exits when `parent`, the process that started it, is gone (a
    SIGKILLed trainer leaves no readers behind), checked each second by a daemon thread. The pid
    comes from the parent: a worker still starting when its parent died would see another one."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="cnnjax-parent-watch").start()


def _readable_profiling_flag() -> None:
    """grain 0.2.18 reads its worker-profiling absl flag unguarded when it starts workers, which
    fails in a program that never parsed absl flags (every cnnjax program); marked as given, the
    flag reads its default (off), as grain itself does for its debug flags in workers."""
    try:
        flags.FLAGS["grain_enable_multiprocess_worker_profiling"].present = True
    except KeyError:  # another grain: no such flag
        pass


_TRACKER_NOTICE = "ignore::UserWarning:multiprocessing.resource_tracker"


def _quiet_resource_tracker() -> None:
    """multiprocessing's resource tracker unlinks the shared-memory batches a worker that died had
    made, then warns about them in two lines after the run's one-line error. It takes its warning
    filters from `sys.warnoptions` when grain first starts it: this one drops that notice only."""
    if _TRACKER_NOTICE not in sys.warnoptions:
        sys.warnoptions.append(_TRACKER_NOTICE)


def iterate(dataset: grain.MapDataset, workers: int) -> grain.DatasetIterator:
    """grain's iterator over `dataset`: read ahead by one daemon thread in this process, or by
    `workers` worker processes."""
    if workers == 0:
        ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=_THREAD_BUFFER)
    else:
        _readable_profiling_flag()
        _quiet_resource_tracker()
        ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=_WORKER_BUFFER),
            worker_init_fn=functools.partial(_watch_parent, os.getpid()))
    return iter(ds)


def _worker_processes() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("grain-")]


def explain(err: BaseException, what: str) -> str:
    """One sentence for a failed read: grain's worker failures put in words; a reader's own error
    (a file that cannot be decoded, named) as it is."""
    text = (str(err).splitlines() or [type(err).__name__])[0].rstrip(".")
    if "terminated unexpectedly" in text:
        code = text.rsplit("exit code", 1)[-1].strip(" .").split(".")[0]
        try:
            signame = f", {signal.Signals(-int(code)).name}" if int(code) < 0 else ""
        except ValueError:
            signame = ""
        return f"a data worker process died while reading {what} (exit code {code}{signame})."
    return f"reading {what} failed: {text}."


class Reader:
    """A grain iterator read with a deadline: each batch is awaited at most `timeout_s` seconds, in
    a daemon thread, so a reader that hangs ends the run with a ReadError instead of blocking it
    (the first batch of a reader with workers gets `_START_S` more: they are being started).

    `position` counts global batches from the run's start (or evaluation passes' batches); `start`
    is where the underlying dataset begins, `state()` grain's state relative to it."""

    def __init__(self, iterator: grain.DatasetIterator, timeout_s: float, what: str,
                 position: int = 0, start: int = 0, key: Any = None, workers: int = 0):
        self.iterator, self.timeout_s, self.what = iterator, timeout_s, what
        self.position, self.start, self.key, self.workers = position, start, key, workers
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._broken: str | None = None  # why the reader can read no more
        self._stalled = False
        self._first = position
        self._thread = threading.Thread(target=self._serve, daemon=True, name="cnnjax-reader")
        self._thread.start()

    def _serve(self) -> None:
        while self._requests.get():
            try:
                self._results.put((next(self.iterator), None))
            except BaseException as err:  # handed to the caller, who raises it
                self._results.put((None, err))

    def next(self) -> dict[str, np.ndarray]:
        if self._broken:
            raise ReadError(self._broken)
        self._requests.put(True)
        starting = bool(self.workers) and self.position == self._first
        try:
            batch, err = self._results.get(timeout=self.timeout_s + _START_S * starting)
        except queue.Empty:
            self._stalled = True
            self._broken = (f"no batch of {self.what} arrived within {self.timeout_s:g} s "
                            f"(data.read_timeout_s): a data reader hangs"
                            + (f" (one of {self.workers} worker processes)." if self.workers
                               else " (a file read that does not return)."))
            for process in _worker_processes():  # unblocks grain's threads, so they can close
                process.kill()
            raise ReadError(self._broken) from None
        if err is not None:
            if isinstance(err, StopIteration):
                raise err
            self._broken = explain(err, self.what)
            raise ReadError(self._broken) from err
        self.position += 1
        return batch

    def state(self) -> Any:
        return self.iterator.get_state()

    def close(self) -> None:
        self._requests.put(False)
        if self._stalled and not self.workers:
            return  # a read that never returns holds grain's reader thread: close would wait
        if self._broken and self.workers:
            for process in _worker_processes():  # a dead worker's siblings need not finish
                process.kill()
        self.iterator.close()


class _ScanChunk:
    """A scan element: rows[start:start + _SCAN_CHUNK] read, the pixel counts of those `counted`,
    and the positions of those that cannot be read (with `skip_bad`; else the first raises)."""

    def __init__(self, reader, rows: np.ndarray, counted: np.ndarray, channels: int,
                 skip_bad: bool, what: str, shape: tuple[int, ...] | None):
        self.reader, self.rows, self.counted = reader, rows, counted
        self.channels, self.skip_bad, self.what, self.shape = channels, skip_bad, what, shape

    def __call__(self, start: int) -> dict[str, np.ndarray]:
        hist, bad = np.zeros((self.channels, 256), np.int64), []
        for i in range(start, min(start + _SCAN_CHUNK, len(self.rows))):
            try:
                image = self.reader[int(self.rows[i])]
            except ValueError:  # a reader names the file it cannot decode
                if not self.skip_bad:
                    raise
                bad.append(i)
                continue
            if self.shape is not None and image.shape != tuple(self.shape):
                raise ValueError(f"{self.what}: example {int(self.rows[i])} is shaped "
                                 f"{image.shape}, expected {tuple(self.shape)}; resize them all "
                                 f"with --set data.image_size=H,W")
            if self.counted[i]:
                hist += store.pixel_histogram(image)
        return {"hist": hist, "bad": np.asarray(bad, np.int64)}


def scan(reader, rows: np.ndarray, counted: np.ndarray, channels: int, *, workers: int,
         timeout_s: float, skip_bad: bool, what: str, shape: tuple[int, ...] | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """One pass over `reader`'s `rows` through grain (`workers` processes decode): the (C, 256)
    pixel counts of the rows where `counted` (`store.stats_from_histogram` makes them the exact
    per-channel statistics an in-memory split gives), and the positions of unreadable rows (an
    image not of `shape`, where given, is an error naming it)."""
    chunks = grain.MapDataset.range(0, len(rows), _SCAN_CHUNK).map(
        _ScanChunk(reader, rows, counted, channels, skip_bad, what, shape))
    reader_ = Reader(iterate(chunks, workers), timeout_s, what, workers=workers)
    hist, bad = np.zeros((channels, 256), np.int64), []
    try:
        for _ in range(len(chunks)):
            part = reader_.next()
            hist += part["hist"]
            bad.append(part["bad"])
    finally:
        reader_.close()
    return hist, np.concatenate(bad) if bad else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- the streamed data


class ImagesView:
    """A streamed split's images as a read-only array-like: `len`, `shape`, `dtype`, and indexing
    by an int, a slice or an index array reads (and decodes, in grain's reader threads) just those
    images; `np.asarray` reads them all. What callbacks get from `event.images(split)` on a
    streamed run (the dead-filter count reads the validation images by slices)."""

    def __init__(self, split: Split, shape: tuple[int, ...]):
        self._split = split
        self.shape, self.dtype, self.ndim = (len(split), *shape), np.dtype(np.uint8), 1 + len(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        reader, rows = self._split.reader, self._split.rows
        if isinstance(index, (int, np.integer)):
            return reader[int(rows[index])]
        wanted = rows[np.arange(len(self))[index]]
        if not len(wanted):
            return np.zeros((0, *self.shape[1:]), np.uint8)
        threads = min(8, os.cpu_count() or 1)
        images = grain.MapDataset.source(wanted.tolist()).map(lambda row: reader[row])
        return np.stack(list(images.to_iter_dataset(grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=2 * threads))))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self[:]
        return images if dtype is None else images.astype(dtype)


class Streamed:
    """The three splits of a run, read through grain batch by batch; the same methods as the
    in-memory `memory.Data`, and the same batches."""

    def __init__(self, spec, train: Split, val: Split, test: Split, *, workers: int = 0,
                 timeout_s: float = 300.0, skipped: Sequence[str] = ()):
        self.spec = spec
        self.splits = {"train": train, "val": val, "test": test}
        self.workers, self.timeout_s, self.skipped = workers, timeout_s, tuple(skipped)
        self._train: Reader | None = None
        self._eval: dict[str, Reader] = {}
        self._restored: Mapping[str, Any] | None = None

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def images(self, split: str) -> tuple[ImagesView, np.ndarray]:
        part = self.splits[split]
        return ImagesView(part, self.spec.image_shape), part.labels

    def _batches(self, split: Split, arrange, first: int, length: int, train: bool) -> Batches:
        images = grain.MapDataset.source(split.reader)
        return Batches(images, split, arrange, first, length, self.spec.image_shape, train)

    # training --------------------------------------------------------------------------------

    def train_batches(self, batch_size: int, seed: int, epoch: int, start: int = 0,
                      part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
        """The epoch's batches from batch `start` on, this process's rows of each."""
        split = self.splits["train"]
        rows = order.process_rows(batch_size, part)
        arrange = TrainOrder(len(split), batch_size, seed, rows)
        target = (epoch - 1) * arrange.steps + start
        key = [len(split), batch_size, seed, part[1]]
        reader = self._train
        if reader is None or reader.key != key or reader.position != target:
            reader = self._open_train(split, arrange, key, target)
        return self._take(reader, arrange.steps - start)

    def _open_train(self, split: Split, arrange: TrainOrder, key: list, target: int) -> Reader:
        if self._train is not None:
            self._train.close()
        saved, self._restored = self._restored, None
        fits = (saved is not None and saved.get("position") == target and saved.get("key") == key
                and saved.get("workers") == self.workers)
        start = int(saved["start"]) if fits else target
        iterator = iterate(self._batches(split, arrange, start, _BATCHES_AHEAD, train=True),
                           self.workers)
        if fits:
            iterator.set_state(saved["grain"])
        self._train = Reader(iterator, self.timeout_s, "the training data", position=target,
                             start=start, key=key, workers=self.workers)
        return self._train

    @staticmethod
    def _take(reader: Reader, n: int) -> Iterator[dict[str, np.ndarray]]:
        for _ in range(n):
            yield reader.next()

    def position(self) -> dict[str, Any] | None:
        """The training iterator's position and grain state, for a checkpoint (None before the
        first batch)."""
        reader = self._train
        if reader is None:
            return None
        return {"position": reader.position, "start": reader.start, "key": reader.key,
                "workers": reader.workers, "grain": reader.state()}

    def restore(self, saved: Mapping[str, Any] | None) -> None:
        """Takes a checkpoint's `position()`: the next `train_batches` at that position starts
        from its grain state."""
        self._restored = saved

    # evaluation ------------------------------------------------------------------------------

    def eval_batches(self, split: str, batch_size: int, part: tuple[int, int] = (0, 1)
                     ) -> Iterator[dict[str, np.ndarray]]:
        """The split's batches in order, the last zero-padded with mask 0, this process's rows."""
        order.check_eval_batch_size(batch_size)
        data = self.splits[split]
        rows = order.process_rows(batch_size, part)
        batches = math.ceil(len(data) / batch_size)
        if not batches:
            return iter(())
        key = [split, batch_size, *part]
        reader = self._eval.get(split)
        if reader is None or reader.key != key or reader.position % batches:
            for other in self._eval.values():  # one evaluation reader (and its workers) at a time
                other.close()
            self._eval = {}
            dataset = self._batches(data, EvalOrder(batch_size, rows), 0, batches, train=False)
            dataset = dataset.repeat()  # one pass per call, the workers stay
            reader = Reader(iterate(dataset, self.workers), self.timeout_s,
                            f"the {split} data", key=key, workers=self.workers)
            self._eval[split] = reader
        return self._take(reader, batches)

    # the end ---------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        return {"streamed": True, "workers": self.workers, **skipped_report(self.skipped)}

    def close(self) -> None:
        """Stops every reader and its worker processes."""
        readers = [r for r in (self._train, *self._eval.values()) if r is not None]
        self._train, self._eval = None, {}
        for reader in readers:
            reader.close()


def skipped_report(skipped: Sequence[str]) -> dict[str, Any]:
    return {"skipped_images": len(skipped), "skipped_files": list(skipped)} if skipped else {}
