"""nnU-Net's default trainer on the parity harness's budget (copied into the harness venv's nnunetv2).

`benchmarks/parity/run.sh` places this file in ``nnunetv2/training/nnUNetTrainer/`` of its own
venv so that ``nnUNetv2_train ... -tr nnUNetTrainer_Budget`` finds it. Everything but the budget
is nnUNetTrainer's default; the budget comes from the environment:

- ``PARITY_EPOCHS``, ``PARITY_ITERATIONS`` (per epoch), ``PARITY_VAL_ITERATIONS``: the schedule;
- ``PARITY_BATCH_SIZE``: overrides the plan's batch size (both frameworks train the same batch);
- ``PARITY_SEED``: seeds python, numpy and torch before the network is built (nnU-Net itself
  does not seed; its augmentation threads stay nondeterministic).

Each epoch's training phase (batches fetched and steps taken) is timed into ``epoch_times.tsv``
in the fold folder: wall seconds and this process's CPU seconds (all threads; with
``nnUNet_n_proc_DA=0`` the augmentation runs here too), as autoseg's ``training_log.jsonl``
records them, so the harness compares like with like.
"""

import os
import random
import time

import numpy as np
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_Budget(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        batch = os.environ.get("PARITY_BATCH_SIZE")
        if batch:
            plans["configurations"][configuration]["batch_size"] = int(batch)
        seed = os.environ.get("PARITY_SEED")
        if seed:
            random.seed(int(seed))
            np.random.seed(int(seed))
            torch.manual_seed(int(seed))
        super().__init__(plans, configuration, fold, dataset_json, device=device)
        self.num_epochs = int(os.environ.get("PARITY_EPOCHS", self.num_epochs))
        self.num_iterations_per_epoch = int(os.environ.get("PARITY_ITERATIONS", self.num_iterations_per_epoch))
        self.num_val_iterations_per_epoch = int(os.environ.get("PARITY_VAL_ITERATIONS",
                                                               self.num_val_iterations_per_epoch))
        self.save_every = max(1, self.num_epochs)

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"parity budget: batch {self.batch_size}, {self.num_epochs} epochs x "
                               f"{self.num_iterations_per_epoch} iterations")
        self._times = open(os.path.join(self.output_folder, "epoch_times.tsv"), "w")
        self._times.write("epoch\ttrain_wall_s\ttrain_cpu_s\n")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, train_outputs):
        wall, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        self._times.write(f"{self.current_epoch}\t{wall:.4f}\t{cpu:.4f}\n")
        self._times.flush()
        super().on_train_epoch_end(train_outputs)

    def on_train_end(self):
        self._times.close()
        super().on_train_end()
