"""Nothing lost: exact resume, hard kills, interrupts, corrupt checkpoints, non-finite losses, bad
input and runs started in the same second. Most runs are in-process calls of main_general.main;
a subprocess is used only where a real SIGKILL is needed."""
from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import checkpoints
import log_data
import main_general
import model_preparation as prep
import speed
from conftest import ROOT, SMOKE_FLAGS
from nntrain import EagerStep, NonFiniteLossError, out_of_memory_message, train
from test_cuda_graph import CAPTURE_ERROR, FakeCuda
from user_input import ConfigError, defaults

TIMING_KEYS = ("epoch_time_s", "train_img_per_s", "test_time_s")
EPOCHS = 2  # N; runs are stopped after N/2 = 1 (few epochs: each costs seconds on 2 CPU cores)
STEPS = 2  # training steps per epoch: SMOKE_FLAGS cap every epoch at two batches


def flags(work, *extra) -> list[str]:
    """A 2-epoch smoke run in `work`: one warm-up epoch, then the cosine phase."""
    return [*SMOKE_FLAGS, "--data-dir", str(work.parent / "data"), "--runs-dir", str(work / "runs"),
            "--checkpoint-dir", str(work / "checkpoints"), "--epochs", str(EPOCHS), "--warmup-epochs", "1",
            "--checkpoint-every", "1", *extra]


def folders(work, name="run") -> tuple:
    return work / "runs" / "Lambda" / name, work / "checkpoints" / "Lambda" / name


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def read_lines(path) -> list[str]:
    text = path.read_text()
    assert text.endswith("\n"), f"{path} ends in a torn line"
    return text.splitlines()


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_run(work, reference, name="run"):
    """metrics.jsonl equal to the reference run's except timing, each epoch once and whole in log.txt,
    and identical final weights and optimizer state."""
    run_dir, checkpoint_dir = folders(work, name)
    ref_run, ref_checkpoints = folders(reference)
    lines = read_lines(run_dir / "metrics.jsonl")
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    assert comparable(records) == comparable(log_data.read_metrics(str(ref_run / "metrics.jsonl")))
    epoch_lines = [line for line in read_lines(run_dir / "log.txt") if log_data.EPOCH_LINE.match(line.encode())]
    assert [int(line.split()[1].split("/")[0]) for line in epoch_lines] == list(range(1, EPOCHS + 1))
    state, ref = load(checkpoint_dir / "last.pt"), load(ref_checkpoints / "last.pt")
    assert state["epoch"] == EPOCHS
    for key, tensor in ref["model"].items():
        assert torch.equal(state["model"][key], tensor), key
    for index, saved in ref["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state["optimizer"]["state"][index][key], saved[key]), (index, key)
    assert state["scheduler"] == ref["scheduler"]
    assert not [n for n in os.listdir(checkpoint_dir) if ".tmp" in n]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the subprocesses: on the busy shared 2-core test machine,
    two OpenMP threads beside a DataLoader worker process made a 2-epoch smoke run 20 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def call_main(argv, capsys) -> tuple[int, str]:
    """main_general.main in this process: (exit status, its stderr)."""
    capsys.readouterr()
    try:
        status = main_general.main([str(a) for a in argv])
    except SystemExit as exit_info:
        status = exit_info.code
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: N epochs without a stop, NUM_WORKERS=0."""
    work = tmp_path_factory.mktemp("faults") / "straight"
    assert main_general.main(flags(work, "--run-name", "run")) == 0
    return work


def fire_at_training_step(monkeypatch, step: int, action, training: bool = True) -> None:
    """Call action() right after the loss of global training step `step` (1-based) is computed
    (with training=False: of test batch `step`)."""
    build = prep.build_criterion
    count = [0]

    def build_criterion(config):
        criterion = build(config)

        def hooked(logits, labels):
            loss = criterion(logits, labels)
            if torch.is_grad_enabled() == training:  # grad is off in evaluation
                count[0] += 1
                if count[0] == step:
                    loss = action(loss)
            return loss
        return hooked
    monkeypatch.setattr(prep, "build_criterion", build_criterion)


def send(signum):
    def action(loss):
        os.kill(os.getpid(), signum)
        return loss
    return action


# --- exact resume and interrupts ---

def test_sigint_stops_within_a_step_and_the_printed_command_resumes_exactly(straight, tmp_path, monkeypatch,
                                                                          capsys):
    work = tmp_path / "work"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    fire_at_training_step(monkeypatch, STEPS + 1, send(signal.SIGINT))  # epoch 2, step 1
    code, err = call_main(flags(work, "--run-name", "run"), capsys)
    assert code == 130
    run_dir, checkpoint_dir = folders(work)
    assert "stopped by SIGINT in epoch 2, step 2 of 2" in err and "Traceback" not in err
    assert load(checkpoint_dir / "last.pt")["epoch"] == 1  # the last finished epoch
    assert [r["epoch"] for r in log_data.read_metrics(str(run_dir / "metrics.jsonl"))] == [1]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back

    command = shlex.split(err.splitlines()[-1].split("resume with: ")[1])
    assert command[:2] == ["python", "main_general.py"]
    assert command[-2:] == ["--resume", str(checkpoint_dir / "last.pt")]
    monkeypatch.undo()
    assert main_general.main(command[2:]) == 0
    assert_same_run(work, straight)


def test_sigterm_during_evaluation_finishes_the_epoch_then_stops(tmp_path, monkeypatch, capsys):
    fire_at_training_step(monkeypatch, 1, send(signal.SIGTERM), training=False)  # epoch 1, test batch 1
    work = tmp_path / "work"
    code, err = call_main(flags(work, "--run-name", "run"), capsys)
    assert code == 143 and "stopped by SIGTERM in epoch 2, before its first step" in err
    assert "resume with: python main_general.py " in err and "Traceback" not in err
    assert load(folders(work)[1] / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in log_data.read_metrics(str(folders(work)[0] / "metrics.jsonl"))] == [1]


def test_ctrl_c_to_the_process_group_with_workers(tmp_path):
    """A terminal's Ctrl-C reaches the DataLoader workers too: they leave the stop to the main process."""
    work = tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "main_general.py"),
                                *flags(work, "--num-workers", "1", "--epochs", "3", "--run-name", "run")],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    metrics = folders(work)[0] / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None and not metrics.exists():
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    err = process.communicate(timeout=240)[1]
    assert process.returncode == 130, err
    assert err.count("SIGINT: stopping before the next training step") == 1 and "Traceback" not in err
    assert "resume with: python main_general.py" in err.splitlines()[-1]


def test_resume_command_replaces_an_earlier_resume():
    argv = ["--epochs", "9", "--resume", "latest", "--resume=old.pt", "--run-name", "a b"]
    assert checkpoints.resume_command(argv, "ck/last.pt") == \
        "python main_general.py --epochs 9 --run-name 'a b' --resume ck/last.pt"


def test_second_sigint_stops_at_once(tmp_path, monkeypatch, capsys):
    def twice(loss):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the first handler has put back KeyboardInterrupt
        return loss
    fire_at_training_step(monkeypatch, 1, twice)
    code, err = call_main(flags(tmp_path / "work", "--run-name", "run"), capsys)
    assert code == 130 and "stopped by SIGINT at once" in err and "Traceback" not in err
    assert load(folders(tmp_path / "work")[1] / "last.pt")["epoch"] == 0  # the start of the run


def test_exact_resume_with_worker_processes(tmp_path, monkeypatch):
    """Data order and augmentation come from (seed, epoch) also when workers load the data."""
    workers = ["--num-workers", "1", "--run-name", "run"]
    assert main_general.main(flags(tmp_path / "straight", *workers)) == 0
    fire_at_training_step(monkeypatch, STEPS + 1, send(signal.SIGINT))  # epoch 2, step 1
    assert main_general.main(flags(tmp_path / "work", *workers)) == 130
    monkeypatch.undo()
    assert main_general.main(flags(tmp_path / "work", *workers, "--resume", "latest")) == 0
    (straight, _), (resumed, _) = folders(tmp_path / "straight"), folders(tmp_path / "work")
    assert comparable(log_data.read_metrics(str(resumed / "metrics.jsonl"))) == \
        comparable(log_data.read_metrics(str(straight / "metrics.jsonl")))
    weights = load(folders(tmp_path / "work")[1] / "last.pt")["model"]
    for key, tensor in load(folders(tmp_path / "straight")[1] / "last.pt")["model"].items():
        assert torch.equal(weights[key], tensor), key


# --- hard kills ---

def test_sigkill_mid_checkpoint_and_at_a_random_moment(straight, tmp_path):
    """kill -9 while last.pt of epoch 2 is being written (epoch 2 is already logged), then at a
    random moment of the resumed run; `--resume latest` then finishes the run as if nothing had
    happened."""
    work = tmp_path / "work"
    run_dir, checkpoint_dir = folders(work)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    command = [sys.executable, os.path.join(ROOT, "main_general.py"), *flags(work)]
    process = subprocess.Popen([*command, "--run-name", "run"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    temporary = checkpoint_dir / f"last.pt.tmp-{process.pid}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if temporary.exists() and metrics.exists() and len(metrics.read_text().splitlines()) == 2:
            process.kill()  # epoch 2 is logged and its checkpoint is being written
            break
        time.sleep(0.001)
    process.wait()
    assert process.returncode == -signal.SIGKILL and temporary.exists(), "the kill missed the checkpoint write"
    assert load(checkpoint_dir / "last.pt")["epoch"] == 1  # the last complete checkpoint

    process = subprocess.Popen([*command, "--resume", "latest"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    seed = random.randrange(10**6)
    moment = random.Random(seed).uniform(0.0, 6.0)
    try:
        process.wait(timeout=moment)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    assert main_general.main([*flags(work), "--resume", "latest"]) == 0, f"killed after {moment:.2f} s (seed {seed})"
    assert_same_run(work, straight)


def test_torn_lines_are_dropped_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    (run_dir / "log.txt").write_text("config: x\nepoch   1/4  train loss 1\nepoch   2/4  train loss 1\n"
                                      "resumed from a\nepoch   3/4  train loss 1\nepoch   4/4  tra")
    assert log_data.read_metrics(str(run_dir / "metrics.jsonl")) == [{"epoch": 1}, {"epoch": 2}]
    log_data.truncate_log(str(run_dir / "log.txt"), 2)
    assert (run_dir / "log.txt").read_text() == \
        "config: x\nepoch   1/4  train loss 1\nepoch   2/4  train loss 1\nresumed from a\n"
    log_data.truncate_log(str(run_dir / "log.txt"), 0)
    assert (run_dir / "log.txt").read_text() == "config: x\n"


# --- corrupt checkpoints ---

def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_corrupt_checkpoints_one_line_error_and_fallback(straight, tmp_path, capsys):
    work = tmp_path / "work"
    shutil.copytree(straight / "runs", work / "runs")
    checkpoint_dir = folders(work)[1]
    checkpoint_dir.mkdir(parents=True)
    for name in ("last.pt", "epoch_002.pt", "best.pt"):
        (checkpoint_dir / name).write_bytes((folders(straight)[1] / name).read_bytes()[:100_000])
    shutil.copyfile(folders(straight)[1] / "epoch_001.pt", checkpoint_dir / "epoch_001.pt")
    (checkpoint_dir / "epoch_002.pt.tmp-99").write_bytes(b"half a checkpoint")  # left by a crash

    code, err = call_main([*flags(work), "--resume", checkpoint_dir / "last.pt"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"checkpoint {checkpoint_dir / 'last.pt'} cannot be read" in err and "Traceback" not in err

    config = dict(defaults(), dataset="synthetic", checkpoint_dir=str(work / "checkpoints"), resume="latest")
    assert checkpoints.resolve_resume(config)["epoch"] == 1  # DATASET as trained: a resume refuses another data set
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and warning.startswith("warning: ")
    assert all(f"{checkpoint_dir / name} cannot be read" in warning for name in ("last.pt", "best.pt", "epoch_002.pt"))
    assert f"resuming from {checkpoint_dir / 'epoch_001.pt'} (epoch 1) instead" in warning

    assert main_general.main([*flags(work), "--resume", "latest"]) == 0
    assert_same_run(work, straight)

    for name in os.listdir(checkpoint_dir):
        truncate(checkpoint_dir / name)
    code, err = call_main([*flags(work), "--resume", "latest"], capsys)
    assert code == 2 and err.count("\n") == 1 and "found no loadable checkpoint in" in err


# --- non-finite loss ---

def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    fire_at_training_step(monkeypatch, STEPS + 2, lambda loss: loss * float("nan"))  # epoch 2, step 2
    work = tmp_path / "work"
    code, err = call_main(flags(work, "--run-name", "run"), capsys)
    assert code == 1 and "Traceback" not in err
    assert "non-finite training loss (nan) in epoch 2, step 2" in err.splitlines()[-1]
    state = load(folders(work)[1] / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert "stopped: non-finite training loss" in (folders(work)[0] / "log.txt").read_text()


def test_non_finite_loss_is_caught_before_the_optimizer_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    loader = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,)))] * 3
    calls = []

    def criterion(logits, labels):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss * float("inf") if len(calls) == 2 else loss
    with pytest.raises(NonFiniteLossError, match=r"in epoch 5, step 2$"):
        train(EagerStep(model, criterion, optimizer), loader, torch.device("cpu"), epoch=4)
    assert optimizer.state_dict()["state"][0]["step"] == 1  # the first step only
    after_first = [p.detach().clone() for p in model.parameters()]
    assert all(torch.isfinite(p).all() for p in after_first)
    assert not all(torch.equal(a, b) for a, b in zip(before, after_first))


@pytest.mark.gpu
def test_non_finite_loss_on_the_gpu_names_the_first_bad_step():
    model = torch.nn.Linear(4, 2).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))] * 5
    calls = []

    def criterion(logits, labels):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if len(calls) >= 3 else loss
    with pytest.raises(NonFiniteLossError, match="in epoch 1, step 3 "):
        train(EagerStep(model, criterion, optimizer), loader, torch.device("cuda"), epoch=0)


# --- out of memory ---

def test_out_of_memory_is_one_line_naming_the_batch_size_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    def out_of_memory(loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    fire_at_training_step(monkeypatch, STEPS + 1, out_of_memory)  # epoch 2, step 1
    work = tmp_path / "work"
    code, err = call_main(flags(work, "--run-name", "run"), capsys)
    assert code == 2 and err.count("error") == 1 and "Traceback" not in err  # before it: the progress bar
    assert err.splitlines()[-1] == ("main_general.py: error: out of memory: BATCH_SIZE=8 does not fit on the device; "
                                    "try --batch-size 4 (the last checkpoint is intact)")
    state = load(folders(work)[1] / "last.pt")  # epoch 1's checkpoint, whole
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert "stopped: out of memory: BATCH_SIZE=8" in (folders(work)[0] / "log.txt").read_text()


def test_out_of_memory_names_the_cards_memory(monkeypatch):
    properties = type("Properties", (), {"name": "NVIDIA T1000", "total_memory": 4 * 2 ** 30})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    message = out_of_memory_message(dict(defaults(), batch_size=512, device="auto"))
    assert message == ("out of memory: BATCH_SIZE=512 does not fit on the NVIDIA T1000 (4.0 GiB); "
                       "try --batch-size 256 (the last checkpoint is intact)")


# --- a failed CUDA-graph capture ---

def test_a_failed_capture_is_one_line_naming_compile_off_and_keeps_the_checkpoints(tmp_path, monkeypatch, capsys):
    """COMPILE=graph on the CPU with torch.cuda's graph faked (test_cuda_graph.FakeCuda): the 4th step
    (epoch 2, step 2) is captured, and its loss cannot be. The run stops there with one line and
    exit status 2, epoch 1's checkpoint stays whole, and a resume with --compile off finishes the run."""
    monkeypatch.setattr(speed, "resolve_compile", lambda mode, device, amp: "graph")
    cuda = FakeCuda().install(monkeypatch)

    build = prep.build_criterion

    def build_criterion(config):
        criterion = build(config)

        def uncapturable(logits, labels):  # the captured step's loss cannot be captured
            if cuda.capturing:
                raise RuntimeError(CAPTURE_ERROR)
            return criterion(logits, labels)
        return uncapturable
    monkeypatch.setattr(prep, "build_criterion", build_criterion)
    work = tmp_path / "work"
    code, err = call_main(flags(work, "--run-name", "run"), capsys)
    assert code == 2 and err.count("main_general.py: error") == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"main_general.py: error: CUDA graph capture failed (RuntimeError: {CAPTURE_ERROR}); "
                                    f"run with --compile off (checkpoints written so far are intact)")
    assert cuda.current is cuda.default  # the stream the capture switched to is left
    state = load(folders(work)[1] / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert "stopped: CUDA graph capture failed" in read_lines(folders(work)[0] / "log.txt")[-1]
    monkeypatch.undo()
    code, err = call_main([*flags(work), "--compile", "off", "--resume", "latest"], capsys)
    assert code == 0, err
    assert load(folders(work)[1] / "last.pt")["epoch"] == EPOCHS


# --- bad input ---

def bad_inputs(work, straight) -> list[tuple[list, str]]:
    (work / "a_file").write_text("not a folder")
    cifar = work / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    (cifar / "data_batch_1").write_bytes(os.urandom(1000))
    (work / "notes.pt").write_text("not a checkpoint")
    file = work / "a_file"
    return [
        (["--epochs", "0"], "EPOCHS=0 must be >= 1"),
        (["--epochs", "ten"], "invalid int value: 'ten'"),
        (["--batch-size", "-4"], "BATCH_SIZE=-4 must be >= 1"),
        (["--lr=-1e-3"], "LR=-0.001 must be > 0"),
        (["--num-workers", "-1"], "NUM_WORKERS=-1 must be >= 0"),
        (["--model", "vit"], "MODEL='vit' is not one of baseline, lambda"),
        (["--device", "tpu"], "DEVICE='tpu' is not one of"),
        (["--heads", "3"], "HEADS=3 must divide"),
        (["--adam-betas", "0.9"], "expected two numbers"),
        (["--label-smoothing", "1"], "LABEL_SMOOTHING=1.0 must be in [0, 1)"),
        (["--zero-init-residual", "maybe"], "expected true or false"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--runs-dir", file / "sub"], f"RUNS_DIR='{file / 'sub'}' cannot be written: {file} is not a writable folder"),
        (["--checkpoint-dir", file / "sub"], f"CHECKPOINT_DIR='{file / 'sub'}' cannot be written"),
        (["--data-dir", file], "is a file; point --data-dir at a folder"),
        (["--dataset", "cifar10", "--data-dir", work / "cifar"],
         f"CIFAR-10 file {cifar / 'data_batch_1'} is missing or corrupt"),
        (["--resume", folders(straight, "gone")[1] / "last.pt"], "gone/last.pt does not exist"),
        (["--resume", "latest", "--checkpoint-dir", work / "empty"], "--resume latest found no checkpoint"),
        (["--resume", work / "notes.pt"], "notes.pt cannot be read (UnpicklingError)"),
        (["--run-name", "run"], "run run already exists"),
        (["--resume", "latest", "--heads", "8"], "was trained with HEADS=4 (now 8)"),
    ]


def snapshot(*roots) -> dict:
    """Every file and folder under roots, with size and modification time (and bytes if small)."""
    state = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            state[folder] = None
            for name in files:
                path = os.path.join(folder, name)
                info = os.stat(path)
                small = open(path, "rb").read() if info.st_size < 1_000_000 else None
                state[path] = (info.st_size, info.st_mtime_ns, small)
    return state


def test_bad_input_exits_2_with_one_line_and_touches_nothing(straight, tmp_path, monkeypatch, capsys):
    downloads = []
    monkeypatch.setattr("torchvision.datasets.CIFAR10.download", lambda self: downloads.append(self.root))
    cases = bad_inputs(tmp_path, straight)
    assert len(cases) >= 15
    before = snapshot(straight / "runs", straight / "checkpoints")
    for argv, expected in cases:
        code, err = call_main([*flags(straight), *argv], capsys)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("main_general.py: error: "), (argv, err)
        assert expected in err and "Traceback" not in err, (argv, err)
    assert snapshot(straight / "runs", straight / "checkpoints") == before
    assert downloads == []  # a damaged CIFAR-10 folder is never overwritten by a download
    assert not (tmp_path / "empty").exists()


# --- runs started in the same second ---

def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    class FrozenClock:
        @staticmethod
        def now():
            from datetime import datetime
            return datetime(2026, 11, 24, 10, 15, 0)
    monkeypatch.setattr(checkpoints, "datetime", FrozenClock)
    config = dict(defaults(), runs_dir=str(tmp_path / "runs"), checkpoint_dir=str(tmp_path / "checkpoints"))
    (tmp_path / "checkpoints" / "Lambda" / "20261124-101500-3").mkdir(parents=True)  # its run folder was deleted
    claimed, errors = [], []

    def claim():
        try:
            claimed.append(checkpoints.claim_run_dirs(dict(config), resuming=False))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
    threads = [threading.Thread(target=claim) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    names = sorted(os.path.basename(run_dir) for run_dir, _ in claimed)
    assert names == ["20261124-101500", "20261124-101500-2", "20261124-101500-4", "20261124-101500-5",
                     "20261124-101500-6", "20261124-101500-7"]
    assert all(os.path.basename(run) == os.path.basename(ckpt) for run, ckpt in claimed)
    assert os.listdir(tmp_path / "checkpoints" / "Lambda" / "20261124-101500-3") == []
    assert not os.path.exists(tmp_path / "runs" / "Lambda" / "20261124-101500-3")


def test_claim_refuses_a_taken_run_name_without_creating_anything(tmp_path):
    config = dict(defaults(), runs_dir=str(tmp_path / "runs"), checkpoint_dir=str(tmp_path / "checkpoints"),
                  run_name="mine")
    (tmp_path / "checkpoints" / "Lambda" / "mine").mkdir(parents=True)
    with pytest.raises(ConfigError, match="run mine already exists"):
        checkpoints.claim_run_dirs(config, resuming=False)
    assert not (tmp_path / "runs" / "Lambda" / "mine").exists()
