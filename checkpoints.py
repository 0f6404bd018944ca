"""Checkpoint files: what a checkpoint holds, crash-safe writes, loading, and finding a run's newest one."""
from __future__ import annotations

import glob
import os
import random
import re
import shutil
import sys

import numpy as np
import torch

from distributed import unwrap
from user_input import ConfigError


def model_folder(config: dict) -> str:
    """"Baseline" or "Lambda": the per-model folder under RUNS_DIR and CHECKPOINT_DIR."""
    return config["model"].capitalize()


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_acc", "best_epoch", "config", "rng")


def temporary_path(path: str) -> str:
    """Where `path` is written before it is renamed into place; stale ones are removed on resume."""
    return f"{path}.tmp-{os.getpid()}"


def save_checkpoint(state: dict, path: str, copies: tuple[str, ...] = ()) -> None:
    """Write `state` to `path` and to every path in `copies`, each complete or not at all.

    Each file is written to a temporary file in the same folder, flushed to disk and renamed into
    place. `path` is renamed last, so a crash never leaves it ahead of its copies (best.pt, epoch_NNN.pt).
    """
    temporary = temporary_path(path)
    with open(temporary, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    for copy in copies:
        shutil.copyfile(temporary, temporary_path(copy))
        os.replace(temporary_path(copy), copy)
    os.replace(temporary, path)


def remove_stale_temporaries(checkpoint_dir: str) -> None:
    """Delete half-written checkpoints left by a run that was killed while saving."""
    for path in glob.glob(os.path.join(checkpoint_dir, "*.pt.tmp-*")):
        os.remove(path)


def load_checkpoint(path: str) -> dict:
    """The checkpoint at `path`, with its "path" added; ConfigError naming the file if it is
    missing, unreadable or foreign."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ConfigError(f"checkpoint {path} cannot be read ({type(error).__name__}); it may be "
                          f"truncated or corrupt: use another checkpoint of the run") from None
    if not isinstance(checkpoint, dict) or not set(CHECKPOINT_KEYS) <= set(checkpoint):
        raise ConfigError(f"{path} is not a checkpoint of main_general.py (it lacks "
                          f"{', '.join(CHECKPOINT_KEYS)}); use a last.pt, best.pt or epoch_NNN.pt")
    return dict(checkpoint, path=path)


def newest_run_folder(root: str, model: str, filename: str) -> str | None:
    """The run folder under root/<Model>/ whose `filename` was written last, or None."""
    candidates = glob.glob(os.path.join(root, model_folder({"model": model}), "*", filename))
    return os.path.dirname(max(candidates, key=os.path.getmtime)) if candidates else None


def latest_run(config: dict) -> str:
    """Checkpoint folder of the most recently saved run of MODEL under CHECKPOINT_DIR."""
    folder = newest_run_folder(config["checkpoint_dir"], config["model"], "last.pt")
    if folder is None:
        pattern = os.path.join(config["checkpoint_dir"], model_folder(config), "*", "last.pt")
        raise ConfigError(f"--resume latest found no checkpoint matching {pattern}; "
                          f"start a run without --resume first")
    return folder


def newest_loadable(run_checkpoints: str) -> dict:
    """last.pt of a run or, when that cannot be loaded, the loadable best.pt or epoch_NNN.pt with
    the highest epoch, with a warning on stderr naming what was skipped."""
    last = os.path.join(run_checkpoints, "last.pt")
    try:
        return load_checkpoint(last)
    except ConfigError as error:
        skipped = [str(error)]
    found = []
    best = os.path.join(run_checkpoints, "best.pt")
    numbered = sorted((path for path in glob.glob(os.path.join(run_checkpoints, "epoch_*.pt"))
                       if re.fullmatch(r"epoch_\d+\.pt", os.path.basename(path))),
                      key=lambda path: int(os.path.basename(path)[6:-3]), reverse=True)
    for group in ([best], numbered):  # best.pt, and the highest-numbered epoch_NNN.pt that loads
        for path in group:
            try:
                found.append(load_checkpoint(path))
                break
            except ConfigError as error:
                if os.path.exists(path):
                    skipped.append(str(error))
    if not found:
        raise ConfigError(f"--resume latest found no loadable checkpoint in {run_checkpoints} "
                          f"({'; '.join(skipped)})")
    checkpoint = max(found, key=lambda c: c["epoch"])
    print(f"warning: {'; '.join(skipped)}; resuming from {checkpoint['path']} (epoch {checkpoint['epoch']}) "
          f"instead", file=sys.stderr)
    return checkpoint


def checkpoint_state(model, optimizer, scheduler, next_epoch: int, best: dict, config: dict,
                     scaler=None) -> dict:
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": next_epoch, "best_acc": best["acc"], "best_epoch": best["epoch"], "config": config,
            "rng": rng_states()}


def save_checkpoints(state: dict, checkpoint_dir: str, improved: bool, every: int) -> None:
    """last.pt every epoch, epoch_NNN.pt every `every` epochs, best.pt when the test accuracy improved."""
    epoch = state["epoch"]
    copies = []
    if every and epoch % every == 0:
        copies.append(os.path.join(checkpoint_dir, f"epoch_{epoch:03d}.pt"))
    if improved:
        copies.append(os.path.join(checkpoint_dir, "best.pt"))
    save_checkpoint(state, os.path.join(checkpoint_dir, "last.pt"), tuple(copies))
