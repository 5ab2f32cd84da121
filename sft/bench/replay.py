"""Not in the book: the batches a ``Trainer`` with the chapter's schedule trains on, drawn outside it.

So that a path the Trainer does not run (Hugging Face's model, or the FLOP count) sees the very
batches the chapter's and the fast path see. One process, no length grouping: the Trainer's
loaders come from ``create_data_loaders(..., seed)``, torch is seeded with ``seed`` before
training (the benchmark does it, as the chapter does), each epoch takes ``iter(train_loader)``,
and each evaluation iterates the training loader, then the validation loader (every ``iter()``
of a DataLoader draws from torch's global RNG; the shuffle's seed is drawn at its first batch).
Doing the same, in the same order, from a saved RNG state of its own, gives the same batches.
"""
from contextlib import contextmanager

import torch

from ..batching import create_data_loaders


class BatchReplay:
    """``next_batch()`` -> the next training batch (inputs, targets); ``eval_batches()`` ->
    (training batches, validation batches) of an evaluation, each draw as the Trainer makes it."""

    def __init__(self, splits, tokenizer, *, batch_size, seed, allowed_max_length, eval_iter):
        train, test, val = splits
        self.train_loader, self.val_loader, _ = create_data_loaders(
            train, val, test, tokenizer, batch_size=batch_size, seed=seed, allowed_max_length=allowed_max_length)
        self.eval_iter = eval_iter
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.rng = torch.get_rng_state()
        self._epoch, self._left = None, 0

    @contextmanager
    def own_rng(self):
        """Run the block on this replay's RNG state (saved again afterwards); the caller's comes back."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng)
            yield
            self.rng = torch.get_rng_state()

    def next_batch(self):
        with self.own_rng():
            if self._left == 0:  # an epoch starts: the Trainer takes a new iterator (drop_last batches)
                self._epoch, self._left = iter(self.train_loader), len(self.train_loader)
            self._left -= 1
            return next(self._epoch)

    def _first(self, loader):
        n = min(self.eval_iter, len(loader))
        batches, it = [], iter(loader)
        for _ in range(n):
            batches.append(next(it))
        return batches

    def eval_batches(self):
        with self.own_rng():
            return self._first(self.train_loader), self._first(self.val_loader)
