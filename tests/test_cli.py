"""What every command line shares: counts must be positive, outputs must be files, failures are one line,
results say how they were made."""
import argparse
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import quant.cli
from quant.cli import (counted, finite_number, is_positive_int, number_in, output_file, positive_int, provenance,
                       random_seed, run, run_folder, thread_count, write_json, written_whole)
from quant.train import main as train_main


@pytest.fixture(autouse=True)
def _commit_read_afresh():
    """quant.cli reads the checkout's commit once a process: each test reads it for itself."""
    quant.cli._checkout_commit.cache_clear()
    yield
    quant.cli._checkout_commit.cache_clear()


@pytest.mark.parametrize("text", ["0", "-1", "abc", "1.5"])
def test_counts_that_are_not_positive_integers_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected a positive integer"):
        positive_int(text)


def test_more_threads_than_the_machine_has_cores_are_refused(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert thread_count("4") == 4
    with pytest.raises(argparse.ArgumentTypeError, match="at most 4 threads"):
        thread_count("5000")


def test_a_machine_of_one_core_names_its_one_thread_in_the_singular(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected at most 1 thread \(the machine's"):
        thread_count("2")


def test_a_count_is_singular_for_one_only_none_is_plural():
    assert [counted(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]


@pytest.mark.parametrize("text", ["-5", str(2**32), "99999999999999999999999", "x"])
def test_a_seed_outside_what_the_generators_take_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer"):
        random_seed(text)


def test_a_seed_may_be_anything_the_generators_take():
    assert random_seed("0") == 0
    assert random_seed(str(2**32 - 1)) == 2**32 - 1


@pytest.mark.parametrize("text, bounds", [("-1", (0, 1)), ("1.5", (0, 1)), ("nan", (0, 1)), ("x", (0, 1)),
                                          ("-0.1", (0,)), ("inf", (0,)), ("1e400", (0,))])
def test_numbers_outside_their_range_are_refused(text, bounds):
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number"):
        number_in(*bounds)(text)


def test_a_closed_end_includes_its_bound():
    assert number_in(0, 1)("0") == 0.0
    assert number_in(0, 1)("1") == 1.0
    assert number_in(0.5)("0.5") == 0.5


@pytest.mark.parametrize("value", [True, False, float("nan"), float("inf"), "1", None,
                                   pytest.param(10 ** 400, id="10**400")])
def test_a_value_read_from_json_that_is_no_finite_number_is_told_apart(value):
    assert not finite_number(value)


@pytest.mark.parametrize("value", [True, 0, -1, 1.0, "1"])
def test_a_value_read_from_json_that_is_no_positive_integer_is_told_apart(value):
    assert not is_positive_int(value)


def test_an_open_end_excludes_its_bound():
    assert number_in(0, 1)("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 1\)"):
        number_in(0, 1, hi_open=True)("1")
    with pytest.raises(argparse.ArgumentTypeError, match="> 0"):
        number_in(0, lo_open=True)("0")


@pytest.mark.parametrize("flag, value", [("--drop-path", "1"), ("--label-smoothing", "5"), ("--warmup-epochs", "-1"),
                                         ("--mixup", "-1"), ("--time-limit", "-1"), ("--time-limit", "0"),
                                         ("--lr", "inf")])
def test_training_settings_out_of_range_are_argument_errors(tmp_path, image_tree, capsys, flag, value):
    with pytest.raises(SystemExit):
        train_main(["--data", str(image_tree), "--out", str(tmp_path / "run"), flag, value])
    assert f"{flag}: expected a number" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1e-300", "0.001", "1e39"])
def test_a_mix_alpha_torchs_float32_beta_cannot_draw_from_is_an_argument_error(tmp_path, image_tree, capsys, value):
    with pytest.raises(SystemExit):  # 1e-300 failed at the first batch; 0.001 mixed a quarter at 0.5, 1e39 at 0
        train_main(["--data", str(image_tree), "--out", str(tmp_path / "run"), "--cutmix", value])
    assert "--cutmix: expected " in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "0.001", "1e39", "nan"])
def test_every_mix_alpha_out_of_range_gets_the_one_range_it_may_take(value):
    # -1 was told [0, 1e+38], a range holding the 0.001 refused next
    with pytest.raises(argparse.ArgumentTypeError, match=rf"a number, 0 \(off\) or in \[0.01, 1e\+38\], got {value}"):
        quant.cli.mix_alpha(value)


@pytest.mark.parametrize("value", ["0", "0.01", "1e38"])
def test_mix_alpha_takes_0_and_both_ends_of_its_range(value):
    assert quant.cli.mix_alpha(value) == float(value)


def test_a_result_records_its_command_line_quoted_the_machine_and_the_utc_date():
    p = provenance("quant.evaluate", ["--data", "my data", "--split", "test"])
    assert p["command"] == "python -m quant.evaluate --data 'my data' --split test"
    assert f"torch {torch.__version__}" in p["machine"]
    assert p["date"].endswith("+00:00")


def test_a_result_records_the_commit_given_where_the_code_travels_without_git(monkeypatch):
    monkeypatch.setenv("BITVIT_COMMIT", "17dd810")
    assert provenance("quant.evaluate", [])["commit"] == "17dd810"


@pytest.mark.skipif(not (Path(__file__).parents[1] / ".git").exists() or not shutil.which("git"),
                    reason="not a git checkout")
def test_a_result_in_a_git_checkout_records_its_head(monkeypatch):
    monkeypatch.delenv("BITVIT_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert provenance("quant.evaluate", [])["commit"] in (head, head + "+dirty")


@pytest.mark.skipif(not (Path(__file__).parents[1] / ".git").exists() or not shutil.which("git"),
                    reason="not a git checkout")
def test_a_result_names_the_commit_its_command_started_on_not_a_later_one(monkeypatch):
    monkeypatch.delenv("BITVIT_COMMIT", raising=False)
    root = Path(__file__).parents[1].resolve()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()

    def moved_on(args, **kwargs):  # the checkout as git reports it after a commit made during the run
        out = "" if "status" in args else f"{root}\n{'f' * 40}\n"
        return subprocess.CompletedProcess(args, 0, stdout=out)
    recorded = []

    def main(argv):
        monkeypatch.setattr(quant.cli.subprocess, "run", moved_on)
        recorded.append(provenance("quant.evaluate", [])["commit"])
    run(main, [])
    assert recorded[0] in (head, head + "+dirty")


def test_an_output_that_is_a_folder_is_refused_and_a_missing_folder_is_made(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        output_file(tmp_path, ".json")
    assert output_file(tmp_path / "new" / "out.json", ".json").parent.is_dir()


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A folder this process cannot write in: a read-only one, or for root, whom permission bits do not stop,
    /sys/fs, where sysfs refuses even root a new file."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder = Path("/sys/fs")
        if not folder.is_dir():
            pytest.skip("running as root without /sys: no folder it cannot write")
    return folder


def test_an_output_in_a_folder_it_cannot_write_is_refused_before_any_work(tmp_path, read_only):
    folder = read_only
    with pytest.raises(ValueError, match=f"cannot write files in {folder}"):
        output_file(folder / "out.json", ".json")
    assert list(tmp_path.rglob("*")) == [tmp_path / "read-only"]


def test_a_run_folder_it_cannot_write_is_refused_before_the_data_is_read_not_after_an_epoch(tmp_path, capsys,
                                                                                              read_only):
    folder = read_only
    for out in (folder, folder / "run"):
        assert run(train_main, ["--data", str(tmp_path / "no-data"), "--out", str(out), "--epochs", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {out}: cannot write files in {folder} (") and len(err.splitlines()) == 1


def test_an_output_or_run_folder_under_an_existing_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="model.pt is a file, not a folder"):
        output_file(tmp_path / "model.pt" / "sub" / "out.json", ".json")
    with pytest.raises(ValueError, match="model.pt is a file, not a folder"):
        run_folder(tmp_path / "model.pt" / "run")


def test_an_output_of_another_kind_than_asked_is_refused(tmp_path):
    for name in ("plot", "plot.txt", "model.safetensors"):
        with pytest.raises(ValueError, match="give a .png file name"):
            output_file(tmp_path / name, ".png")


def test_an_output_that_is_the_commands_input_is_refused(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"model")
    with pytest.raises(ValueError, match="is also this command's input"):
        output_file(tmp_path / "sub" / ".." / "m.safetensors", ".safetensors", inputs=(tmp_path / "m.safetensors",))


@pytest.mark.parametrize("device, message", [("bogus", "unknown device"), ("cuda", "no CUDA device"),
                                             ("mps", "unknown device 'mps'"), ("meta", "unknown device 'meta'")])
def test_training_on_a_device_that_is_not_there_is_one_error_line(tmp_path, image_tree, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    argv = ["--data", str(image_tree), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4",
            "--limit", "12", "--device", device]
    assert run(train_main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_cuda_device_number_the_machine_lacks_is_refused(monkeypatch):
    from quant.train import check_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(ValueError, match="device 'cuda:2' asked for, but this machine has 2 CUDA devices"):
        check_device("cuda:2")


def test_an_existing_file_is_refused_as_a_run_folder(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(ValueError, match="run is a file, not a run folder"):
        run_folder(tmp_path / "run")


def test_an_output_suffix_is_matched_whatever_its_case(tmp_path):
    assert output_file(tmp_path / "plot.PNG", ".png") == tmp_path / "plot.PNG"


def test_an_input_that_was_not_given_is_not_compared_with_the_output(tmp_path):
    assert output_file(tmp_path / "out.json", ".json", inputs=(None,)) == tmp_path / "out.json"


def test_a_command_that_returns_nothing_exits_0_and_an_interrupted_one_130(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt
    assert run(lambda argv: None, []) == 0
    assert run(interrupted, []) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_a_command_started_by_torchrun_among_several_is_refused_unless_it_runs_in_several(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # each process would do all the work and write the same files
    ran = []
    assert run(ran.append, []) == 2 and ran == []
    assert capsys.readouterr().err.strip() == ("error: this command runs in one process: start it with python, not "
                                               "torchrun (quant.train is the one that trains in several)")
    assert run(ran.append, [], several_processes=True) == 0 and ran == [[]]


@pytest.mark.parametrize("message", [
    "[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:35510. This is typically caused by a "
    "remote worker crashing.",  # waiting in a collective as the other process ended
    "[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:52147: Connection reset by peer."])  # in DDP's backward
def test_a_process_whose_collective_fails_as_another_process_failed_says_so_in_one_line(monkeypatch, capsys, message):
    monkeypatch.setenv("WORLD_SIZE", "2")  # the other process printed its own error: this one printed gloo's traceback

    def lost_peer(argv):
        raise RuntimeError(message)
    assert run(lost_peer, [], several_processes=True) == 2
    assert capsys.readouterr().err == "stopped: another process of this run failed\n"
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="by peer"):  # not under torchrun: not one of its processes
        run(lost_peer, [])


@pytest.mark.parametrize("world", ["", "1"])
def test_a_command_runs_where_world_size_names_no_several_processes(monkeypatch, world):
    monkeypatch.setenv("WORLD_SIZE", world)  # exported empty by a shell script, not torchrun: every command died
    ran = []                                 # in the refusal's check ("invalid literal for int() ...: ''")
    assert run(ran.append, []) == 0 and ran == [[]]


@pytest.mark.parametrize("module", ["quant.robustness", "export", "export.bench", "app.bench",
                                    "cuda_ops.parity", "quant.report"])
def test_every_command_but_quant_train_is_refused_under_torchrun(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                       env={**os.environ, "WORLD_SIZE": "2"})
    assert r.returncode == 2 and "runs in one process" in r.stderr


def test_a_command_puts_back_the_sigterm_handler_it_found():
    import signal
    def handler(signum, frame):
        pass
    before = signal.signal(signal.SIGTERM, handler)
    try:
        assert run(lambda argv: None, []) == 0
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_command_run_off_the_main_thread_runs():
    import threading
    codes = []
    thread = threading.Thread(target=lambda: codes.append(run(lambda argv: 3, [])))
    thread.start()
    thread.join()
    assert codes == [3]


def test_a_command_stopped_by_sigterm_midway_through_a_write_leaves_no_temporary_file(tmp_path):
    script = ("import sys, time\n"
              "from quant.cli import run, written_whole\n"
              "def main(argv):\n"
              "    with written_whole(sys.argv[1]) as tmp:\n"
              "        tmp.write_text('half a model')\n"
              "        time.sleep(60)\n"
              "raise SystemExit(run(main))\n")
    root = Path(quant.cli.__file__).parents[1]
    p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "model.pt")], cwd=root, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    p.terminate()
    assert p.wait(30) == 130 and p.stderr.read().strip() == "interrupted"
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_file_of_a_command_killed_midway_through_a_write_is_removed_by_the_next_write(tmp_path):
    script = ("import sys, time\n"
              "from quant.cli import written_whole\n"
              "with written_whole(sys.argv[1]) as tmp:\n"
              "    tmp.write_text('half a model')\n"
              "    time.sleep(60)\n")
    root = Path(quant.cli.__file__).parents[1]
    p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "model.pt")], cwd=root)
    deadline = time.monotonic() + 60
    while not list(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    p.kill()  # SIGKILL: nothing runs to remove the temporary
    p.wait(30)
    assert len(list(tmp_path.iterdir())) == 1
    with written_whole(tmp_path / "model.pt") as tmp:
        tmp.write_text("a model")
    assert [f.name for f in tmp_path.iterdir()] == ["model.pt"]


def test_a_write_leaves_the_temporaries_of_live_processes_and_of_other_machines(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait(30)
    here = quant.cli._process_space()
    kept = {f"model.pt.{here}.{os.getppid()}.tmp", f"model.pt.another-machine.{ended.pid}.tmp",
            f"model.pt.{ended.pid}.tmp",  # (no machine named: which one's process it was is not known)
            f"old-model.pt.{here}.{ended.pid}.tmp"}  # (another file's)
    for name in kept:
        (tmp_path / name).write_text("half a model")
    with written_whole(tmp_path / "model.pt") as tmp:
        tmp.write_text("a model")
    assert {f.name for f in tmp_path.iterdir()} == kept | {"model.pt"}


def test_an_output_whose_name_leaves_no_room_for_a_temporarys_suffix_is_written(tmp_path):
    path = output_file(tmp_path / ("\u00e9" * 120 + ".json"), ".json")  # 245 bytes: the limit is 255
    write_json(path, {"top1": 0.5})
    assert [f.name for f in tmp_path.iterdir()] == [path.name]


def test_an_output_name_past_the_file_name_limit_is_refused_naming_its_length(tmp_path):
    with pytest.raises(ValueError, match="a file name of 256 bytes, more than the 255 a file system takes; give a "
                                         "shorter name"):
        output_file(tmp_path / ("m" * 251 + ".json"), ".json")


def test_an_output_name_within_the_limit_in_characters_but_past_it_in_bytes_is_refused(tmp_path):
    with pytest.raises(ValueError, match="a file name of 265 bytes, more than the 255"):
        output_file(tmp_path / ("é" * 130 + ".json"), ".json")  # 135 characters, two bytes each "é" in UTF-8


def test_a_file_name_that_leaves_the_room_asked_for_is_kept_as_it_is():
    assert quant.cli.shortened_name("m" * 245, 10) == "m" * 245
    assert quant.cli.shortened_name("m" * 246, 10) != "m" * 246


@pytest.mark.parametrize("room", [20, 21])  # the cut falls inside a two-byte character or after it
def test_a_shortened_file_name_leaves_the_room_asked_for_and_cuts_no_character_in_two(room):
    name = quant.cli.shortened_name("\u00e9" * 200, room)
    assert name.startswith("\u00e9" * 100) and len(os.fsencode(name)) + room <= 255


def test_a_long_named_output_is_written_by_a_process_of_the_largest_number(tmp_path, monkeypatch):
    path = output_file(tmp_path / ("m" * 250 + ".json"), ".json")  # 255 bytes, the limit
    monkeypatch.setattr(quant.cli.os, "getpid", lambda: 2 ** 32 - 1)  # ten digits
    write_json(path, {"top1": 0.5})
    assert [f.name for f in tmp_path.iterdir()] == [path.name]


def test_a_file_written_whole_is_on_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """Renamed before its bytes reach the disk, a power cut could leave the new name on an empty file."""
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync",
                        lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace", str(src))) or replace(src, dst))
    write_json(tmp_path / "results.json", {"top1": 0.5})
    assert [e for e, _ in events] == ["fsync", "replace"] and events[0][1] == events[1][1]


def test_a_write_of_a_long_name_removes_its_dead_temporaries_and_leaves_live_and_other_names_ones(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait(30)
    path, other = tmp_path / ("m" * 240 + ".pt"), tmp_path / ("m" * 240 + ".pT")
    names = []
    for p in (path, other):  # the temporaries' names this process's writes use
        with written_whole(p) as tmp:
            names.append(tmp.name)
            tmp.write_text("")
        p.unlink()
    name, other_name = names
    assert name != other_name
    dead, live = (name.replace(f".{os.getpid()}.tmp", f".{pid}.tmp") for pid in (ended.pid, os.getppid()))
    for temporary in (dead, live, other_name):
        (tmp_path / temporary).write_text("half a model")
    with written_whole(path) as tmp:
        tmp.write_text("a model")
    assert {f.name for f in tmp_path.iterdir()} == {path.name, live, other_name}


def test_a_write_leaves_the_temporary_of_another_users_live_process(tmp_path, monkeypatch):
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait(30)
    kept = tmp_path / f"model.pt.{quant.cli._process_space()}.{ended.pid}.tmp"
    kept.write_text("half a model")

    def kill(pid, sig):  # what signal 0 to another user's process gets
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "kill", kill)
    with written_whole(tmp_path / "model.pt") as tmp:
        tmp.write_text("a model")
    assert kept.is_file()


def test_a_write_in_another_pid_namespace_leaves_the_temporary_of_a_live_process_here(tmp_path):
    """Containers that share the machine's name (Docker's --network host) and a folder number their processes apart:
    a process number that runs in none of theirs may be this process's."""
    unshare = ["unshare", "--pid", "--fork"]
    if shutil.which("unshare") is None or subprocess.run([*unshare, "true"], capture_output=True).returncode:
        pytest.skip("no PID namespace can be made here (needs unshare and the right to use it)")
    script = ("import sys\n"
              "from quant.cli import written_whole\n"
              "with written_whole(sys.argv[1]) as tmp:\n"
              "    tmp.write_text('a model')\n")
    root = Path(quant.cli.__file__).parents[1]
    with written_whole(tmp_path / "model.pt") as tmp:
        tmp.write_text("half a model")
        subprocess.run([*unshare, sys.executable, "-c", script, str(tmp_path / "model.pt")], cwd=root, check=True)
        assert tmp.is_file()


def test_a_name_the_stdout_encoding_lacks_is_printed_escaped_not_an_error(monkeypatch):
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr("sys.stdout", out)
    assert run(lambda argv: print("int8 \u00b7 t\u00efny.safetensors"), []) == 0
    out.flush()
    assert out.buffer.getvalue() == b"int8 \\xb7 t\\xefny.safetensors\n"


def test_a_result_records_the_processs_own_arguments_when_given_none(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/x/quant/evaluate.py", "--data", "d"])
    assert provenance("quant.evaluate", None)["command"] == "python -m quant.evaluate --data d"


def test_a_results_file_writes_what_json_cannot_hold_through_its_default(tmp_path):
    write_json(tmp_path / "r.json", {"path": tmp_path}, default=str)
    assert json.loads((tmp_path / "r.json").read_text()) == {"path": str(tmp_path)}


def test_a_file_written_whole_keeps_its_old_content_and_no_temporary_when_the_write_fails(tmp_path):
    path = tmp_path / "model.bin"
    path.write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with written_whole(path) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.bin"]
    with written_whole(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_a_results_file_the_disk_has_no_room_for_is_named_in_the_error(tmp_path, monkeypatch):
    def full(self, data, **kwargs):  # a write's own error names no file
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match=f"No space left on device: '{tmp_path / 'r.json'}'"):
        write_json(tmp_path / "r.json", {"top1": 0.5})
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_file_the_disk_has_no_room_for_is_named_as_the_results_file(tmp_path, monkeypatch):
    def full(self, data, **kwargs):  # opening the temporary file fails, naming it
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match=f"No space left on device: '{tmp_path / 'r.json'}'$"):
        write_json(tmp_path / "r.json", {"top1": 0.5})


def _git(cwd, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.skipif(not shutil.which("git"), reason="no git")
def test_code_copied_without_its_git_into_another_repository_records_no_commit(tmp_path, monkeypatch):
    monkeypatch.delenv("BITVIT_COMMIT", raising=False)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "commit", "-q", "--allow-empty", "-m", "another project")
    (tmp_path / "bitvit" / "quant").mkdir(parents=True)
    monkeypatch.setattr(quant.cli, "__file__", str(tmp_path / "bitvit" / "quant" / "cli.py"))
    assert "commit" not in provenance("quant.evaluate", [])


@pytest.mark.skipif(not shutil.which("git"), reason="no git")
def test_reading_the_commit_writes_nothing_into_the_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("BITVIT_COMMIT", raising=False)
    (tmp_path / "quant").mkdir()
    (tmp_path / "quant" / "cli.py").write_text("# bitvit\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "bitvit")
    index = tmp_path / ".git" / "index"
    before = index.stat().st_mtime_ns
    os.utime(tmp_path / "quant" / "cli.py", ns=(before + 10**9, before + 10**9))  # stat changed, content not: git
    monkeypatch.setattr(quant.cli, "__file__", str(tmp_path / "quant" / "cli.py"))   # status would refresh the index
    assert provenance("quant.evaluate", [])["commit"] == _git(tmp_path, "rev-parse", "HEAD")
    assert index.stat().st_mtime_ns == before  # a concurrent git command never finds index.lock taken by it


COMMANDS = ["quant.train", "quant.evaluate", "quant.qat", "quant.ptq", "quant.robustness", "quant.report",
            "quant.ptq_results", "quant.sizes", "export.__main__", "export.bench", "cuda_ops.bench", "cuda_ops.parity",
            "cuda_ops.compile_check", "app.bench", "app.main"]


def command_parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The argument parser a command's `main` builds, caught as it parses."""
    import importlib
    parsers = []
    def parsed(parser, argv=None):
        parsers.append(parser)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parsed)
    with pytest.raises(SystemExit):
        importlib.import_module(module).main([])
    return parsers[0]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_option_of_every_command_says_in_its_help_what_it_does_and_its_default(module, monkeypatch):
    parser = command_parser(module, monkeypatch)
    formatter = parser._get_formatter()
    for action in parser._actions:
        assert action.help, f"{module} {action.option_strings} has no help"
        if action.default not in (None, False, "", [], argparse.SUPPRESS) and not action.required:
            assert "default" in formatter._get_help_string(action).lower(), f"{module} {action.option_strings}"


@pytest.mark.parametrize("module", COMMANDS)
def test_every_commands_help_says_what_it_does_not_only_how_it_is_called(module, monkeypatch):
    import re
    assert re.sub(r"`[^`]*`", "", command_parser(module, monkeypatch).description).strip(" .:")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="no /proc/self/fd to count open files in")
def test_a_file_written_whole_leaves_no_file_open(tmp_path):
    """Each write opens its temporary to flush it to disk: a long run's many writes must not run out of files."""
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        write_json(tmp_path / "results.json", {"top1": 0.5})
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_dead_processs_temporary_that_links_to_a_folder_is_removed_and_the_folder_kept(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait(30)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "file").write_text("not a temporary")
    link = tmp_path / f"model.pt.{quant.cli._process_space()}.{ended.pid}.tmp"
    link.symlink_to(tmp_path / "kept", target_is_directory=True)
    with written_whole(tmp_path / "model.pt") as tmp:
        tmp.write_text("a model")
    assert not link.is_symlink() and (tmp_path / "kept" / "file").read_text() == "not a temporary"


def test_a_dead_processs_temporary_another_process_removes_first_is_no_error(tmp_path, monkeypatch):
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait(30)
    left = tmp_path / f"model.pt.{quant.cli._process_space()}.{ended.pid}.tmp"
    left.write_text("half a model")
    kill = os.kill

    def removed_meanwhile(pid, sig):  # another process's write removes it between this one's look and its removal
        if pid == ended.pid:
            left.unlink()
        return kill(pid, sig)
    monkeypatch.setattr(os, "kill", removed_meanwhile)
    with written_whole(tmp_path / "model.pt") as tmp:
        tmp.write_text("a model")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_help_tells_a_default_of_0_as_it_tells_any_other():
    from quant.cli import HelpFormatter
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="random seed")  # 0 == False: it was left untold
    p.add_argument("--budget", type=float, default=0.0, help="seconds")
    p.add_argument("--flag", action="store_true", help="a switch")
    text = p.format_help()
    assert "random seed (default: 0)" in text and "seconds (default: 0.0)" in text
    assert "a switch\n" in text
