"""examples/train_gemma.py, the command line, on a tiny random Gemma 3 folder (tests/_tiny.py): runs
killed at several points (SIGKILL, Ctrl-C), inside checkpoint writes too, resume with `--out DIR
--resume` alone and end with the adapter bytes and metrics of an uninterrupted run; a full disk stops
a run with a message that names the file, and its last checkpoint resumes exactly; every flag is
checked before the model loads (issue 9).

The uninterrupted run goes in-process (torch is imported already); the interrupted ones are
subprocesses, each started through a small wrapper that kills it at the n-th fsync or rename whose
path contains a given text: inside a checkpoint write, between the renames that swap it in.
"""

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_gemma.py"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_tiny = _load("_tiny", Path(__file__).with_name("_tiny.py"))
cli = _load("train_gemma", SCRIPT)

# Kills the process (signal argv[4]) right after the argv[3]-th os.fsync / os.replace (argv[1]) whose
# path (for a rename: its destination) contains argv[2], then runs train_gemma.py with the rest.
KILL_AT = """
import os, runpy, signal, sys
what, text, nth, sig = sys.argv[1:5]
sys.argv = sys.argv[5:]
real, seen = getattr(os, what), []

def hooked(*args):
    out = real(*args)
    path = os.readlink(f"/proc/self/fd/{args[0]}") if what == "fsync" else str(args[1])
    if text in path:
        seen.append(path)
        if len(seen) == int(nth):
            os.kill(os.getpid(), getattr(signal, sig))
    return out

setattr(os, what, hooked)
runpy.run_path(sys.argv[0], run_name="__main__")
"""
KEYS = ("step", "loss", "lr", "eval_loss")  # metrics.jsonl without the timings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model folder, data files, and the flags of a run (8 steps, a checkpoint every 2)."""
    d = tmp_path_factory.mktemp("cli")
    model = _tiny.tiny_folder(d / "model")
    for name, n, seed in (("train.jsonl", 24, 0), ("eval.jsonl", 6, 1)):
        g = torch.Generator().manual_seed(seed)
        pairs = torch.randint(0, 40, (n, 2), generator=g).tolist()
        lines = [json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) for a, b in pairs]
        (d / name).write_text("\n".join(lines) + "\n")
    (d / "kill_at.py").write_text(KILL_AT)
    flags = ["--model", str(model), "--data", str(d / "train.jsonl"), "--eval-data", str(d / "eval.jsonl")]
    flags += ["--steps", "8", "--batch-size", "4", "--lr", "1e-2", "--dropout", "0.1", "--save-every", "2"]
    flags += ["--eval-every", "3", "--eval-examples", "2", "--max-new-tokens", "2", "--threads", "1"]
    return d, flags


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()  # the runs in this process set --threads 1
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted run, in this process: its adapter bytes and metrics."""
    d, flags = setup
    threads = torch.get_num_threads()
    cli.main([*flags, "--out", str(d / "reference")])
    torch.set_num_threads(threads)
    return outcome(d / "reference")


def outcome(run: Path):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: m[k] for k in KEYS if k in m} for m in lines]
    return (run / "adapter" / "adapter_model.safetensors").read_bytes(), metrics


def run_cli(d: Path, args: list[str], kill: tuple = (), timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(d / "kill_at.py"), *map(str, kill)] if kill else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_killed_runs_resume_with_out_and_resume_alone_to_the_uninterrupted_result(setup, reference):
    d, flags = setup
    out = d / "killed"
    resume = ["--out", str(out), "--resume"]
    # 1) SIGKILL inside the write of the step-4 checkpoint (its 2nd file is on disk, the rest not)
    p = run_cli(d, [*flags, "--out", str(out)], kill=("fsync", ".checkpoint.tmp/", 7, "SIGKILL"))
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (out / ".checkpoint.tmp").is_dir() and cli.find_checkpoint(out) == out / "checkpoint"
    # 2) Ctrl-C, as a terminal sends it, once the run has logged step 5
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), *resume]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step    5/8"):
            proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err and f"to continue: python {SCRIPT} --out {out} --resume" in err
    assert "stopped by SIGINT after step" in err
    # 3) SIGKILL between the two renames that swap a new checkpoint in (the old one moved aside)
    p = run_cli(d, resume, kill=("replace", "/.checkpoint.old", 1, "SIGKILL"))
    assert p.returncode == -signal.SIGKILL and (out / ".checkpoint.old").is_dir(), p.stderr[-2000:]
    # 4) SIGKILL inside the final adapter's write, after the last step's checkpoint
    p = run_cli(d, resume, kill=("fsync", "/.adapter.", 1, "SIGKILL"))
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    # 5) the last resume ends the run: the same adapter, byte for byte, and the same metrics
    p = run_cli(d, resume)
    assert p.returncode == 0, p.stderr[-2000:]
    assert outcome(out) == reference
    assert sorted(x.name for x in out.iterdir()) == [
        ".lock",
        "adapter",
        "args.json",
        "checkpoint",
        "metrics.jsonl",
    ]


def pages(path: Path) -> int:
    return math.ceil(path.stat().st_size / 4096)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a private tmpfs")
def test_a_full_disk_stops_the_run_by_name_and_its_checkpoint_resumes_exactly(setup, reference, tmp_path):
    d, flags = setup
    ckpt = d / "reference" / "checkpoint"
    # room for the run's small files and one checkpoint and a half: the second checkpoint cannot fit
    size = 4 * (3 + sum(pages(f) for f in ckpt.iterdir()) * 3 // 2)
    disk, saved = tmp_path / "disk", tmp_path / "saved"
    disk.mkdir()
    train = shlex.join([sys.executable, str(SCRIPT), *flags, "--out", str(disk / "run")])
    resume = shlex.join([sys.executable, str(SCRIPT), "--out", str(disk / "run"), "--resume"])
    script = f"""
        mount -t tmpfs -o size={size}k tmpfs {disk} || exit 99
        {train}; echo "rc=$?"
        mount -o remount,size=100m {disk}
        {resume} > /dev/null; echo "rc=$?"
        cp -r {disk / "run"} {saved}
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if p.returncode == 99 or "unshare:" in p.stderr:
        pytest.skip(f"no private tmpfs here: {p.stderr[-300:]}")
    assert "rc=1\n" in p.stdout and p.stdout.rstrip().endswith("rc=0"), p.stdout[-2000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert (
        f"train_gemma.py: error: [Errno 28] No space left on device: {disk}/run/.checkpoint.tmp/" in p.stderr
        and f"the last complete checkpoint is {disk}/run/checkpoint (resume=True, --resume)" in p.stderr
    ), p.stderr[-2000:]
    assert outcome(saved) == reference


@pytest.mark.parametrize(
    "flags, message",
    [  # issue 9 (8): each failed only after the model's load and the "before" evaluation, or ran
        (["--steps", "-1"], "--steps must be an integer >= 1, got -1"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--grad-accum", "0"], "--grad-accum must be an integer >= 1, got 0"),
        (["--lr", "-1"], "--lr must be a number > 0, got -1.0"),
        (["--lr", "0"], "--lr must be a number > 0, got 0.0"),
        (["--epochs", "0"], "--epochs must be a number > 0, got 0.0"),
        (["--epochs", "-1"], "--epochs must be a number > 0, got -1.0"),
        (["--eval-every", "-1"], "--eval-every must be an integer >= 0, got -1"),
        (["--warmup", "-5"], "--warmup must be an integer >= 0, got -5"),
        (["--eval-examples", "-1"], "--eval-examples must be >= 0, got -1"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
        (["--save-every", "-2"], "--save-every must be an integer >= 0, got -2"),
        (["--r", "0"], "--r must be a positive integer, got 0"),
        (["--dropout", "1"], r"--dropout must be a number in \[0, 1\), got 1.0"),
        (["--data", "missing.jsonl"], "no data file missing.jsonl"),
        (["--model", "missing"], "--model missing is neither a .gguf file nor a folder"),
        (["--template", "no field"], r"template .no field. has no \{field\} placeholder"),
        (["--resume"], r"--resume: .*/run holds no checkpoint to continue"),
    ],
)
def test_flags_are_checked_before_the_model_loads(setup, tmp_path, monkeypatch, flags, message):
    _, base = setup
    monkeypatch.setattr(cli, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(cli, "Tokenizer", lambda *a, **k: pytest.fail("the tokenizer was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main([*base, "--out", str(tmp_path / "run"), *flags])
    assert re.search(rf"train_gemma.py: error: {message}", str(e.value.code)), e.value.code
    assert not (tmp_path / "run").exists()  # nothing written either


def test_an_existing_out_or_one_in_use_is_refused_at_once(setup, tmp_path, monkeypatch):
    import fcntl

    _, base = setup
    monkeypatch.setattr(cli, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(
        SystemExit, match=r"--out .*/run already holds a run: --resume continues it, --overwrite"
    ):
        cli.main([*base, "--out", str(tmp_path / "run")])
    with open(tmp_path / "run" / ".lock", "w") as held:  # as another process holds it
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match=r"run is in use by another run \(pid 4242"):
            cli.main([*base, "--out", str(tmp_path / "run"), "--overwrite"])


def test_resume_restores_the_runs_flags_and_refuses_changes_by_name(setup, reference):
    d, _ = setup
    out = str(d / "reference")
    args = cli.restore(cli.parse_args(["--out", out, "--resume", "--eval-every", "1"]))
    assert (args.lr, args.steps, args.dropout, args.batch_size, args.eval_every) == (1e-2, 8, 0.1, 4, 1)
    assert args.model == str(d / "model") and args.data == str(d / "train.jsonl") and args.resume
    with pytest.raises(
        ValueError, match=r"would change it: --batch-size 2 \(the run's: 4\); --lr 0.001 \(the run's: 0.01\)"
    ):
        cli.restore(cli.parse_args(["--out", out, "--resume", "--lr", "1e-3", "--batch-size", "2"]))
    same = cli.restore(cli.parse_args(["--out", out, "--resume", "--lr", "0.01"]))  # the run's own value
    assert same.lr == 1e-2


def test_user_data_holds_out_a_slice_of_itself(setup, tmp_path, capsys):
    """issue 9 (9): --data without --eval-data measured the bundled English dates task; a .json array
    file was refused; "q_proj, v_proj" matched nothing."""
    d, _ = setup
    records = [json.loads(line) for line in (d / "train.jsonl").read_text().splitlines()]
    (tmp_path / "mine.json").write_text(json.dumps(records, indent=1))
    flags = ["--model", str(d / "model"), "--data", str(tmp_path / "mine.json"), "--holdout", "0.25"]
    flags += ["--targets", "q_proj, v_proj", "--steps", "1", "--batch-size", "4", "--eval-examples", "0"]
    cli.main([*flags, "--threads", "1", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert f"held out: 6 of the records of {tmp_path / 'mine.json'} (--holdout 0.25" in out
    assert "eval:  6 examples (prompt_completion)" in out and "train: 18 examples" in out
    assert "LoRA r=8 alpha=16 on 4 modules" in out
    assert out.count("dtype float32 (auto on the CPU: ") == 1  # the choice, once, with its reason
    assert "eval_loss" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_crafted_pickle_in_a_run_folder_is_never_run_by_the_command_line(setup, reference, tmp_path):
    # issue 9 (1): a shared or downloaded run folder ran code on --resume (4 of 4 crafted files)
    d, _ = setup
    run, marker = tmp_path / "downloaded", tmp_path / "pwned"
    shutil.copytree(d / "reference", run)
    (run / ".lock").unlink()
    crafted = b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."  # open(marker, "w"), as pickle
    for name in ("trainer_state.pt", "rng_rank0.pt"):  # the files older minilora unpickled
        (run / "checkpoint" / name).write_bytes(crafted)
    with pytest.raises(SystemExit, match=r"checkpoint/rng_rank0.pt is not listed in manifest.json"):
        cli.main(["--out", str(run), "--resume"])
    (run / "checkpoint" / "manifest.json").unlink()
    with pytest.raises(SystemExit, match=r"older minilora, in pickle files .* unpickling can run code"):
        cli.main(["--out", str(run), "--resume"])
    assert not marker.exists()


@pytest.mark.parametrize(
    "flags, want",
    [([], "q4.gguf"), (["--model", "gguf"], "q4.gguf"), (["--model", "folder"], "float32"),
     (["--quantize", "nf4"], "float32"), (["--model", "gguf", "--quantize", "nf4"], "q4.gguf")],
)  # fmt: skip
def test_the_default_model_is_the_gguf_file_and_its_folder_for_4_bit(tmp_path, monkeypatch, flags, want):
    """No --model: the Q4_K_M file llama.cpp runs (issue 13); --model folder or --quantize (which
    quantizes float weights): the float32 folder converted from it. (An explicit .gguf with
    --quantize is refused by from_pretrained, tests/test_gguf.py.)"""
    import minilora.gguf as mg

    monkeypatch.setattr(mg, "default_gguf", lambda: tmp_path / "q4.gguf")
    monkeypatch.setattr(mg, "default_model_dir", lambda: tmp_path / "float32")

    class Loaded(Exception):
        pass

    def tokenizer(path):
        raise Loaded(path)

    monkeypatch.setattr(cli, "Tokenizer", tokenizer)
    with pytest.raises(Loaded) as e:
        cli.load(cli.parse_args([*flags, "--out", str(tmp_path / "run")]), torch.float32, "cpu", print)
    assert Path(str(e.value)).name == want
