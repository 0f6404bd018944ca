"""A run's folders and checkpoints, and resuming from them: claiming a new run's folders, what a
checkpoint holds, crash-safe writes, loading, finding a run's newest one, whether its settings fit
this run's, and restoring its state."""
from __future__ import annotations

import glob
import os
import random
import re
import shlex
import shutil
import sys
from datetime import datetime

import numpy as np
import torch

import distributed
from distributed import unwrap
from model_preparation import shaping_keys
from user_input import ConfigError, defaults


# --- a run's folders ---

def model_folder(config: dict) -> str:
    """"Baseline" or "Lambda": the per-model folder under RUNS_DIR and CHECKPOINT_DIR."""
    return config["model"].capitalize()


def check_writable(path: str, key: str) -> None:
    """ConfigError unless `path` is, or can be created in, a writable folder."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key.upper()}={path!r} cannot be written: {existing} is not a writable folder; "
                          f"choose another --{key.replace('_', '-')}")


def _claim(run_dir: str, checkpoint_dir: str) -> bool:
    """Create both folders; False (and nothing left behind) if either exists already."""
    try:
        os.makedirs(run_dir)
    except FileExistsError:
        return False
    try:
        os.makedirs(checkpoint_dir)
    except OSError as error:
        os.rmdir(run_dir)
        if isinstance(error, FileExistsError):
            return False
        raise
    return True


def claim_run_dirs(config: dict, resuming: bool) -> tuple[str, str]:
    """(run dir, checkpoint dir) of this run. A new run never reuses an existing directory: its
    name is free only if neither folder exists, and mkdir claims it atomically."""
    folder = model_folder(config)
    name = config["run_name"] or datetime.now().strftime("%Y%m%d-%H%M%S")

    def paths(name: str) -> tuple[str, str]:
        return os.path.join(config["runs_dir"], folder, name), os.path.join(config["checkpoint_dir"], folder, name)

    try:
        if resuming:
            for path in paths(name):
                os.makedirs(path, exist_ok=True)
        else:
            for suffix in range(1, 1000):  # two runs started in the same second get -2, -3, ...
                candidate = name if suffix == 1 else f"{name}-{suffix}"
                if _claim(*paths(candidate)):
                    break
                if config["run_name"]:
                    raise ConfigError(f"run {name} already exists in {config['runs_dir']} or "
                                      f"{config['checkpoint_dir']}; choose another --run-name "
                                      f"or continue it with --resume latest")
            name = candidate
    except OSError as error:
        raise ConfigError(f"cannot create the run's folders ({error.strerror}: {error.filename}); "
                          f"check --runs-dir and --checkpoint-dir") from None
    config["run_name"] = name
    return paths(name)


# --- checkpoint files ---

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


def training_checkpoint(training, next_epoch: int, best: dict, config: dict) -> dict:
    """checkpoint_state of a model_preparation.Training."""
    return checkpoint_state(training.model, training.optimizer, training.scheduler, next_epoch, best, config,
                            training.scaler)


# --- resuming ---

def setting_differences(saved: dict, config: dict, keys) -> list[str]:
    """The settings among `keys` that differ in `saved`, as "KEY=saved (now new)".

    A setting that `saved` lacks (a checkpoint older than the setting) counts as its default.
    """
    saved = {**defaults(), **saved}
    return [f"{key.upper()}={saved[key]!r} (now {config[key]!r})" for key in keys if saved[key] != config[key]]


def model_differences(saved: dict, config: dict) -> list[str]:
    """The settings shaping `config`'s network that differ in `saved` (setting_differences)."""
    return setting_differences(saved, config, shaping_keys(config))


def resolve_resume(config: dict) -> dict | None:
    """The checkpoint to resume from (checked against the model settings), or None.

    "latest" takes the newest run of MODEL and falls back from a damaged last.pt to the newest
    loadable checkpoint of that run; an explicit path must load.
    """
    if not config["resume"]:
        return None
    if config["resume"] == "latest":
        checkpoint = newest_loadable(latest_run(config))
    else:
        checkpoint = load_checkpoint(config["resume"])
    path, different = checkpoint["path"], model_differences(checkpoint["config"], config)
    if different:
        raise ConfigError(f"checkpoint {path} was trained with {', '.join(different)}; "
                          f"resume with the same model settings")
    # VAL_SIZE, and SEED where there is a split (it draws the held-out images)
    split_keys = ("val_size", "seed") if checkpoint["config"].get("val_size") or config["val_size"] else ()
    split = setting_differences(checkpoint["config"], config, split_keys)
    if split:
        raise ConfigError(f"checkpoint {path} was trained with another validation split ({', '.join(split)}); "
                          f"resume with the same --val-size and --seed")
    return checkpoint


def resolve_resume_on_main(config: dict) -> dict | None:
    """resolve_resume on rank 0; the other ranks load the checkpoint it chose (not their own
    "latest", which rank 0 may be writing meanwhile)."""
    found = {}

    def resolve() -> str:
        found["checkpoint"] = resolve_resume(config)
        return found["checkpoint"]["path"] if found["checkpoint"] is not None else ""

    path = distributed.from_main(resolve)
    if distributed.is_main():
        return found["checkpoint"]
    return load_checkpoint(path) if path else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load `state` but keep this optimizer's own capturable flags and a float learning rate (a
    CUDA-graph run saves its learning rate as a float32 device tensor; make_capturable redoes that)."""
    capturable = [group["capturable"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flag in zip(optimizer.param_groups, capturable):
        group["capturable"] = flag
        group["lr"] = float(group["lr"])


def restore(checkpoint: dict, model, optimizer, scheduler, scaler=None) -> None:
    """Model, optimizer, schedule, fp16 scaler and RNG states as `checkpoint` saved them."""
    unwrap(model).load_state_dict(checkpoint["model"])
    load_optimizer_state(optimizer, checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler"):  # empty when the run was not fp16
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_states(checkpoint["rng"])


def restore_training(checkpoint: dict | None, training) -> tuple[int, dict]:
    """(first epoch to train, best so far: the validation accuracy with a split, else the test
    accuracy): the checkpoint's, restored into `training`, or a fresh start's."""
    if checkpoint is None:
        return 0, {"acc": -1.0, "epoch": 0}
    restore(checkpoint, training.model, training.optimizer, training.scheduler, training.scaler)
    return checkpoint["epoch"], {"acc": checkpoint["best_acc"], "epoch": checkpoint["best_epoch"]}


def first_checkpoint(checkpoint_dir: str, checkpoint: dict | None, training, best: dict, config: dict) -> str:
    """Write epoch 0's last.pt (a run killed in its first epoch can be resumed too) or, resuming,
    clear the temporaries of a killed write; return the path of last.pt."""
    last = os.path.join(checkpoint_dir, "last.pt")
    if distributed.is_main() and checkpoint is None:
        save_checkpoint(training_checkpoint(training, 0, best, config), last)
    elif distributed.is_main():
        remove_stale_temporaries(checkpoint_dir)
    return last


def resume_command(argv: list[str], checkpoint: str, prog: str = "main_general.py") -> str:
    """The command line that continues this run from `checkpoint` (with torchrun if it ran under it)."""
    kept, skip = [], False
    for arg in argv:
        if not skip and arg != "--resume" and not arg.startswith("--resume="):
            kept.append(arg)
        skip = arg == "--resume"
    launcher = ["python"]
    if distributed.launched_by_torchrun():
        launcher = ["torchrun", f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', distributed.world_size())}"]
    return shlex.join([*launcher, prog, *kept, "--resume", checkpoint])
